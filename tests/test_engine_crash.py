"""A native crash of a benchmark child (issue #20) is reported like any other failure: one line naming the engine,
precision, model, the signal or exit code and what the process last wrote to stderr; on the failed MLflow run as
tags and error.txt; and as its row's status in the report. The children here abort or segfault on purpose."""
from __future__ import annotations

import ctypes
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from ernie_lab.errors import ConfigError, EngineCrashed
from ernie_lab.inference.engine import run_isolated
from ernie_lab.results import crashed_result, results_from_runs, seed_table, write_report

MARKER = "double free or corruption (!prev)"
OPENVINO = {"name": "openvino", "engine": "openvino", "device": "cpu", "threads": 1, "flush_denormals": False}


class CrashingWorkload:
    """A workload whose setup, in the benchmark child, writes what glibc would to fd 2 and then dies as told."""

    def __init__(self, how: str):
        self.how = how

    def setup(self):
        os.write(2, f"some earlier warning\n\n{MARKER}\n".encode())
        if self.how == "abort":
            os.abort()
        if self.how == "segv":
            ctypes.string_at(0)  # reads address 0: SIGSEGV
        if self.how == "double_free":  # glibc's own message, then SIGABRT
            libc = ctypes.CDLL(None)
            libc.malloc.restype = ctypes.c_void_p
            libc.free.argtypes = [ctypes.c_void_p]
            block = libc.malloc(64)
            libc.free(block)
            libc.free(block)
        if self.how == "exit":
            os._exit(3)
        raise ConfigError("benchmark.thing=7 is not valid here")


@pytest.mark.parametrize("how,signame", [("abort", "SIGABRT"), ("segv", "SIGSEGV")])
def test_a_native_crash_names_engine_precision_model_signal_and_stderr(tmp_path, how, signame, capfd):
    model = tmp_path / "export" / "none"
    with pytest.raises(EngineCrashed) as caught:
        run_isolated(model, OPENVINO, "bf16", CrashingWorkload(how))
    crash = caught.value
    message = str(crash)
    assert "\n" not in message
    assert crash.signal == signame and signame in message
    assert "openvino" in message and "bf16" in message and str(model) in message
    assert MARKER in message and crash.stderr_tail[-1] == MARKER
    assert crash.tags["crash_signal"] == signame and crash.tags["engine"] == "openvino"
    assert crash.status == f"crashed: {signame} (OpenVINO bf16): {MARKER}"
    assert MARKER in capfd.readouterr().err  # the child's stderr stays visible on ours


def test_a_real_double_free_is_named_by_glibcs_message(tmp_path):
    with pytest.raises(EngineCrashed) as caught:
        run_isolated(tmp_path, OPENVINO, "bf16", CrashingWorkload("double_free"))
    assert caught.value.signal == "SIGABRT"
    assert "double free" in caught.value.stderr_tail[-1] and "double free" in caught.value.status


def test_an_exit_without_a_python_error_names_the_exit_code(tmp_path):
    with pytest.raises(EngineCrashed) as caught:
        run_isolated(tmp_path, {**OPENVINO, "name": "cpu", "engine": None}, "fp32", CrashingWorkload("exit"))
    assert caught.value.signal is None and caught.value.exitcode == 3
    assert "exited with code 3" in str(caught.value) and "engine paddle" in str(caught.value)
    assert caught.value.tags["crash_exit_code"] == "3"


def test_a_python_error_in_the_child_arrives_as_itself(tmp_path):
    with pytest.raises(ConfigError, match="benchmark.thing=7"):
        run_isolated(tmp_path, OPENVINO, "bf16", CrashingWorkload("config"))


def test_an_infer_run_whose_engine_crashes_is_failed_with_tags_and_is_a_row_of_the_report(tmp_path, tokenizer,
                                                                                          monkeypatch):
    """infer.py's body on runtime=openvino precision=bf16, its engine segfaulting in the benchmark child: the
    MLflow run is FAILED with error.txt and the crash's tags, and the report built from it shows the crash."""
    from mlflow.tracking import MlflowClient

    import paddlenlp.transformers
    from ernie_lab import runtime
    from ernie_lab.inference import benchmark
    from ernie_lab.tracking import find_runs, tracked_run
    from tests.conftest import isolated_overrides, make_cfg

    cfg = make_cfg(isolated_overrides(tmp_path) + ["model=tiny", "runtime=openvino", "precision=bf16",
                                                   "task.data.limit.eval=8"])
    model_dir = tmp_path / "export" / "none"
    monkeypatch.setattr(benchmark, "resolve_export", lambda cfg: (model_dir, {"strategy": "none"}))
    monkeypatch.setattr(benchmark, "prepare_for_runtime", lambda cfg, task, path: path)
    monkeypatch.setattr(benchmark, "EvalWorkload", lambda *args: CrashingWorkload("segv"))
    monkeypatch.setattr(paddlenlp.transformers.ErnieTokenizer, "from_pretrained", lambda *a, **k: tokenizer)
    runtime.prepare(cfg.runtime)
    with pytest.raises(EngineCrashed, match="SIGSEGV"):
        with tracked_run(cfg, "infer") as run:
            benchmark.infer(cfg, run)

    client = MlflowClient(cfg.tracking.tracking_uri)
    (failed,) = find_runs(cfg.tracking, "tags.stage = 'infer'")
    tags = failed.data.tags
    assert failed.info.status == "FAILED"
    assert tags["crash_signal"] == "SIGSEGV" and tags["engine"] == "openvino" and tags["precision"] == "bf16"
    assert MARKER in tags["crash_stderr"] and MARKER in tags["error"] and "EngineCrashed" in tags["error"]
    assert tags["export_strategy"] == "none" and tags["primary_metric"] == "accuracy"
    error_txt = Path(client.download_artifacts(failed.info.run_id, "error.txt", str(tmp_path)))
    assert "SIGSEGV" in error_txt.read_text()

    (row,) = results_from_runs([failed])
    assert row["status"] == f"crashed: SIGSEGV (OpenVINO bf16): {MARKER}"
    path = write_report([row], tmp_path / "report")
    line = next(l for l in path.read_text().splitlines() if "BF16" in l)
    assert "[openvino]" in line and f"crashed: SIGSEGV (OpenVINO bf16): {MARKER}" in line


def test_a_crashed_row_sits_beside_finished_ones_in_the_table(tmp_path):
    finished = {"task": "tnews", "model": "m", "strategy": "none", "precision": "fp32", "device": "cpu",
                "runtime_label": "", "primary_metric": "accuracy", "perf/qps": 100.0, "eval/accuracy": 57.0}
    crashed = crashed_result({"task": "tnews", "model": "m", "strategy": "none", "export_strategy": "none",
                              "precision": "bf16", "device": "cpu", "runtime_label": "openvino", "engine": "openvino",
                              "primary_metric": "accuracy", "crash_signal": "SIGABRT",
                              "crash_stderr": f"free(): invalid pointer | {MARKER}"})
    md = seed_table([finished, crashed], "m")
    rows = {line.split(" | ")[0].strip("| "): line for line in md.splitlines()[2:]}
    assert "100.00 (1.0x)" in rows["m+FP32"]
    assert f"crashed: SIGABRT (OpenVINO bf16): {MARKER}" in rows["m+BF16 [openvino]"]
    # the charts and rankings use the finished rows alone; the table keeps both
    text = write_report([finished, crashed], tmp_path).read_text()
    assert "SIGABRT" in text and (tmp_path / "pareto_tnews.png").is_file()
    # a FAILED run without a crash tag (a Python error) is no row; a FINISHED one is
    run = lambda status, tags: SimpleNamespace(  # noqa: E731
        info=SimpleNamespace(status=status, start_time=1, run_name="r", run_id="id"),
        data=SimpleNamespace(tags=tags, metrics={}, params={}))
    assert results_from_runs([run("FAILED", {"task": "tnews"})]) == []
    assert results_from_runs([run("FAILED", {"task": "tnews", "precision": "int8", "crash_exit_code": "134"})])[0][
        "status"] == "crashed: exit code 134 (Paddle Inference int8)"
