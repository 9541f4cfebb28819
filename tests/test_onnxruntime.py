"""runtime=onnxruntime, the peer baseline: a tiny TNEWS model fine-tuned a few epochs, exported, converted to ONNX
and quantized by ONNX Runtime (dynamic and static QDQ). Asserts what a broken conversion or cache would fail:
ONNX fp32 gives Paddle's outputs, the INT8 graphs really hold integer ops and track fp32, infer.py runs it end to
end, a precision ORT cannot run is refused, and the cache is reused until the source export changes."""
from __future__ import annotations

import collections

import numpy as np
import pytest

from ernie_lab import artifacts
from tests.conftest import (PEER_TINY, export_float, isolated_logits, peer_cfg, peer_dev_batches, run_script, task_for,
                            train_and_export_float)

ORT = ["runtime=onnxruntime"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("onnxruntime")


@pytest.fixture(scope="module")
def exported(workdir):
    return train_and_export_float(workdir)


def onnx_model(workdir, export_dir, *extra, precision="int8"):
    from ernie_lab.inference.onnxruntime_engine import ensure_onnx_model

    cfg = peer_cfg(workdir, *ORT, f"precision={precision}", *extra)
    return ensure_onnx_model(cfg, task_for(cfg), export_dir)


@pytest.fixture(scope="module")
def models(workdir, exported):
    return {
        "fp32": onnx_model(workdir, exported, precision="fp32"),
        "int8-dynamic": onnx_model(workdir, exported, "runtime.int8_mode=dynamic"),
        "int8-static": onnx_model(workdir, exported, "runtime.int8_mode=static"),
    }


@pytest.fixture(scope="module")
def dev_feeds(workdir):
    return peer_dev_batches(workdir)


def op_counts(model_dir):
    import onnx

    return collections.Counter(n.op_type for n in onnx.load(str(model_dir / "model.onnx")).graph.node)


def test_onnx_fp32_matches_paddle_fp32(workdir, exported, models, dev_feeds):
    paddle = isolated_logits(exported, peer_cfg(workdir).runtime, "fp32", dev_feeds)
    onnx = isolated_logits(models["fp32"], peer_cfg(workdir, *ORT).runtime, "fp32", dev_feeds)
    assert paddle.shape == onnx.shape == (250, 15)
    assert np.abs(paddle - onnx).max() < 1e-4


def test_weights_are_initializers_and_dynamic_int8_quantizes_the_matmuls(models):
    import onnx

    fp32 = onnx.load(str(models["fp32"] / "model.onnx")).graph
    assert len(fp32.initializer) > 20 and not [n for n in fp32.node if n.op_type == "Constant"]
    assert [d.dim_param for d in fp32.input[0].type.tensor_type.shape.dim] == ["batch", "seq"]
    ops = op_counts(models["int8-dynamic"])
    # 2 layers x (q, k, v, out, ffn1, ffn2) + pooler + classifier; attention's QK^T and P.V stay float
    assert ops["MatMulInteger"] == 14 and ops["MatMul"] == 4 and ops["DynamicQuantizeLinear"] > 0


def test_int8_models_agree_with_fp32(workdir, models, dev_feeds):
    runtime = peer_cfg(workdir, *ORT).runtime
    ops = op_counts(models["int8-static"])
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
    reference = isolated_logits(models["fp32"], runtime, "fp32", dev_feeds).argmax(1)
    for variant in ("int8-static", "int8-dynamic"):
        agreement = np.mean(isolated_logits(models[variant], runtime, "int8", dev_feeds).argmax(1) == reference)
        assert agreement >= 0.9, (variant, agreement)


def test_int8_on_onnxruntime_starts_from_the_float_export(workdir, exported):
    from ernie_lab.errors import ConfigError
    from ernie_lab.artifacts import resolve_export

    directory, manifest = resolve_export(peer_cfg(workdir, *ORT, "precision=int8"))
    assert directory == exported and manifest["weights"] == "float"
    with pytest.raises(ConfigError, match="quantizes the float export itself"):
        resolve_export(peer_cfg(workdir, *ORT, "precision=int8", "strategy=ptq"))


def test_backend_refuses_a_model_made_for_another_precision(workdir, models):
    from ernie_lab.errors import MissingArtifactError
    from ernie_lab.inference.backends import create_backend

    with pytest.raises(MissingArtifactError, match="holds no int8 ONNX model"):
        create_backend(models["fp32"], peer_cfg(workdir, *ORT).runtime, "int8")


def test_onnx_cache_is_reused_and_rebuilt_when_the_export_changes(workdir, exported, models):
    path = models["int8-dynamic"] / "model.onnx"
    before = path.stat().st_mtime_ns
    assert onnx_model(workdir, exported, "runtime.int8_mode=dynamic") == models["int8-dynamic"]
    assert path.stat().st_mtime_ns == before
    # another setting is another model: rebuilt, not served from the cache
    onnx_model(workdir, exported, "runtime.int8_mode=dynamic", "runtime.int8.per_channel=false")
    assert path.stat().st_mtime_ns != before
    before = path.stat().st_mtime_ns
    export_float(workdir)  # a fresh export of the same checkpoint
    onnx_model(workdir, exported, "runtime.int8_mode=dynamic", "runtime.int8.per_channel=false")
    assert path.stat().st_mtime_ns != before
    manifest = artifacts.read_json(models["int8-dynamic"] / artifacts.MANIFEST)
    assert manifest["key"]["source"]["created_at"] == artifacts.read_manifest(exported, "")["created_at"]


def test_bf16_on_onnxruntime_is_refused_in_one_line(workdir):
    result = run_script("infer.py", *ORT, "precision=bf16", *PEER_TINY, tmp=workdir, timeout=120)
    assert result.returncode == 2
    errors = [line for line in result.stdout.splitlines() if "error" in line]
    assert len(errors) == 1 and "valid there: fp32, int8" in errors[0], result.stdout[-2000:]


def test_infer_runs_static_int8_end_to_end(workdir, exported):
    from ernie_lab.tracking import find_runs

    result = run_script("infer.py", *ORT, "precision=int8", "runtime.int8_mode=static", *PEER_TINY, tmp=workdir, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (run,) = find_runs(peer_cfg(workdir).tracking, "tags.stage = 'infer' and tags.precision = 'int8'")
    assert run.info.status == "FINISHED" and run.data.tags["runtime"] == "onnxruntime"
    assert run.data.metrics["perf/qps"] > 0 and 0 <= run.data.metrics["eval/accuracy"] <= 100
    assert run.data.params["export.dir"].endswith("onnx/none/int8-static")
