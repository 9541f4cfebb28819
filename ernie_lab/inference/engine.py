"""Timed execution of an exported model, in a process of its own, stage by stage.

Why a fresh process per evaluation: several oneDNN INT8 predictors created in one process changed each
other's outputs (feasibility.md), and a Hydra multirun runs its jobs in one process. A child also gives an
honest peak-memory figure for the variant alone.

A *workload* says what one pass is: `tokenize()` -> features, `collate(features)` -> batches, and
`finish(outputs)` -> predictions (post-processing). The engine times those stages and, per batch, the backend's
host-to-device copy, engine run and device-to-host copy, around one wall clock per pass, so the end-to-end
figure and the sum of the stages can be checked against each other. It knows nothing about tasks."""
from __future__ import annotations

import multiprocessing
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from omegaconf import OmegaConf

STAGES = ("tokenize", "collate", "h2d", "engine", "d2h", "postprocess")


class ReadyBatches:
    """A workload of batches collated beforehand: only the backend is timed (calibration scoring, tests)."""

    def __init__(self, batches: Sequence[dict[str, np.ndarray]]):
        self.batches = list(batches)

    def setup(self) -> list[dict[str, np.ndarray]]:
        return self.batches

    def tokenize(self) -> None:
        return None

    def collate(self, _features) -> list[dict[str, np.ndarray]]:
        return self.batches

    def finish(self, outputs: list) -> list:
        return outputs


def _warm_up(backend, batches: Sequence[dict], min_batches: int, min_seconds: float) -> dict:
    """Run batches (cycling through them) until both `min_batches` ran and `min_seconds` passed."""
    done, start = 0, time.perf_counter()
    if not batches:
        return {"batches": 0, "seconds": 0.0}
    while done < min_batches or time.perf_counter() - start < min_seconds:
        backend.run(batches[done % len(batches)])
        done += 1
    return {"batches": done, "seconds": time.perf_counter() - start}


def _timed_pass(backend, workload) -> tuple[list, dict, list[float]]:
    clock = time.perf_counter
    spent = dict.fromkeys(STAGES, 0.0)
    batch_seconds = []
    start = clock()
    features = workload.tokenize()
    t = clock()
    spent["tokenize"] = t - start
    batches = workload.collate(features)
    spent["collate"] = clock() - t
    outputs = []
    for batch in batches:
        a = clock()
        backend.feed(batch)
        b = clock()
        backend.execute()
        c = clock()
        outputs.append(backend.fetch())
        d = clock()
        spent["h2d"] += b - a
        spent["engine"] += c - b
        spent["d2h"] += d - c
        batch_seconds.append(d - a)
    t = clock()
    predictions = workload.finish(outputs)
    end = clock()
    spent["postprocess"] = end - t
    spent["wall"] = end - start
    return predictions, spent, batch_seconds


def _measure(model_dir: str, runtime: dict, precision: str, workload, warmup_batches: int, warmup_seconds: float,
             passes: int) -> dict:
    """Runs in the child: set up (untimed), build the predictor, warm up, time `passes` passes."""
    from ernie_lab import runtime as rt

    runtime_cfg = OmegaConf.create(runtime)
    rt.prepare(runtime_cfg)
    from ernie_lab.inference.backends import create_backend
    from ernie_lab.reporting import progress

    sample_batches = workload.setup()
    t0 = time.perf_counter()
    # TensorRT takes its dynamic shape ranges from the batches that will be timed.
    backend = create_backend(Path(model_dir), runtime_cfg, precision, sample_batches)
    load_seconds = time.perf_counter() - t0
    warmup = _warm_up(backend, sample_batches, warmup_batches, warmup_seconds)
    pass_stats, batch_seconds, predictions = [], [], None
    with progress() as bar:
        job = bar.add_task(f"infer {precision}", total=passes, info=f"{len(sample_batches)} batches per pass")
        for _ in range(passes):
            predictions, spent, per_batch = _timed_pass(backend, workload)
            pass_stats.append(spent)
            batch_seconds.extend(per_batch)
            bar.advance(job)
    return {
        "predictions": predictions,
        "passes": pass_stats,
        "batch_seconds": batch_seconds,
        "batches": len(sample_batches),
        "load_seconds": load_seconds,
        # what the engine says it compiled (OpenVINO: the inference precision read back), logged with the run
        "engine_properties": dict(getattr(backend, "properties", None) or {}),
        "warmup": warmup,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }


def run_isolated(model_dir: Path, runtime: dict, precision: str, workload, warmup_batches: int = 0,
                 warmup_seconds: float = 0.0, passes: int = 1) -> dict[str, Any]:
    """`workload` (picklable) timed in a fresh spawned process; see the module docstring."""
    if passes < 1:
        raise ValueError(f"passes={passes}: at least one timed pass")
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(_measure, str(model_dir), runtime, precision, workload, warmup_batches, warmup_seconds,
                           passes).result()


def measure_isolated(model_dir: Path, runtime: dict, precision: str, batches: Sequence[dict[str, np.ndarray]],
                     warmup: int, passes: int) -> dict:
    """Ready batches through the backend only; `outputs` are the last pass's output arrays per batch."""
    result = run_isolated(model_dir, runtime, precision, ReadyBatches(batches), warmup, 0.0, passes)
    result["outputs"] = result.pop("predictions")
    return result
