"""runtime=gpu on a machine without a GPU: the config composes for every GPU precision, a CPU-only paddle is
refused before any work, the TensorRT settings are chosen as designed (checked as plain values), and the
dynamic shape ranges TensorRT is built with are the real ones of the batches (collected here on the CPU)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from ernie_lab.errors import ConfigError
from ernie_lab.inference import paddle_engine
from ernie_lab.inference.backends import create_backend
from ernie_lab.runtime import check_precision
from tests.conftest import isolated_overrides, make_cfg, run_script

GPU_PRECISIONS = ("fp32", "fp16", "int8")


def cuda_build() -> bool:
    import paddle

    return paddle.device.is_compiled_with_cuda()


@pytest.mark.parametrize("precision", GPU_PRECISIONS)
def test_runtime_gpu_composes_with_every_gpu_precision(precision):
    cfg = make_cfg(["runtime=gpu", f"precision={precision}"])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["runtime"]["device"] == "gpu" and precision in resolved["runtime"]["precisions"]
    assert resolved["runtime"]["tensorrt"]["cache_dir"].endswith("/trt_cache")


def test_bf16_on_gpu_is_refused_naming_the_gpu_precisions():
    cfg = make_cfg(["runtime=gpu"])
    with pytest.raises(ConfigError, match="bf16.*fp32, fp16, int8"):
        check_precision(cfg.runtime, "bf16")


def test_int8_without_tensorrt_is_refused():
    cfg = make_cfg(["runtime=gpu", "runtime.tensorrt.enabled=false"])
    with pytest.raises(ConfigError, match="tensorrt.enabled=true.*fp32, fp16"):
        check_precision(cfg.runtime, "int8")


@pytest.mark.skipif(cuda_build(), reason="checks the refusal on a CPU-only paddle")
@pytest.mark.parametrize("precision", GPU_PRECISIONS)
def test_cpu_only_paddle_is_refused_with_the_setup_command(precision):
    cfg = make_cfg(["runtime=gpu"])
    with pytest.raises(ConfigError, match=r"make setup DEVICE=gpu"):
        check_precision(cfg.runtime, precision)


@pytest.mark.skipif(cuda_build(), reason="checks the refusal on a CPU-only paddle")
def test_infer_on_runtime_gpu_fails_before_loading_anything(tmp_path):
    """No export exists here: had infer.py looked for the model first, it would name `compress.py` instead."""
    result = run_script("infer.py", "model=tiny", "runtime=gpu", "precision=fp16", tmp=tmp_path, timeout=300)
    out = result.stdout + result.stderr
    assert result.returncode == 2, out[-3000:]
    assert "make setup DEVICE=gpu" in result.stdout and "paddlepaddle-gpu" in result.stdout
    assert "compress.py" not in out and "Traceback" not in out
    assert not (tmp_path / "artifacts").exists()


# ---- TensorRT settings, as plain values ----------------------------------------------------------------------


@pytest.fixture
def fake_export(tmp_path):
    """Just the two files whose size and mtime key the engine cache (their content is never read here)."""
    model_dir = tmp_path / "tiny" / "random" / "tnews" / "export" / "ptq"
    model_dir.mkdir(parents=True)
    (model_dir / paddle_engine.MODEL_FILE).write_bytes(b"program")
    (model_dir / paddle_engine.PARAMS_FILE).write_bytes(b"weights")
    return model_dir


def gpu_runtime(tmp_path, *overrides):
    return make_cfg(isolated_overrides(tmp_path) + ["runtime=gpu", *overrides]).runtime


@pytest.mark.parametrize("precision, mode", [("fp32", "Float32"), ("fp16", "Half"), ("int8", "Int8")])
def test_tensorrt_plan_per_precision(tmp_path, fake_export, precision, mode):
    runtime = gpu_runtime(tmp_path, "runtime.tensorrt.workspace_mb=512", "runtime.gpu_id=1")
    plan = paddle_engine.gpu_plan(fake_export, runtime, precision, max_batch_size=32, device_tag="H100|8.6.1|2.6.2")
    trt = plan["tensorrt"]
    assert plan["gpu_id"] == 1 and plan["gpu_memory_mb"] == 1024 and plan["gpu_precision"] == "Float32"
    assert trt["precision_mode"] == mode and trt["max_batch_size"] == 32 and trt["min_subgraph_size"] == 5
    assert trt["workspace_size"] == 512 * 2**20
    assert trt["use_static"] is True and trt["use_calib_mode"] is False  # INT8 scales come from the PTQ model
    cache = trt["cache_dir"]
    assert cache.startswith(str(tmp_path / "artifacts" / "trt_cache") + os.sep)
    assert os.path.basename(cache).startswith(f"tnews-ptq-{precision}-")
    assert trt["shape_file"] == os.path.join(cache, "shape_range_info.pbtxt")


def test_engine_cache_is_unique_per_model_precision_device_and_export(tmp_path, fake_export):
    runtime = gpu_runtime(tmp_path)

    def cache(model_dir=fake_export, precision="fp16", device="A"):
        return paddle_engine.gpu_plan(model_dir, runtime, precision, 32, device)["tensorrt"]["cache_dir"]

    other = fake_export.parent / "none"
    other.mkdir()
    for name in (paddle_engine.MODEL_FILE, paddle_engine.PARAMS_FILE):
        (other / name).write_bytes((fake_export / name).read_bytes())
    first = cache()
    assert first == cache()
    assert len({first, cache(precision="int8"), cache(device="B"), cache(model_dir=other)}) == 4
    (fake_export / paddle_engine.PARAMS_FILE).write_bytes(b"re-exported weights")  # Paddle would reuse a stale engine
    assert cache() != first


def test_without_tensorrt_fp16_uses_paddles_gpu_half_and_int8_is_refused(tmp_path, fake_export):
    runtime = gpu_runtime(tmp_path, "runtime.tensorrt.enabled=false")
    assert paddle_engine.gpu_plan(fake_export, runtime, "fp16", 32) == {
        "gpu_id": 0, "gpu_memory_mb": 1024, "gpu_precision": "Half", "tensorrt": None,
    }
    assert paddle_engine.gpu_plan(fake_export, runtime, "fp32", 32)["gpu_precision"] == "Float32"
    with pytest.raises(ConfigError, match="int8.*tensorrt.enabled=true"):
        paddle_engine.gpu_plan(fake_export, runtime, "int8", 32)
    with pytest.raises(ConfigError, match="bf16.*fp32, fp16, int8"):
        paddle_engine.gpu_plan(fake_export, runtime, "bf16", 32)


class RecordingConfig:
    """Stands in for paddle.inference.Config: records each call as (method, args, kwargs)."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, method):
        return lambda *args, **kwargs: self.calls.append((method, args, kwargs))


def test_plan_becomes_these_paddle_calls(tmp_path, fake_export):
    from paddle.inference import PrecisionType

    plan = paddle_engine.gpu_plan(fake_export, gpu_runtime(tmp_path), "int8", 32, "A")
    config = RecordingConfig()
    paddle_engine._configure_gpu(config, plan)
    calls = {method: (args, kwargs) for method, args, kwargs in config.calls}
    assert calls["enable_use_gpu"][0] == (1024, 0, PrecisionType.Float32)
    assert calls["enable_tensorrt_engine"][1] == {
        "workspace_size": 1024 * 2**20, "max_batch_size": 32, "min_subgraph_size": 5,
        "precision_mode": PrecisionType.Int8, "use_static": True, "use_calib_mode": False,
    }
    assert calls["set_optim_cache_dir"][0] == (plan["tensorrt"]["cache_dir"],)
    assert calls["enable_tuned_tensorrt_dynamic_shape"][0] == (plan["tensorrt"]["shape_file"], True)

    config = RecordingConfig()
    no_trt = paddle_engine.gpu_plan(fake_export, gpu_runtime(tmp_path, "runtime.tensorrt.enabled=false"), "fp16", 32)
    paddle_engine._configure_gpu(config, no_trt)
    assert config.calls == [("enable_use_gpu", (1024, 0, PrecisionType.Half), {})]


# ---- dynamic shape ranges from real batches (collected on the CPU: Paddle records them the same way) ---------


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """A random-init tiny ERNIE for TNEWS exported to a static model, and real dev batches of varied length."""
    from ernie_lab import runtime
    from ernie_lab.compression.export import export_static
    from ernie_lab.modeling import build_model, build_tokenizer
    from ernie_lab.tasks import build_task

    cfg = make_cfg(["model=tiny"])
    runtime.prepare(cfg.runtime)
    task = build_task(cfg.task, build_tokenizer(cfg.model))
    model_dir = tmp_path_factory.mktemp("gpu") / "tiny" / "random" / "tnews" / "export" / "none"
    model_dir.mkdir(parents=True)
    export_static(build_model(cfg.model, task.model_class(), task.head_config()), model_dir)
    features = task.featurize(task.load("eval")[:200], training=False)
    batches = [task.collate(features[i : i + 32]) for i in range(0, len(features), 32)]  # the last one holds 8
    return model_dir, batches


def test_collected_shape_file_holds_the_real_batch_and_sequence_ranges(tmp_path, tiny_export):
    model_dir, batches = tiny_export
    seq_lens = [b["input_ids"].shape[1] for b in batches]
    assert len(set(seq_lens)) > 1, "the batches should differ in length for this test to mean anything"
    shape_file = tmp_path / "shapes.pbtxt"
    paddle_engine.collect_shape_ranges(model_dir, batches, shape_file, gpu=None)
    recorded = paddle_engine.read_shape_ranges(shape_file)
    for name in ("input_ids", "token_type_ids"):
        assert recorded[name] == ([8, min(seq_lens)], [32, max(seq_lens)])
    assert paddle_engine.batch_shape_ranges(batches)["input_ids"] == recorded["input_ids"]
    assert len(recorded) > 50  # every intermediate tensor too, which is what TensorRT's subgraphs need


def test_shape_file_is_reused_when_it_covers_the_batches_and_recollected_when_not(tmp_path, tiny_export):
    model_dir, batches = tiny_export
    runtime = gpu_runtime(tmp_path)
    trt = paddle_engine.gpu_plan(model_dir, runtime, "fp16", 32, "A")["tensorrt"]
    shape_file = Path(trt["shape_file"])
    assert paddle_engine.ensure_shape_file(model_dir, trt, batches, gpu=None) is False
    engine = Path(trt["cache_dir"]) / "_opt_cache" / "engine"  # stands in for a serialized engine
    engine.parent.mkdir()
    engine.write_bytes(b"built for the recorded ranges")

    assert paddle_engine.ensure_shape_file(model_dir, trt, batches[1:3], gpu=None) is True
    assert engine.exists()

    longer = {name: np.pad(a, ((0, 0), (0, 7))) for name, a in batches[0].items()}
    max_len = longer["input_ids"].shape[1]
    assert max_len > paddle_engine.read_shape_ranges(shape_file)["input_ids"][1][1]
    assert paddle_engine.ensure_shape_file(model_dir, trt, [longer, *batches], gpu=None) is False
    assert not engine.exists()  # an engine built for the old ranges must not be reused
    assert paddle_engine.read_shape_ranges(shape_file)["input_ids"][1] == [32, max_len]


def test_cpu_backend_takes_the_sample_batches_and_ignores_them(tiny_export):
    model_dir, batches = tiny_export
    backend = create_backend(model_dir, make_cfg(["model=tiny"]).runtime, "fp32", batches)
    (logits,) = backend.run(batches[-1])
    assert logits.shape == (8, 15)
