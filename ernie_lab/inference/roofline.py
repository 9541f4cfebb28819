"""How close a benchmark run comes to this CPU's arithmetic peak.

- `encoder_flops`: the model's FLOPs for one sequence of a (padded) length, from its shapes: every matmul counted
  as 2 * m * n * k (a multiply and an add), nothing else (embeddings, LayerNorm, softmax, GELU and the residual
  adds are element-wise: < 2% of an ERNIE layer at the lengths benchmarked here).
- `peaks`: the CPU's measured GEMM peak per precision at the run's thread count: the fastest 1024^3 GEMM of the
  engines that run that precision here, each probed in a fresh process of its own (fp32: numpy's BLAS, Paddle's
  eager matmul, Paddle Inference's oneDNN fc, ONNX Runtime, OpenVINO; int8: ONNX Runtime's MatMulInteger u8 x s8
  and OpenVINO's int8 FullyConnected; bf16, on CPUs with AVX512-BF16 or AMX-BF16 only and only where the result
  carries bf16 rounding: Paddle Inference's oneDNN fc with bfloat16 and OpenVINO's MatMul at bf16). A run can
  then not read above 100% because its engine is faster than the one probed. An engine that is not installed,
  crashes, or cannot run a precision here is skipped (`probe_skipped`). Run once per machine and cached in a small
  JSON keyed by CPU model, flags, threads and PROBE_VERSION, with the instruction set found (AVX2 / VNNI / AMX)
  and the engine that gave each peak (`<precision>_source`, logged as `roofline.peak_source`).

A run logs `perf/gflops` (model FLOPs of a pass over the timed engine time; INT8 "FLOPs" are the same
multiply-adds done in 8 bits) and `perf/roofline_pct` (that over the peak for its precision)."""
from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Sequence

from ernie_lab import artifacts
from ernie_lab.runtime import cpu_flag_set

# Which probe measures a precision's peak (a precision without one logs perf/gflops and no roofline percentage).
PEAK_OF = {"fp32": "fp32", "int8": "int8", "bf16": "bf16"}
# Bumped when the probe changes, so that cached peaks are measured again (2: bf16 added; 3: every engine that runs a
# precision here probes it, the peak is the fastest: Paddle Inference's oneDNN fc at fp32/bf16, OpenVINO at
# fp32/int8/bf16, ONNX Runtime at fp32/int8).
PROBE_VERSION = 3


# ---- FLOPs ----------------------------------------------------------------------------------------------------
def model_shapes(model_cfg, manifest: dict, task) -> dict:
    """hidden, per-layer heads x head size and FFN width (pruned exports: from the manifest), and the head."""
    hidden = int(model_cfg.hidden_size)
    layers = int(model_cfg.num_hidden_layers)
    pruning = manifest.get("pruning")
    if pruning:
        heads = list(pruning["heads_per_layer"])
        head_size = int(pruning["head_size"])
        ffn = list(pruning["ffn_per_layer"])
    else:
        heads = [int(model_cfg.num_attention_heads)] * layers
        head_size = hidden // int(model_cfg.num_attention_heads)
        ffn = [int(model_cfg.intermediate_size)] * layers
    outputs = int(task.head_config().get("num_labels", len(task.output_names)))
    return {"hidden": hidden, "heads": heads, "head_size": head_size, "ffn": ffn, "head_outputs": outputs,
            "per_token_head": bool(task.per_token_outputs)}


def encoder_flops(shapes: dict, length: int) -> int:
    """FLOPs of one sequence of `length` tokens (padding included: the engine computes it)."""
    h, n = shapes["hidden"], length
    total = 0
    for heads, ffn in zip(shapes["heads"], shapes["ffn"]):
        width = heads * shapes["head_size"]  # attention width (smaller than hidden after pruning)
        total += 2 * n * h * 3 * width      # Q, K, V projections
        total += 2 * 2 * n * n * width      # Q K^T and P V over all heads
        total += 2 * n * width * h          # attention output projection
        total += 2 * 2 * n * h * ffn        # FFN up and down
    c = shapes["head_outputs"]
    if shapes["per_token_head"]:
        total += 2 * n * h * c              # token classifier / span start-end
    else:
        total += 2 * h * h + 2 * h * c      # pooler on [CLS] + classifier
    return total


def pass_flops(shapes: dict, batch_shapes: Sequence[tuple[int, int]]) -> int:
    """FLOPs of a pass over batches given as (rows, padded length)."""
    return sum(rows * encoder_flops(shapes, length) for rows, length in batch_shapes)


# ---- the CPU's peak ---------------------------------------------------------------------------------------------
def isa_name(flags: set[str]) -> str:
    """The widest matrix/vector instruction set the GEMM kernels can use on this CPU."""
    if flags & {"amx_int8", "amx_bf16"}:
        return "AMX"
    if "avx512_vnni" in flags:
        return "AVX-512 VNNI"
    if "avx512f" in flags:
        return "AVX-512" + (" + AVX-VNNI" if "avx_vnni" in flags else "")
    if "avx_vnni" in flags:
        return "AVX2 + AVX-VNNI"
    if "avx2" in flags:
        return "AVX2"
    return "SSE"


def machine_key(threads: int) -> str:
    from ernie_lab.runtime import cpu_model

    flags = " ".join(sorted(cpu_flag_set()))
    return f"{cpu_model()}|flags:{hashlib.sha256(flags.encode()).hexdigest()[:12]}|threads:{threads}|v{PROBE_VERSION}"


def peaks(runtime: dict, cache_file: Path, seconds: float = 0.5, reprobe: bool = False) -> dict:
    """This machine's GEMM peaks at runtime['threads'] (GFLOP/s per precision, the ISA, the probe's details),
    from `cache_file` when it holds this machine's key, else probed in fresh processes and added to it. `reprobe`:
    probe again and keep, per engine, the faster of the cached and the new rate (a probe on a busy CPU reads low,
    never high), so the peaks only ever rise towards the truth."""
    threads = int(runtime["threads"])
    key = machine_key(threads)
    cached = artifacts.read_json(cache_file) if cache_file.is_file() else {}
    if key in cached and not reprobe:
        return cached[key]
    found = {"isa": isa_name(cpu_flag_set()), "threads": threads, "measured_at": artifacts.now_iso(),
             "gemm_size": GEMM_SIZE, **probe_all(runtime, seconds)}
    if key in cached:
        rates = {k: v for k, v in cached[key].items() if _is_engine_rate(k)}
        for k, v in found.items():
            if _is_engine_rate(k):
                rates[k] = max(v, rates.get(k, 0.0))
        found.update(rates)
        found.update(best_of(rates))
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    latest = artifacts.read_json(cache_file) if cache_file.is_file() else {}
    artifacts.write_json_atomic(cache_file, {**latest, key: found})
    return found


def _is_engine_rate(key: str) -> bool:
    """`fp32_numpy_gflops` and the like: one engine's rate (not a precision's peak, `fp32_gflops`)."""
    return key.endswith("_gflops") and key.split("_")[0] in PEAK_OF and key.count("_") >= 2


def best_of(rates: dict[str, float]) -> dict:
    """Each precision's peak (`<precision>_gflops`) as the fastest of its engines' rates (`<precision>_<engine>
    _gflops`), with the engine that gave it (`<precision>_source`)."""
    out = {}
    for precision in PEAK_OF:
        engines = {k[len(precision) + 1:-len("_gflops")]: v for k, v in rates.items()
                   if k.startswith(f"{precision}_") and _is_engine_rate(k)}
        if engines:
            best = max(engines, key=engines.get)
            out[f"{precision}_gflops"] = engines[best]
            out[f"{precision}_source"] = f"{best}: {SOURCES.get((precision, best), best)}"
    return out


GEMM_SIZE = 1024
# What each (precision, engine) probe runs; a precision's peak is the fastest of its engines here.
SOURCES = {
    ("fp32", "numpy"): "numpy matmul (its BLAS)",
    ("fp32", "paddle"): "paddle.matmul, eager",
    ("fp32", "paddle_inference"): "Paddle Inference, oneDNN fc",
    ("bf16", "paddle_inference"): "Paddle Inference, oneDNN fc with enable_mkldnn_bfloat16",
    ("fp32", "onnxruntime"): "onnxruntime MatMul",
    ("int8", "onnxruntime"): "onnxruntime MatMulInteger u8s8",
    ("fp32", "openvino"): "openvino MatMul, inference precision f32",
    ("bf16", "openvino"): "openvino MatMul, inference precision bf16",
    ("int8", "openvino"): "openvino MatMul on FakeQuantize'd u8 x i8 weights (oneDNN int8 FullyConnected)",
}


def probe_all(runtime: dict, seconds: float) -> dict:
    """Every engine's GEMM rates (`<precision>_<engine>_gflops`), each precision's peak as the fastest of them
    (`<precision>_gflops`) with the engine that gave it (`<precision>_source`), and the engines that could not run
    (`probe_skipped`: not installed, crashed, or no such arithmetic here)."""
    from ernie_lab.errors import EngineCrashed
    from ernie_lab.inference.engine import run_in_child
    from ernie_lab.reporting import console

    rates: dict[tuple[str, str], float] = {}
    skipped: dict[str, str] = {}
    for engine, fn in PROBES.items():
        try:
            got, notes = run_in_child(fn, (runtime, seconds), engine=engine, precision="all",
                                      model=f"{GEMM_SIZE}x{GEMM_SIZE} GEMM probe", what="roofline probe")
        except ImportError as exc:  # the engine is not installed: no figures from it
            skipped[engine] = f"not installed ({exc})"
            continue
        except EngineCrashed as exc:
            skipped[engine] = str(exc)
            console.print(f"[yellow]roofline probe:[/] {exc}")
            continue
        rates.update({(precision, name): rate for (precision, name), rate in got.items()})
        skipped.update(notes)
    out: dict = {f"{precision}_{name}_gflops": rate for (precision, name), rate in sorted(rates.items())}
    out.update(best_of(out))
    if skipped:
        out["probe_skipped"] = skipped
    return out


def _best_rate(run, flops: float, seconds: float) -> float:
    """GFLOP/s of the fastest call of `run` (after one warm-up call) within about `seconds`."""
    run()
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t)
    return flops / best / 1e9


def _operands(size: int = GEMM_SIZE):
    import numpy as np

    rng = np.random.default_rng(0)
    return tuple(rng.standard_normal((size, size), dtype=np.float32) for _ in range(2))


def _prepare(runtime: dict) -> int:
    """In a probe child: thread counts (OMP/MKL), MKL's AMD switch, as the engines' benchmark children run."""
    from omegaconf import OmegaConf

    from ernie_lab import runtime as rt

    rt.prepare(OmegaConf.create(runtime))
    return int(runtime["threads"])


def is_bf16_rounded(out, ref) -> bool:
    """Whether a GEMM's result carries bf16's rounding (8-bit mantissa: ~1e-3 relative), which an fp32 GEMM run
    under bf16's name would not (~1e-6): an engine that quietly ran fp32 must not set the bf16 peak."""
    import numpy as np

    error = float(np.abs(np.asarray(out, dtype=np.float32) - ref).max() / np.abs(ref).max())
    return 1e-4 < error < 2e-2


def _probe_paddle(runtime: dict, seconds: float) -> tuple[dict, dict]:
    """numpy's BLAS and Paddle: eager matmul, and Paddle Inference's oneDNN fc (the kernel its FP32 and BF16
    benchmarks run) at fp32 and, on CPUs with bf16 GEMM instructions, bf16."""
    threads = _prepare(runtime)
    from threadpoolctl import threadpool_limits

    from ernie_lab.runtime import has_bf16

    a, b = _operands()
    flops = 2.0 * GEMM_SIZE**3
    with threadpool_limits(limits=threads):
        rates = {("fp32", "numpy"): _best_rate(lambda: a @ b, flops, seconds)}
        import paddle

        pa, pb = paddle.to_tensor(a), paddle.to_tensor(b)
        rates[("fp32", "paddle")] = _best_rate(lambda: paddle.matmul(pa, pb).numpy(), flops, seconds)
    notes = {}
    predictors = {"fp32": False, **({"bf16": True} if has_bf16() else {})}
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ernie-lab-gemm-") as tmp:
        ref = None
        for precision, bf16 in predictors.items():
            try:
                run, flops_per_call = _paddle_inference_gemm(tmp, a, b, threads, bf16)
                if bf16:
                    ref = (a @ b) @ b if ref is None else ref
                    if not is_bf16_rounded(run(), ref):
                        notes["paddle_inference bf16"] = "oneDNN did not run the GEMM in bf16 (fp32 rounding)"
                        continue
                rates[(precision, "paddle_inference")] = _best_rate(run, flops_per_call, seconds)
            except Exception as exc:  # noqa: BLE001 - this engine cannot run the precision here: no figure from it
                notes[f"paddle_inference {precision}"] = f"{type(exc).__name__}: {exc}"[:500]
    return rates, notes


def _paddle_inference_gemm(tmp: str, a, b, threads: int, bf16: bool):
    """Two chained fc layers (x @ b + 0) @ b + 0 as a saved inference model, run by a Paddle Inference predictor with
    oneDNN (bf16: enable_mkldnn_bfloat16; one fc alone stays fp32: oneDNN's bf16 placement drops isolated ops).
    Returns (call -> output, FLOPs per call)."""
    import os

    import numpy as np
    import paddle
    from paddle import inference

    prefix = os.path.join(tmp, "gemm")
    if not os.path.exists(prefix + ".pdmodel"):
        paddle.enable_static()
        main, startup = paddle.static.Program(), paddle.static.Program()
        with paddle.static.program_guard(main, startup):
            x = paddle.static.data("x", list(a.shape), "float32")
            h = x
            for i in range(2):
                w = paddle.create_parameter(list(b.shape), "float32", name=f"w{i}",
                                            default_initializer=paddle.nn.initializer.Assign(b))
                bias = paddle.create_parameter([b.shape[1]], "float32", name=f"b{i}",
                                               default_initializer=paddle.nn.initializer.Constant(0.0))
                h = paddle.matmul(h, w) + bias
        exe = paddle.static.Executor(paddle.CPUPlace())
        exe.run(startup)
        paddle.static.save_inference_model(prefix, [x], [h], exe, program=main)
        paddle.disable_static()
    config = inference.Config(prefix + ".pdmodel", prefix + ".pdiparams")
    config.disable_gpu()
    config.enable_mkldnn()
    config.set_cpu_math_library_num_threads(threads)
    if bf16:
        config.enable_mkldnn_bfloat16()
    config.disable_glog_info()
    predictor = inference.create_predictor(config)
    feed = predictor.get_input_handle(predictor.get_input_names()[0])
    fetch = predictor.get_output_handle(predictor.get_output_names()[0])
    x_in = np.ascontiguousarray(a)

    def run():
        feed.copy_from_cpu(x_in)
        predictor.run()
        return fetch.copy_to_cpu()

    return run, 2 * 2.0 * a.shape[0] * a.shape[1] * b.shape[1]


def _probe_onnxruntime(runtime: dict, seconds: float) -> tuple[dict, dict]:
    threads = _prepare(runtime)
    import onnxruntime  # noqa: F401 - not installed: ImportError, the engine is skipped

    a, b = _operands()
    rates = {("int8", "onnxruntime"): _ort_int8_rate(GEMM_SIZE, threads, seconds)}
    session = _ort_session(_ort_fp32_model(b), threads)
    rates[("fp32", "onnxruntime")] = _best_rate(lambda: session.run(None, {"a": a}), 2.0 * GEMM_SIZE**3, seconds)
    return rates, {}


def _probe_openvino(runtime: dict, seconds: float) -> tuple[dict, dict]:
    threads = _prepare(runtime)
    import openvino  # noqa: F401 - not installed: ImportError, the engine is skipped

    from ernie_lab.runtime import has_bf16

    a, b = _operands()
    flops = 2.0 * GEMM_SIZE**3
    f32 = _openvino_matmul(b, threads, "f32")
    rates = {("fp32", "openvino"): _best_rate(lambda: f32(a), flops, seconds)}
    int8 = _openvino_int8_matmul(GEMM_SIZE, threads)
    x8 = a.clip(-4, 4)
    rates[("int8", "openvino")] = _best_rate(lambda: int8(x8), flops, seconds)
    notes = {}
    # elsewhere OpenVINO would quietly run the "bf16" MatMul in fp32, and the peak would be fp32's
    if has_bf16():
        bf16 = _openvino_matmul(b, threads, "bf16")
        if is_bf16_rounded(bf16(a), a @ b):
            rates[("bf16", "openvino")] = _best_rate(lambda: bf16(a), flops, seconds)
        else:
            notes["openvino bf16"] = "the CPU plugin did not run the GEMM in bf16 (fp32 rounding)"
    return rates, notes


# The probes, one child process per engine: one engine's crash (issue #20) or absence costs only its own figures.
PROBES = {"paddle": _probe_paddle, "onnxruntime": _probe_onnxruntime, "openvino": _probe_openvino}


def _openvino_matmul(b, threads: int, precision: str = "bf16"):
    """x -> x @ b as OpenVINO's CPU plugin runs it with `precision` as its inference precision (bf16: oneDNN's
    bf16 GEMM)."""
    import openvino as ov
    import openvino.opset13 as ops

    x = ops.parameter(list(b.shape), ov.Type.f32, name="a")
    model = ov.Model([ops.matmul(x, ops.constant(b), False, False)], [x], f"{precision}_gemm")
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision,
                                                      "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    return lambda a: request.infer({0: a})[0]


def _openvino_bf16_matmul(b, threads: int):
    return _openvino_matmul(b, threads, "bf16")


def _openvino_int8_matmul(size: int, threads: int, compiled_out: list | None = None):
    """x -> FakeQuantize(x, u8) @ (i8 weights * scale): the pattern of an NNCF-quantized Linear, which the CPU
    plugin runs as an int8 FullyConnected (u8 x i8, VNNI where the CPU has it)."""
    import numpy as np
    import openvino as ov
    import openvino.opset13 as ops

    rng = np.random.default_rng(0)
    weight = rng.integers(-127, 128, (size, size), dtype=np.int8)
    x = ops.parameter([size, size], ov.Type.f32, name="a")
    low, high = ops.constant(np.float32(-4.0)), ops.constant(np.float32(4.0))
    quantized = ops.fake_quantize(x, low, high, low, high, 256)
    dequantized = ops.multiply(ops.convert(ops.constant(weight), ov.Type.f32), ops.constant(np.float32(0.01)))
    model = ov.Model([ops.matmul(quantized, dequantized, False, False)], [x], "int8_gemm")
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                      "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"})
    if compiled_out is not None:
        compiled_out.append(compiled)
    request = compiled.create_infer_request()
    return lambda a: request.infer({0: a})[0]


def _openvino_bf16_rate(a, b, threads: int, seconds: float) -> float:
    matmul = _openvino_bf16_matmul(b, threads)
    return _best_rate(lambda: matmul(a), 2.0 * a.shape[0] ** 3, seconds)


def _ort_session(model, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _ort_gemm_model(op: str, weight, input_type: int, output_type: int):
    """An ONNX model of one GEMM node, a @ weight (`MatMul` or `MatMulInteger`), with `weight` as its initializer."""
    from onnx import helper, numpy_helper

    size = weight.shape[0]
    graph = helper.make_graph(
        [helper.make_node(op, ["a", "w"], ["y"])], f"{op}_gemm",
        [helper.make_tensor_value_info("a", input_type, [size, size])],
        [helper.make_tensor_value_info("y", output_type, [size, size])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _ort_fp32_model(b):
    from onnx import TensorProto

    return _ort_gemm_model("MatMul", b, TensorProto.FLOAT, TensorProto.FLOAT)


def _ort_int8_rate(size: int, threads: int, seconds: float) -> float:
    import numpy as np
    from onnx import TensorProto

    rng = np.random.default_rng(0)
    weight = rng.integers(-127, 128, (size, size), dtype=np.int8)
    session = _ort_session(_ort_gemm_model("MatMulInteger", weight, TensorProto.UINT8, TensorProto.INT32), threads)
    a = rng.integers(0, 256, (size, size), dtype=np.uint8)
    return _best_rate(lambda: session.run(None, {"a": a}), 2.0 * size**3, seconds)


# ---- one run's figures -----------------------------------------------------------------------------------------
def run_metrics(shapes: dict, batch_shapes: Sequence[tuple[int, int]], features: int, examples: int,
                qps_engine: float, precision: str, peak: dict | None) -> tuple[dict, dict]:
    """(metrics, params) of a run: FLOPs per example and feature, GFLOP/s over the engine time (the median pass's
    qps_engine), and the roofline percentage where the precision has a measured peak."""
    flops = pass_flops(shapes, batch_shapes)
    per_feature = flops / features
    gflops = per_feature * qps_engine / 1e9
    metrics = {"perf/gflop_per_example": flops / examples / 1e9, "perf/gflop_per_feature": per_feature / 1e9,
               "perf/gflops": gflops}
    params = {}
    if peak is not None:
        params = {"roofline.isa": peak["isa"], "roofline.threads": peak["threads"],
                  **{f"roofline.peak_{k}": round(v, 2) if isinstance(v, float) else v
                     for k, v in peak.items() if k.endswith("_gflops")}}
        params.update({f"roofline.{k}": v for k, v in peak.items() if k.endswith("_source")})
        probe = PEAK_OF.get(precision)
        if probe and f"{probe}_gflops" in peak:
            metrics["perf/roofline_pct"] = 100.0 * gflops / peak[f"{probe}_gflops"]
            params["roofline.peak_used"] = f"{probe}_gflops"
            if f"{probe}_source" in peak:  # which engine's GEMM the percentage is of
                params["roofline.peak_source"] = peak[f"{probe}_source"]
            if metrics["perf/roofline_pct"] > 100:
                # the probe's peak is too low: it ran while other processes held the cores (for_run re-probes once)
                params["roofline.warning"] = (f"above the probed {probe} peak ({peak['measured_at']}): the probe ran on "
                                              "a busy CPU; delete its entry in benchmark.roofline.cache_file to re-probe")
    return metrics, params


def _settings(cfg) -> tuple[bool, Path, float]:
    """benchmark.roofline: (enabled, cache file, probe seconds)."""
    settings = cfg.benchmark.get("roofline")
    if settings is not None and not settings.enabled:
        return False, default_cache_file(), 0.5
    cache_file = Path(settings.cache_file) if settings is not None and settings.get("cache_file") else default_cache_file()
    return True, cache_file, float(settings.probe_seconds) if settings is not None else 0.5


def for_run(cfg, task, manifest: dict, batch_shapes: Sequence[tuple[int, int]], examples: int, features: int,
            qps_engine: float) -> tuple[dict, dict]:
    """What infer.py logs about a run's roofline (see `run_metrics`), with the peak probed or read from the cache
    named by `benchmark.roofline`."""
    from omegaconf import OmegaConf

    enabled, cache_file, seconds = _settings(cfg)
    if not enabled:
        return {}, {}
    peak = None
    runtime = OmegaConf.to_container(cfg.runtime, resolve=True)
    if cfg.runtime.device == "cpu":
        peak = peaks(runtime, cache_file, seconds)
    shapes = model_shapes(cfg.model, manifest, task)
    metrics, params = run_metrics(shapes, batch_shapes, features, examples, qps_engine, cfg.precision.name, peak)
    if metrics.get("perf/roofline_pct", 0) > 100 and peak.get("measured_at", "") < _started:
        # A model faster than the cached GEMM peak proves that peak low (probed on a busy CPU): probe again now,
        # once per process, keeping each engine's faster rate.
        peak = peaks(runtime, cache_file, seconds, reprobe=True)
        metrics, params = run_metrics(shapes, batch_shapes, features, examples, qps_engine, cfg.precision.name, peak)
        params["roofline.reprobed"] = True
    return metrics, params


# A training step computes the forward pass, the gradients of the activations and those of the weights: about
# three times the forward FLOPs (the usual estimate; a frozen word table saves only a lookup's gradient).
TRAIN_FLOPS_PER_FORWARD = 3


def for_training(cfg, task, batch_shapes: Sequence[tuple[int, int]], seconds: float) -> tuple[dict, dict]:
    """train/gflops of the steps a training ran (`batch_shapes` of this process, `seconds` spent in them, data
    collation included) and train/roofline_pct against this CPU's fp32 GEMM peak at the training's threads."""
    from omegaconf import OmegaConf

    if not batch_shapes or seconds <= 0:
        return {}, {}
    flops = TRAIN_FLOPS_PER_FORWARD * pass_flops(model_shapes(cfg.model, {}, task), batch_shapes)
    gflops = flops / seconds / 1e9
    metrics = {"train/gflops": gflops, "train/gflop_per_step": flops / len(batch_shapes) / 1e9}
    enabled, cache_file, probe_seconds = _settings(cfg)
    if not enabled or cfg.runtime.device != "cpu":
        return metrics, {}
    runtime = {**OmegaConf.to_container(cfg.runtime, resolve=True), "threads": int(cfg.train.threads)}
    peak = peaks(runtime, cache_file, probe_seconds)
    if "fp32_gflops" not in peak:
        return metrics, {}
    metrics["train/roofline_pct"] = 100.0 * gflops / peak["fp32_gflops"]
    return metrics, {"roofline.train_peak_fp32_gflops": round(peak["fp32_gflops"], 2),
                     "roofline.train_peak_source": peak.get("fp32_source", "")}


# When this process started: a peak measured since is not probed again.
_started = artifacts.now_iso()


def default_cache_file() -> Path:
    return Path.home() / ".cache" / "ernie-lab" / "roofline_peaks.json"
