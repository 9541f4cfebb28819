"""Dygraph -> static Paddle Inference model, checked against the dygraph outputs."""
from __future__ import annotations

from pathlib import Path

import numpy as np

# defined with the artifact layout, which the inference engines read without importing compression
from ernie_lab.artifacts import INPUT_NAMES, MODEL_FILE, PARAMS_FILE  # noqa: F401


def export_static(model, out_dir: Path) -> None:
    import paddle
    from paddle.static import InputSpec

    model.eval()
    spec = [InputSpec(shape=[None, None], dtype="int64", name=name) for name in INPUT_NAMES]
    paddle.jit.save(paddle.jit.to_static(model, input_spec=spec), str(out_dir / "model"))


def max_abs_diff(a: list[tuple[np.ndarray, ...]], b: list[tuple[np.ndarray, ...]]) -> float:
    return float(max(np.max(np.abs(x - y)) for ta, tb in zip(a, b) for x, y in zip(ta, tb)))
