"""The roofline figures: the FLOP formula against hand computations, the ISA naming, the per-machine peak cache,
and the percentage a run logs."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from ernie_lab.runtime import has_bf16
from ernie_lab.inference import roofline

MEDIUM = OmegaConf.create({"hidden_size": 768, "num_hidden_layers": 6, "num_attention_heads": 12,
                           "intermediate_size": 3072})


def tnews_like(labels=15):
    return SimpleNamespace(head_config=lambda: {"num_labels": labels}, output_names=("logits",),
                           per_token_outputs=False)


def test_medium_flops_match_the_hand_computation():
    shapes = roofline.model_shapes(MEDIUM, {}, tnews_like())
    # per layer at 36 tokens: QKV 2*36*768*2304 + QK^T and PV 4*36*36*768 + output 2*36*768*768 + FFN 4*36*768*3072
    #   = 127401984 + 3981312 + 42467328 + 339738624 = 513589248; 6 layers = 3081535488;
    # pooler 2*768*768 + classifier 2*768*15 = 1202688
    assert roofline.encoder_flops(shapes, 36) == 3_082_738_176
    # the "~85 MFLOP per token, ~3.1 GFLOP per title"
    assert 85e6 < roofline.encoder_flops(shapes, 36) / 36 < 86e6


def test_pruned_shapes_come_from_the_manifest():
    pruning = {"heads_per_layer": [8] * 6, "head_size": 64, "ffn_per_layer": [2048] * 6}
    shapes = roofline.model_shapes(MEDIUM, {"pruning": pruning}, tnews_like())
    # per layer: 2*36*768*1536 + 4*36*36*512 + 2*36*512*768 + 4*36*768*2048 = 342392832; x6 + 1202688
    assert roofline.encoder_flops(shapes, 36) == 2_055_559_680


def test_per_token_heads_and_a_pass_over_padded_batches():
    task = SimpleNamespace(head_config=lambda: {}, output_names=("start_logits", "end_logits"), per_token_outputs=True)
    tiny = OmegaConf.create({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128})
    shapes = roofline.model_shapes(tiny, {}, task)
    # L=10: per layer 2*10*64*192 + 4*10*10*64 + 2*10*64*64 + 4*10*64*128 = 245760+25600+81920+327680 = 680960;
    # x2 + span head 2*10*64*2 = 2560
    assert roofline.encoder_flops(shapes, 10) == 1_364_480
    assert roofline.pass_flops(shapes, [(3, 10), (1, 10)]) == 4 * 1_364_480


def test_isa_names():
    assert roofline.isa_name({"avx2", "fma"}) == "AVX2"
    assert roofline.isa_name({"avx2", "avx512f"}) == "AVX-512"
    assert roofline.isa_name({"avx2", "avx512f", "avx512_vnni"}) == "AVX-512 VNNI"
    assert roofline.isa_name({"avx2", "avx_vnni"}) == "AVX2 + AVX-VNNI"
    assert roofline.isa_name({"avx512f", "avx512_vnni", "amx_int8", "amx_bf16"}) == "AMX"


def test_run_metrics_divide_by_the_precisions_peak():
    shapes = roofline.model_shapes(MEDIUM, {}, tnews_like())
    peak = {"isa": "AVX2", "threads": 2, "fp32_gflops": 100.0, "int8_gflops": 200.0}
    # 10 titles of 36 tokens at 10 titles/s of engine time: 30.83 GFLOP/s
    metrics, params = roofline.run_metrics(shapes, [(10, 36)], 10, 10, 10.0, "fp32", peak)
    assert metrics["perf/gflops"] == pytest.approx(30.82738176)
    assert metrics["perf/roofline_pct"] == pytest.approx(30.82738176)
    assert params["roofline.isa"] == "AVX2" and params["roofline.peak_used"] == "fp32_gflops"
    metrics, _ = roofline.run_metrics(shapes, [(10, 36)], 10, 10, 10.0, "int8", peak)
    assert metrics["perf/roofline_pct"] == pytest.approx(30.82738176 / 2)
    assert "roofline.warning" not in params
    _, params = roofline.run_metrics(shapes, [(10, 36)], 10, 10, 10.0, "fp32", {**peak, "fp32_gflops": 20.0,
                                                                               "measured_at": "then"})
    assert "busy CPU" in params["roofline.warning"]
    # a CPU without bf16 GEMMs has no bf16 peak: the run logs GFLOP/s, no percentage
    metrics, _ = roofline.run_metrics(shapes, [(10, 36)], 10, 10, 10.0, "bf16", peak)
    assert "perf/roofline_pct" not in metrics and metrics["perf/gflops"] > 0
    metrics, params = roofline.run_metrics(shapes, [(10, 36)], 10, 10, 10.0, "bf16", {**peak, "bf16_gflops": 400.0})
    assert metrics["perf/roofline_pct"] == pytest.approx(30.82738176 / 4)
    assert params["roofline.peak_used"] == "bf16_gflops"
    # the engine whose GEMM set the peak is logged with the run
    _, params = roofline.run_metrics(shapes, [(10, 36)], 10, 10, 10.0, "int8",
                                     {**peak, "int8_source": "openvino: openvino MatMul on FakeQuantize'd u8 x i8"})
    assert params["roofline.peak_source"].startswith("openvino") and params["roofline.int8_source"]


def test_peak_probe_runs_once_per_machine_and_is_cached(tmp_path):
    cache = tmp_path / "peaks.json"
    runtime = {"name": "cpu", "device": "cpu", "threads": 1, "flush_denormals": False}
    found = roofline.peaks(runtime, cache, seconds=0.05)
    assert found["isa"] == roofline.isa_name(roofline.cpu_flag_set())
    assert found["fp32_gflops"] > 0.5 and found["int8_gflops"] > 0.5
    # a bf16 peak only where the CPU has bf16 instructions (elsewhere OpenVINO would measure fp32 under its name)
    assert ("bf16_gflops" in found) == has_bf16()
    # each precision's peak is the fastest GEMM of the engines that run it here, and names that engine
    for precision, engines in (("fp32", {"numpy", "paddle", "paddle_inference", "onnxruntime", "openvino"}),
                               ("int8", {"onnxruntime", "openvino"}),
                               *((("bf16", {"paddle_inference", "openvino"}),) if has_bf16() else ())):
        rates = {e: found[f"{precision}_{e}_gflops"] for e in engines}
        best = max(rates, key=rates.get)
        assert found[f"{precision}_gflops"] == rates[best]
        assert found[f"{precision}_source"].startswith(f"{best}: ")
    stored = json.loads(cache.read_text())
    assert list(stored) == [roofline.machine_key(1)]
    # a cached entry is used as it is, without probing again
    stored[roofline.machine_key(1)]["fp32_gflops"] = 12345.0
    cache.write_text(json.dumps(stored))
    assert roofline.peaks(runtime, cache)["fp32_gflops"] == 12345.0


@pytest.mark.skipif(not has_bf16(), reason="this CPU has no AVX512-BF16 / AMX-BF16")
def test_bf16_probe_runs_bf16_arithmetic():
    """The probe's GEMM really runs in bf16: its result carries bf16's rounding (8-bit mantissa), which an fp32
    GEMM mislabelled as bf16 would not."""
    import numpy as np

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((256, 256), dtype=np.float32) for _ in range(2))
    assert roofline._openvino_bf16_rate(a, b, 1, 0.05) > 0
    error = np.abs(roofline._openvino_bf16_matmul(b, 1)(a) - a @ b).max() / np.abs(a @ b).max()
    assert 1e-4 < error < 2e-2


def fast_probe(runtime, seconds):
    return {("fp32", "fast"): 300.0, ("int8", "fast"): 900.0}, {"fast bf16": "no bf16 here"}


def slow_probe(runtime, seconds):
    return {("fp32", "slow"): 100.0, ("int8", "slow"): 1200.0, ("bf16", "slow"): 50.0}, {}


def crashing_probe(runtime, seconds):
    import ctypes

    ctypes.string_at(0)


def missing_probe(runtime, seconds):
    import engine_that_is_not_installed  # noqa: F401


def test_each_peak_is_the_fastest_engine_and_a_crashing_or_missing_engine_is_skipped(monkeypatch):
    monkeypatch.setattr(roofline, "PROBES", {"fast": fast_probe, "crashes": crashing_probe, "slow": slow_probe,
                                             "missing": missing_probe})
    found = roofline.probe_all({"threads": 1}, 0.01)
    assert found["fp32_gflops"] == 300.0 and found["fp32_source"].startswith("fast")
    assert found["int8_gflops"] == 1200.0 and found["int8_source"].startswith("slow")
    assert found["bf16_gflops"] == 50.0 and found["fp32_slow_gflops"] == 100.0
    skipped = found["probe_skipped"]
    assert "SIGSEGV" in skipped["crashes"] and "not installed" in skipped["missing"]
    assert skipped["fast bf16"] == "no bf16 here"


def test_openvino_int8_probe_runs_an_int8_gemm():
    """OpenVINO's int8 probe compiles to an integer FullyConnected (u8 activations), not an fp32 MatMul."""
    import numpy as np

    compiled = []
    matmul = roofline._openvino_int8_matmul(128, 1, compiled)
    assert matmul(np.ones((128, 128), dtype=np.float32)).shape == (128, 128)
    precisions = {(op.get_rt_info()["layerType"].astype(str), op.get_rt_info()["runtimePrecision"].astype(str))
                  for op in compiled[0].get_runtime_model().get_ops()}
    assert ("FullyConnected", "u8") in precisions or ("MatMul", "u8") in precisions, precisions


def paddle_inference_rounding(size: int) -> dict:
    """In a child: whether Paddle Inference's fc GEMM carries bf16 rounding at fp32 and at bf16."""
    import tempfile

    import numpy as np

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size), dtype=np.float32) for _ in range(2))
    ref = (a @ b) @ b
    with tempfile.TemporaryDirectory() as tmp:
        return {precision: roofline.is_bf16_rounded(roofline._paddle_inference_gemm(tmp, a, b, 1, bf16)[0](), ref)
                for precision, bf16 in (("fp32", False), ("bf16", True))}


@pytest.mark.skipif(not has_bf16(), reason="this CPU has no AVX512-BF16 / AMX-BF16")
def test_paddle_inference_bf16_probe_runs_bf16_arithmetic():
    from ernie_lab.inference.engine import run_in_child

    rounded = run_in_child(paddle_inference_rounding, (256,), engine="paddle", precision="bf16", model="probe")
    assert rounded == {"fp32": False, "bf16": True}


def test_a_run_faster_than_the_cached_peak_probes_again_and_peaks_only_rise(monkeypatch, tmp_path):
    """A cached peak probed while the cores were busy reads low; a model that runs faster than it proves it so. The
    run re-probes once, keeps each engine's faster rate, and reads at most 100% when the new probe is right."""
    cache = tmp_path / "peaks.json"
    key = roofline.machine_key(1)
    busy = {"isa": "test", "threads": 1, "gemm_size": 1024, "measured_at": "2000-01-01T00:00:00+00:00",
            "fp32_fast_gflops": 300.0, "int8_fast_gflops": 400.0, "int8_slow_gflops": 100.0}
    cache.write_text(json.dumps({key: {**busy, **roofline.best_of(busy)}}))
    monkeypatch.setattr(roofline, "PROBES", {"fast": fast_probe, "slow": slow_probe})  # int8: fast 900, slow 1200
    cfg = OmegaConf.create({"benchmark": {"roofline": {"enabled": True, "cache_file": str(cache), "probe_seconds": 0.01}},
                            "runtime": {"name": "cpu", "device": "cpu", "threads": 1}, "precision": {"name": "int8"},
                            "model": {**MEDIUM, "num_hidden_layers": 1}})
    shapes = roofline.model_shapes(cfg.model, {}, tnews_like())
    batch_shapes = [(32, 64)]
    gflop = roofline.pass_flops(shapes, batch_shapes) / 32 / 1e9
    qps_for_800 = 800.0 / gflop  # a run at 800 GFLOP/s: double the cached int8 peak, below the true 1200
    metrics, params = roofline.for_run(cfg, tnews_like(), {}, batch_shapes, 32, 32, qps_for_800)
    assert params["roofline.reprobed"] is True and params["roofline.peak_int8_gflops"] == 1200.0
    assert metrics["perf/roofline_pct"] == pytest.approx(100 * 800 / 1200) and "roofline.warning" not in params
    stored = json.loads(cache.read_text())[key]
    assert stored["int8_fast_gflops"] == 900.0 and stored["fp32_fast_gflops"] == 300.0  # per engine, the faster
    assert stored["int8_source"].startswith("slow")
