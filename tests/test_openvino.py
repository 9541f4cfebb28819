"""runtime=openvino: a tiny TNEWS model fine-tuned a few epochs, exported, read by OpenVINO's Paddle frontend and
quantized by NNCF. Asserts what a broken conversion, precision pin or cache would fail: OpenVINO FP32 gives Paddle
FP32's outputs, the INT8 model really holds quantizers and tracks FP32, infer.py runs it end to end with the
usual metrics and tags, precisions OpenVINO cannot run here are refused in one line, and the cache is reused
until the export or a setting changes."""
from __future__ import annotations

import collections

import numpy as np
import pytest
from omegaconf import OmegaConf

from ernie_lab import artifacts
from tests.conftest import (PEER_TINY, export_float, isolated_logits, isolated_overrides, make_cfg, peer_cfg, peer_dev_batches,
                            run_script, run_stage, task_for, train_and_export_float)

OV = ["runtime=openvino"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("openvino")


@pytest.fixture(scope="module")
def exported(workdir):
    return train_and_export_float(workdir)


def ov_model(workdir, export_dir, *extra, precision="int8"):
    from ernie_lab.inference.openvino_engine import prepare_model

    cfg = peer_cfg(workdir, *OV, f"precision={precision}", *extra)
    return prepare_model(cfg, task_for(cfg), export_dir)


@pytest.fixture(scope="module")
def models(workdir, exported):
    return {"fp32": ov_model(workdir, exported, precision="fp32"), "int8": ov_model(workdir, exported)}


@pytest.fixture(scope="module")
def dev_feeds(workdir):
    return peer_dev_batches(workdir)


def op_counts(model_dir):
    import openvino as ov

    return collections.Counter(op.get_type_name() for op in ov.Core().read_model(str(model_dir / "model.xml")).get_ops())


def test_openvino_fp32_matches_paddle_fp32(workdir, exported, models, dev_feeds):
    paddle = isolated_logits(exported, peer_cfg(workdir).runtime, "fp32", dev_feeds)
    openvino = isolated_logits(models["fp32"], peer_cfg(workdir, *OV).runtime, "fp32", dev_feeds)
    assert paddle.shape == openvino.shape == (250, 15)
    assert np.mean(paddle.argmax(1) == openvino.argmax(1)) >= 0.999
    assert np.abs(paddle - openvino).max() < 1e-3


def test_fp32_model_keeps_fp32_weights_and_int8_has_quantizers(models):
    fp32, int8 = op_counts(models["fp32"]), op_counts(models["int8"])
    assert fp32["FakeQuantize"] == 0 and fp32["MatMul"] >= 14
    # 2 layers x (q, k, v, out, ffn1, ffn2) + pooler + classifier, each with quantized inputs
    assert int8["FakeQuantize"] >= 14
    import openvino as ov

    weights = [op for op in ov.Core().read_model(str(models["fp32"] / "model.xml")).get_ops() if op.get_type_name() == "Constant"]
    assert not [w for w in weights if w.get_element_type() == ov.Type.f16]  # saved without FP16 compression


def test_int8_agrees_with_fp32(workdir, models, dev_feeds):
    runtime = peer_cfg(workdir, *OV).runtime
    reference = isolated_logits(models["fp32"], runtime, "fp32", dev_feeds).argmax(1)
    agreement = np.mean(isolated_logits(models["int8"], runtime, "int8", dev_feeds).argmax(1) == reference)
    assert agreement >= 0.9, agreement


def test_compile_properties_pin_precision_and_threads(workdir, tmp_path):
    from ernie_lab.errors import ConfigError
    from ernie_lab.inference.openvino_engine import compile_properties

    runtime = peer_cfg(workdir, *OV, "runtime.threads=3").runtime
    props = compile_properties(runtime, "fp32", tmp_path)
    assert props["INFERENCE_PRECISION_HINT"] == "f32" and props["INFERENCE_NUM_THREADS"] == "3"
    assert props["NUM_STREAMS"] == "1" and props["CACHE_DIR"] == str(tmp_path)
    assert compile_properties(runtime, "int8", None)["INFERENCE_PRECISION_HINT"] == "f32"
    assert compile_properties(runtime, "bf16", None)["INFERENCE_PRECISION_HINT"] == "bf16"
    assert compile_properties(runtime, "fp16", None)["INFERENCE_PRECISION_HINT"] == "f16"
    with pytest.raises(ConfigError, match="runtime.performance_hint='FAST' is not valid; choose one of: LATENCY, THROUGHPUT"):
        compile_properties(peer_cfg(workdir, *OV, "runtime.performance_hint=fast").runtime, "fp32", None)


def test_bf16_is_refused_without_bf16_instructions(workdir, monkeypatch):
    from ernie_lab import runtime as rt
    from ernie_lab.errors import ConfigError

    monkeypatch.setattr(rt, "cpu_flags", lambda: {"avx2": True, "avx512_bf16": False, "amx_bf16": False})
    with pytest.raises(ConfigError, match="precision=bf16 needs a CPU with AVX512-BF16 or AMX-BF16.*runtime=openvino"):
        rt.check_precision(peer_cfg(workdir, *OV).runtime, "bf16")
    monkeypatch.setattr(rt, "cpu_flags", lambda: {"avx512_bf16": True, "amx_bf16": False})
    rt.check_precision(peer_cfg(workdir, *OV).runtime, "bf16")


def test_bad_settings_are_one_line_errors(workdir, exported):
    from ernie_lab.errors import ConfigError

    with pytest.raises(ConfigError, match="runtime.int8.overflow_fix='sometimes' is not valid; choose one of: auto, enable"):
        ov_model(workdir, exported, "runtime.int8.overflow_fix=sometimes")
    with pytest.raises(ConfigError, match="runtime.int8_mode='qat' is not valid; choose one of: ptq"):
        ov_model(workdir, exported, "runtime.int8_mode=qat")


def test_backend_refuses_a_model_made_for_another_precision(workdir, models):
    from ernie_lab.errors import MissingArtifactError
    from ernie_lab.inference.backends import create_backend

    with pytest.raises(MissingArtifactError, match="holds no int8 OpenVINO model"):
        create_backend(models["fp32"], peer_cfg(workdir, *OV).runtime, "int8")


def test_cache_is_reused_and_rebuilt_on_a_setting_a_version_or_a_new_export(workdir, exported, models, monkeypatch):
    from ernie_lab.inference import openvino_engine

    path = models["int8"] / "model.xml"
    before = path.stat().st_mtime_ns
    assert ov_model(workdir, exported) == models["int8"] and path.stat().st_mtime_ns == before
    ov_model(workdir, exported, "runtime.int8.smooth_quant_alpha=0.5")  # another setting: another model
    assert path.stat().st_mtime_ns != before
    before = path.stat().st_mtime_ns
    real = openvino_engine.versions()
    monkeypatch.setattr(openvino_engine, "versions", lambda: {**real, "nncf": "0.0.0"})
    ov_model(workdir, exported, "runtime.int8.smooth_quant_alpha=0.5")
    assert path.stat().st_mtime_ns != before
    monkeypatch.undo()
    fp32_xml = models["fp32"] / "model.xml"
    before = fp32_xml.stat().st_mtime_ns
    export_float(workdir)  # a fresh export of the same checkpoint
    ov_model(workdir, exported, precision="fp32")
    assert fp32_xml.stat().st_mtime_ns != before
    manifest = artifacts.read_json(models["fp32"] / artifacts.MANIFEST)
    assert manifest["key"]["source"]["created_at"] == artifacts.read_manifest(exported, "")["created_at"]


def test_fp16_runs_only_where_the_cpu_has_fp16_arithmetic(workdir, exported):
    from ernie_lab.runtime import fp16_arithmetic
    from ernie_lab.tracking import find_runs

    result = run_script("infer.py", *OV, "precision=fp16", *PEER_TINY, tmp=workdir, timeout=300)
    kind = fp16_arithmetic()
    if kind is None:  # OpenVINO would compile f32 and the row would be mislabelled
        assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
        errors = [line for line in result.stdout.splitlines() if "error" in line]
        assert len(errors) == 1 and "needs a CPU with FP16 arithmetic (avx512_fp16 or amx_fp16)" in errors[0], errors
        assert not find_runs(peer_cfg(workdir).tracking, "tags.precision = 'fp16'")
        return
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (run,) = find_runs(peer_cfg(workdir).tracking, "tags.precision = 'fp16'")
    assert run.data.tags["compiled_precision"] == "f16" and run.data.tags["fp16_arithmetic"] == kind


def test_the_compiled_precision_is_read_back_not_assumed(workdir, models):
    from ernie_lab.errors import ConfigError
    from ernie_lab.inference.openvino_engine import OpenVinoBackend
    from ernie_lab.runtime import fp16_arithmetic

    runtime = peer_cfg(workdir, *OV).runtime
    if fp16_arithmetic() is None:
        # the CPU plugin quietly compiles the f16 hint as something else: bf16 on a Zen 4 with AVX512-BF16, else f32
        with pytest.raises(ConfigError, match="at inference precision (f32|bf16), not the f16 that precision=fp16 needs"):
            OpenVinoBackend(models["fp32"], runtime, "fp16")
    else:
        assert OpenVinoBackend(models["fp32"], runtime, "fp16").properties["INFERENCE_PRECISION_HINT"] == "f16"
    assert OpenVinoBackend(models["fp32"], runtime, "fp32").properties["INFERENCE_PRECISION_HINT"] == "f32"


def test_infer_runs_int8_end_to_end(workdir, exported):
    from ernie_lab.tracking import find_runs

    result = run_script("infer.py", *OV, "precision=int8", *PEER_TINY, tmp=workdir, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (run,) = find_runs(peer_cfg(workdir).tracking, "tags.stage = 'infer' and tags.precision = 'int8'")
    tags, metrics = run.data.tags, run.data.metrics
    assert run.info.status == "FINISHED" and tags["runtime"] == "openvino" and tags["runtime_label"] == "openvino ptq"
    assert metrics["perf/qps"] > 0 and metrics["perf/qps_engine"] > 0 and metrics["time/engine_seconds"] > 0
    assert 0 <= metrics["eval/accuracy"] <= 100
    # the roofline: model FLOPs over the engine time, against this CPU's measured int8 GEMM peak
    assert metrics["perf/gflops"] > 0 and 0 < metrics["perf/roofline_pct"] < 100
    assert run.data.params["roofline.peak_used"] == "int8_gflops" and run.data.params["roofline.isa"]
    assert run.data.params["export.dir"].endswith("openvino/none/int8-ptq")


def test_span_head_converts_and_both_outputs_match_paddle(tmp_path):
    """CMRC2018's span head ends with `unstack`, which OpenVINO's Paddle frontend converts only from static
    shapes: the model is converted with a placeholder shape and made dynamic again; start and end logits must
    still be Paddle's, in Paddle's order, at every batch and window length."""
    from ernie_lab.compression.strategy import compress
    from ernie_lab.training import finetune

    overrides = isolated_overrides(tmp_path) + [
        "model=tiny", "task=cmrc2018", "task.data.limit.train=64", "task.data.limit.eval=40", "task.data.heldout_size=32",
        "task.selection_split=heldout", "train.epochs=1", "train.batch_size=16"]
    cfg = make_cfg(overrides)
    run_stage(cfg, "train", finetune)
    run_stage(make_cfg(overrides + ["strategy=none"]), "compress", compress)
    export = artifacts.export_dir(cfg, "none")
    ov_cfg = make_cfg(overrides + OV)
    task = task_for(ov_cfg)
    model_dir = ov_model_for(ov_cfg, task, export)
    assert "static placeholder" in artifacts.read_json(model_dir / artifacts.MANIFEST)["conversion"]
    features = task.featurize(task.load("eval"), training=False)
    feeds = [task.collate(features[i : i + 32]) for i in range(0, len(features), 32)]
    from ernie_lab.inference.engine import measure_isolated

    outputs = {}
    for name, directory, runtime in (("paddle", export, cfg.runtime), ("openvino", model_dir, ov_cfg.runtime)):
        outputs[name] = measure_isolated(directory, OmegaConf.to_container(runtime, resolve=True), "fp32", feeds, 0, 1)["outputs"]
    for paddle_batch, ov_batch in zip(outputs["paddle"], outputs["openvino"]):
        assert len(paddle_batch) == len(ov_batch) == 2
        for paddle, openvino in zip(paddle_batch, ov_batch):
            assert paddle.shape == openvino.shape and np.abs(paddle - openvino).max() < 1e-3


def ov_model_for(cfg, task, export_dir):
    from ernie_lab.inference.openvino_engine import prepare_model

    return prepare_model(cfg, task, export_dir, "fp32")


def test_accuracy_control_keeps_the_heldout_metric_of_the_float_model(workdir, exported, models):
    import openvino as ov

    from ernie_lab.inference.openvino_engine import HeldoutValidation

    # 32 held-out examples after the 32 calibration ones; max_drop 0.01 point: no example may flip
    extra = ["runtime.int8_mode=accuracy_control", "runtime.int8.accuracy_control.samples=32",
             "runtime.int8.accuracy_control.max_drop=0.01"]
    model_dir = ov_model(workdir, exported, *extra)
    assert model_dir.name == "int8-accuracy_control" and model_dir != models["int8"]
    notes = artifacts.read_json(model_dir / artifacts.MANIFEST)["accuracy_control"]
    cfg = peer_cfg(workdir, *OV, *extra)
    validation = HeldoutValidation(cfg, task_for(cfg), skip=32)
    assert len(validation.examples) == 32

    def score(directory):
        compiled = ov.Core().compile_model(str(directory / "model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        return validation(compiled, validation.items)[0]

    float_score, ptq_score, controlled = score(models["fp32"]), score(models["int8"]), score(model_dir)
    assert notes["heldout_metric_float"] == pytest.approx(float_score)
    assert notes["heldout_metric_int8"] == pytest.approx(controlled) and notes["heldout_examples"] == 32
    assert controlled >= float_score - 0.01
    quantizers = op_counts(model_dir)["FakeQuantize"]
    assert quantizers == notes["fake_quantize_nodes"]
    if ptq_score < float_score - 0.01:  # plain PTQ lost examples: some layers had to go back to float
        assert quantizers < op_counts(models["int8"])["FakeQuantize"]
    else:
        assert quantizers == op_counts(models["int8"])["FakeQuantize"]
