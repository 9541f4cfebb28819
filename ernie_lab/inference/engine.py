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
import os
import re
import resource
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from omegaconf import OmegaConf

STAGES = ("tokenize", "collate", "h2d", "engine", "d2h", "postprocess")
# How many of the last non-empty stderr lines of a crashed child its error quotes.
STDERR_TAIL_LINES = 3


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


def _timed_pass(backend, workload, after_batch: Callable[[], None] = lambda: None) -> tuple[list, dict, list[float]]:
    """One pass; `after_batch` runs after each batch's clock has stopped (the progress bar), inside the wall time."""
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
        after_batch()
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
        # counted in batches, not passes: one pass of a full eval split takes minutes on 2 cores
        job = bar.add_task(f"infer {precision}", total=passes * len(sample_batches),
                           info=f"{passes} timed passes of {len(sample_batches)} batches")
        for _ in range(passes):
            predictions, spent, per_batch = _timed_pass(backend, workload, lambda: bar.advance(job))
            pass_stats.append(spent)
            batch_seconds.extend(per_batch)
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
                 warmup_seconds: float = 0.0, passes: int = 1, what: str = "benchmark") -> dict[str, Any]:
    """`workload` (picklable) timed in a fresh spawned process; see the module docstring. A native crash of that
    process (a signal, or an exit without a Python error) is raised as `EngineCrashed`, naming the engine,
    precision, model, signal or exit code and the last lines the process wrote to stderr."""
    if passes < 1:
        raise ValueError(f"passes={passes}: at least one timed pass")
    from ernie_lab.tracking import engine_name

    engine = runtime.get("engine") or engine_name(OmegaConf.create({"name": "cpu", **runtime}))
    return run_in_child(_measure, (str(model_dir), runtime, precision, workload, warmup_batches, warmup_seconds, passes),
                        engine=engine, precision=precision, model=str(model_dir), runtime=runtime.get("name", ""),
                        what=what)


class _RemoteTraceback(Exception):
    """The child's traceback, as the `__cause__` of an exception it raised (as concurrent.futures shows it)."""

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def _child_main(conn, stderr_path: str, fn: Callable, args: tuple) -> None:
    """In the child: fd 2 onto the file the parent follows, then `fn(*args)`; its value or exception goes back."""
    fd = os.open(stderr_path, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 2)
    os.close(fd)
    # glibc's fatal messages (`double free or corruption (!prev)`) go to stderr, not to the terminal
    os.environ.setdefault("LIBC_FATAL_STDERR_", "1")
    try:
        result = ("ok", fn(*args))
    except BaseException as exc:  # noqa: BLE001 - every Python error goes back to the parent, which raises it
        tb = "".join(traceback.format_exception(exc))
        result = ("error", exc, tb)
    try:
        conn.send(result)
    except Exception as exc:  # the value or the exception does not pickle: send what it said
        detail = result[2] if result[0] == "error" else repr(exc)
        conn.send(("error", RuntimeError(f"the child's result could not be sent back: {exc}"), detail))
    finally:
        sys.stderr.flush()
        conn.close()


class _StderrFollower:
    """Copies what the child writes into its stderr file onto this process's stderr as it grows (the child's
    warnings stay visible), and reads back its last non-empty lines when the child died."""

    def __init__(self, path: str):
        self.path = path
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True, name="child-stderr")
        self._thread.start()

    def _follow(self) -> None:
        with open(self.path, "rb") as f:
            while True:
                chunk = f.read(1 << 16)
                if chunk:
                    try:
                        os.write(2, chunk)
                    except OSError:  # our own stderr is gone: keep only the file
                        pass
                elif self._stop.is_set():
                    return
                else:
                    time.sleep(0.05)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def tail(self, lines: int = STDERR_TAIL_LINES) -> list[str]:
        with open(self.path, "rb") as f:
            f.seek(max(0, os.path.getsize(self.path) - 16384))
            text = f.read().decode("utf-8", errors="replace")
        kept = [_ANSI.sub("", line).strip() for line in text.splitlines()]
        # faulthandler's stack (where PYTHONFAULTHANDLER is set) says less than the native message above it
        kept = [line for line in kept if line and not _FAULTHANDLER_LINE.match(line)]
        return [line[:500] for line in kept[-lines:]]


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_FAULTHANDLER_LINE = re.compile(r'^(File ".*", line \d+|(Current thread|Thread) 0x[0-9a-f]+|Extension modules:|<no Python frame>)')


def run_in_child(fn: Callable, args: tuple, engine: str, precision: str, model: str, runtime: str = "",
                 what: str = "benchmark"):
    """`fn(*args)` in a fresh spawned process: its return value, or the Python exception it raised (as itself,
    with the child's traceback as its cause), or `EngineCrashed` when the process died without one. A stop of
    this process (SIGTERM/SIGINT, ernie_lab.signals) ends the child too."""
    from ernie_lab.errors import EngineCrashed

    ctx = multiprocessing.get_context("spawn")
    fd, stderr_path = tempfile.mkstemp(prefix="ernie-lab-child-", suffix=".stderr")
    os.close(fd)
    receiver, sender = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child_main, args=(sender, stderr_path, fn, args), name=f"ernie-lab-{what}")
    follower = _StderrFollower(stderr_path)
    try:
        process.start()
        sender.close()  # the child holds the only sending end: its death ends `recv` with EOFError
        message = None
        while message is None:
            if receiver.poll(0.2):
                try:
                    message = receiver.recv()
                except EOFError:
                    break
            elif not process.is_alive():
                if receiver.poll(0):
                    continue
                break
        process.join(timeout=30 if message is not None else None)
        if message is None:
            follower.close()
            exitcode = process.exitcode if process.exitcode is not None else -9
            raise EngineCrashed(engine, precision, model, exitcode, follower.tail(), runtime, what)
        if message[0] == "ok":
            return message[1]
        _, exc, tb = message
        exc.__cause__ = _RemoteTraceback(tb)
        raise exc
    finally:
        if process.is_alive():  # stopped, or an error here: the child must not outlive the call
            process.terminate()
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join(timeout=10)
        receiver.close()
        follower.close()
        try:
            os.unlink(stderr_path)
        except OSError:
            pass


def measure_isolated(model_dir: Path, runtime: dict, precision: str, batches: Sequence[dict[str, np.ndarray]],
                     warmup: int, passes: int) -> dict:
    """Ready batches through the backend only; `outputs` are the last pass's output arrays per batch."""
    result = run_isolated(model_dir, runtime, precision, ReadyBatches(batches), warmup, 0.0, passes)
    result["outputs"] = result.pop("predictions")
    return result
