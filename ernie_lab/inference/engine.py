"""Timed execution of an exported model over ready batches, in a process of its own.

Why a fresh process per evaluation: several oneDNN INT8 predictors created in one process changed each
other's outputs (feasibility.md), and a Hydra multirun runs its jobs in one process. A child also gives an
honest peak-memory figure for the variant alone."""
from __future__ import annotations

import multiprocessing
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
from omegaconf import OmegaConf


def _measure(model_dir: str, runtime: dict, precision: str, batches: Sequence[dict], warmup: int,
             passes: int) -> dict:
    """Runs in the child: build the predictor, warm up, time `passes` full passes, keep the last outputs."""
    from ernie_lab import runtime as rt

    runtime_cfg = OmegaConf.create(runtime)
    rt.prepare(runtime_cfg)
    from ernie_lab.inference.backends import create_backend
    from ernie_lab.reporting import progress

    t0 = time.perf_counter()
    # The batches go in too: a TensorRT backend collects its dynamic shape ranges from them before building.
    backend = create_backend(Path(model_dir), runtime_cfg, precision, batches)
    load_seconds = time.perf_counter() - t0
    for batch in batches[:warmup]:
        backend.run(batch)
    pass_seconds, batch_seconds, outputs = [], [], []
    with progress() as bar:
        job = bar.add_task(f"infer {precision}", total=len(batches) * passes, info="")
        for p in range(passes):
            outputs, per_batch = [], []
            for batch in batches:
                start = time.perf_counter()
                outputs.append(backend.run(batch))
                per_batch.append(time.perf_counter() - start)
                bar.advance(job)
            pass_seconds.append(float(sum(per_batch)))
            batch_seconds.extend(per_batch)
    return {
        "outputs": outputs,
        "pass_seconds": pass_seconds,
        "batch_seconds": batch_seconds,
        "load_seconds": load_seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }


def measure_isolated(model_dir: Path, runtime: dict, precision: str, batches: Sequence[dict[str, np.ndarray]],
                     warmup: int, passes: int) -> dict:
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(_measure, str(model_dir), runtime, precision, list(batches), warmup, passes).result()
