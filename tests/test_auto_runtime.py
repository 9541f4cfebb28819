"""runtime=auto: one rule picks each precision's engine for this machine; the jobs of a sweep that this machine
cannot run are refused before any of them starts, in one line; the runs that do run name their engine and why,
the sweep's report compares them with this machine's FP32, and a real MLflow server serves them to the UI."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from ernie_lab import runtime
from ernie_lab.errors import ConfigError
from tests.conftest import PEER_TINY, SCRIPT_BASE, isolated_overrides, peer_cfg, train_and_export_float

# /proc/cpuinfo flags of the CPUs this project has met (and a Granite Rapids with AMX-FP16)
ZEN1 = {"avx2", "fma"}
ZEN4 = ZEN1 | {"avx512f", "avx512_vnni", "avx512_bf16"}
SPR = ZEN4 | {"avx512_fp16", "amx_int8", "amx_bf16"}
GNR = SPR | {"amx_fp16"}


@pytest.mark.parametrize("flags, expected", [
    (ZEN1, {"fp32": "cpu", "int8": "onnxruntime", "bf16": None, "fp16": None}),
    (ZEN4, {"fp32": "cpu", "int8": "openvino", "bf16": runtime.BF16_ENGINE_AVX512, "fp16": None}),
    (SPR, {"fp32": "cpu", "int8": "openvino", "bf16": runtime.BF16_ENGINE_AMX, "fp16": "openvino"}),
    (GNR, {"fp32": "cpu", "int8": "openvino", "bf16": runtime.BF16_ENGINE_AMX, "fp16": "openvino"}),
], ids=["zen1", "zen4", "sapphire-rapids", "granite-rapids"])
def test_one_rule_picks_each_precisions_engine_for_the_cpu(flags, expected):
    for precision, engine in expected.items():
        if engine is None:
            with pytest.raises(ConfigError, match=f"precision={precision} needs") as err:
                runtime.auto_runtime(precision, flags, gpu=False)
            # what to run instead: BF16 where the CPU has it, else FP32/INT8
            assert ("precision=bf16 instead" in str(err.value)) == (precision == "fp16" and "avx512_bf16" in flags)
        else:
            picked, why = runtime.auto_runtime(precision, flags, gpu=False)
            assert picked == engine and why, (precision, picked)
    # a usable GPU takes every precision it has; BF16 stays a CPU precision
    for precision in ("fp32", "fp16", "int8"):
        assert runtime.auto_runtime(precision, flags, gpu=True)[0] == "gpu"
    if expected["bf16"]:
        assert runtime.auto_runtime("bf16", flags, gpu=True)[0] == expected["bf16"]


def test_fp16_rows_say_native_or_converted(monkeypatch):
    assert runtime.fp16_arithmetic(GNR) == "native" and runtime.fp16_arithmetic(SPR) == "converted"
    assert runtime.fp16_arithmetic(ZEN4) is None
    monkeypatch.setattr(runtime, "cpu_flag_set", lambda: set(SPR))
    assert runtime.runtime_label("openvino", "fp16", None) == "openvino converted"
    assert "FP16 arithmetic (converted)" in runtime.auto_runtime("fp16", gpu=False)[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny TNEWS model, trained and exported (float) once for this module."""
    workdir = tmp_path_factory.mktemp("auto")
    train_and_export_float(workdir)
    return workdir


def infer_sweep(workdir, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """`infer.py -m ...` on the module's model, runtime=auto as a user gets it by default."""
    cmd = [sys.executable, "infer.py", "-m", *SCRIPT_BASE, "runtime=auto", *args, *PEER_TINY,
           *isolated_overrides(workdir)]
    return subprocess.run(cmd, cwd=os.path.dirname(os.path.dirname(__file__)), capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "200"})


def infer_runs(workdir, where: str = ""):
    from ernie_lab.tracking import find_runs

    return find_runs(peer_cfg(workdir).tracking, "tags.stage = 'infer'" + (f" and {where}" if where else ""))


def test_a_sweep_with_a_job_this_machine_cannot_run_is_refused_before_any_run(workdir, monkeypatch):
    from ernie_lab.cli import refusals

    before = len(infer_runs(workdir))
    argv = ["-m", "precision=fp16,fp32", "runtime=auto", *PEER_TINY, *isolated_overrides(workdir)]
    if runtime.fp16_arithmetic() is None:  # this CPU: the real command line
        result = infer_sweep(workdir, "precision=fp16,fp32")
        out = result.stdout + result.stderr
        assert result.returncode == 2, out[-3000:]
        errors = [line for line in out.splitlines() if line.strip()]
        assert len(errors) == 1, out
        assert errors[0].startswith("error: 1 of 2 jobs cannot run here (precision=fp16): precision=fp16 needs a GPU or a "
                                    "CPU with FP16 arithmetic (avx512_fp16 or amx_fp16)"), errors[0]
        assert "Traceback" not in out and len(infer_runs(workdir)) == before  # no run, not even the fp32 job's
    # the same command line as a CPU with AVX512-FP16 and one with nothing but AVX2 see it
    monkeypatch.setattr(runtime, "cpu_flag_set", lambda: set(SPR))
    assert refusals(argv, "config", "infer") == []
    monkeypatch.setattr(runtime, "cpu_flag_set", lambda: set(ZEN1))
    (line,) = refusals(argv, "config", "infer")
    assert "1 of 2 jobs cannot run here (precision=fp16)" in line and "Run precision=fp32 or precision=int8" in line
    # a job whose export nobody made names the command that makes it
    (line,) = refusals(["precision=fp32", "strategy=dynabert", *PEER_TINY, *isolated_overrides(workdir)], "config", "infer")
    assert "no exported model at" in line and "python compress.py task=tnews model=tiny strategy=dynabert" in line


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def test_auto_runs_each_precision_on_its_engine_and_the_report_says_which_and_why(workdir):
    precisions = ["fp32", "int8", *(["bf16"] if runtime.has_bf16() else [])]
    result = infer_sweep(workdir, f"precision={','.join(precisions)}")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    assert "/#/experiments/" in out and "?workflowType=machine_learning" in out  # where the UI shows the runs table
    runs = infer_runs(workdir)
    for precision in precisions:
        engine, why = runtime.auto_runtime(precision, gpu=False)
        (run,) = [r for r in runs if r.data.tags["precision"] == precision]
        tags = run.data.tags
        assert tags["runtime"] == engine and tags["runtime_requested"] == "auto" and tags["runtime_choice"] == why
        assert run.info.run_name == f"infer-tnews-tiny-none-{precision}-{tags['engine']}"
    report = next((workdir / "outputs" / "sweeps" / "infer").glob("*/results.md")).read_text()
    assert "## Engines picked by runtime=auto" in report
    assert f"- INT8 on OpenVINO: {runtime.auto_runtime('int8', gpu=False)[1]}" in report or "ONNX Runtime" in report

    # A later sweep without FP32 is measured against this machine's FP32 run of the same model, named in the report
    result = infer_sweep(workdir, "precision=int8", "hydra.sweep.dir=" + str(workdir / "second"))
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    report = (workdir / "second" / "results.md").read_text()
    (fp32,) = infer_runs(workdir, "tags.precision = 'fp32'")
    assert "FP32 (earlier run)" in report and f"run {fp32.info.run_name} ({fp32.info.run_id}" in report
    int8_row = next(line for line in report.splitlines() if "+INT8 [" in line)
    assert "x)" in int8_row and ("(+" in int8_row or "(-" in int8_row)  # speedup and delta against that FP32

    # The UI's view of it: a real `mlflow server` over the same store, read through the REST API as the UI reads it
    port = _free_port()
    tracking = peer_cfg(workdir).tracking
    server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", "--host", "127.0.0.1",
                               "--port", str(port), "--backend-store-uri", tracking.tracking_uri, "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2):
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
                time.sleep(0.5)
        with urllib.request.urlopen(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name="
                                    f"{tracking.experiment_name}", timeout=30) as response:
            experiment = json.load(response)["experiment"]
        tags = {t["key"]: t["value"] for t in experiment.get("tags", [])}
        assert tags["mlflow.experimentKind"] == "custom_model_development"  # opens on the runs table
        found = _post(f"{base}/api/2.0/mlflow/runs/search", {
            "experiment_ids": [experiment["experiment_id"]], "filter": "tags.stage = 'infer'", "max_results": 100})
        served = {r["info"]["run_id"]: r for r in found["runs"]}
        assert set(served) == {r.info.run_id for r in infer_runs(workdir)}
        for run in infer_runs(workdir):
            assert served[run.info.run_id]["info"]["run_name"] == run.info.run_name
            metrics = {m["key"]: m["value"] for m in served[run.info.run_id]["data"]["metrics"]}
            assert metrics["perf/qps"] == pytest.approx(run.data.metrics["perf/qps"])
            assert metrics["eval/accuracy"] == pytest.approx(run.data.metrics["eval/accuracy"])
    finally:
        server.terminate()
        server.wait(timeout=30)
