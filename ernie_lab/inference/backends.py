"""The engines behind `runtime.engine`, one module each (mirroring conf/runtime/): paddle_engine (runtime=cpu,
runtime=gpu), onnxruntime_engine, openvino_engine. This module only picks one."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from omegaconf import DictConfig

from ernie_lab.errors import check_choice

Batch = dict[str, np.ndarray]

ENGINES = ("paddle", "onnxruntime", "openvino")


def prepare_for_runtime(cfg: DictConfig, task, model_dir: Path) -> Path:
    """The model directory the runtime runs: `model_dir` itself for Paddle runtimes; for ONNX Runtime and OpenVINO
    their cached conversion (and quantization) of the float export for the precision, made if needed."""
    engine = cfg.runtime.get("engine", "paddle")
    check_choice("runtime.engine", engine, ENGINES)
    if engine == "onnxruntime":
        from ernie_lab.inference.onnxruntime_engine import ensure_onnx_model

        return ensure_onnx_model(cfg, task, model_dir)
    if engine == "openvino":
        from ernie_lab.inference.openvino_engine import prepare_model

        return prepare_model(cfg, task, model_dir)
    return model_dir


def create_backend(model_dir: Path, runtime: DictConfig, precision: str, sample_batches: Sequence[Batch] = ()):
    """`sample_batches`: the batches that will be timed. CPU backends ignore them; TensorRT takes its dynamic shape
    ranges from them before it builds its engines. `runtime.engine` picks the library (Paddle when absent)."""
    engine = runtime.get("engine", "paddle")
    check_choice("runtime.engine", engine, ENGINES)
    if engine == "onnxruntime":
        from ernie_lab.inference.onnxruntime_engine import OnnxRuntimeBackend

        return OnnxRuntimeBackend(model_dir, runtime, precision, sample_batches)
    if engine == "openvino":
        from ernie_lab.inference.openvino_engine import OpenVinoBackend

        return OpenVinoBackend(model_dir, runtime, precision, sample_batches)
    from ernie_lab.inference.paddle_engine import PaddleInferenceBackend

    return PaddleInferenceBackend(model_dir, runtime, precision, sample_batches)
