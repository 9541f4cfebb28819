"""How close a benchmark run comes to this CPU's arithmetic peak.

- `encoder_flops`: the model's FLOPs for one sequence of a (padded) length, from its shapes: every matmul counted
  as 2 * m * n * k (a multiply and an add), nothing else (embeddings, LayerNorm, softmax, GELU and the residual
  adds are element-wise: < 2% of an ERNIE layer at the lengths benchmarked here).
- `peaks`: the CPU's measured GEMM peak per precision at the run's thread count, from a short probe in a fresh
  process (fp32: the faster of numpy's BLAS and Paddle's matmul; int8: ONNX Runtime's MatMulInteger, u8 x s8,
  MLAS's integer GEMM; bf16, on CPUs with AVX512-BF16 or AMX-BF16 only: an OpenVINO MatMul compiled with a bf16
  inference precision, oneDNN's bf16 GEMM), run once per machine and cached in a small JSON keyed by CPU model,
  flags and threads, with the instruction set it found (AVX2 / AVX-512 / VNNI / AMX).

A run logs `perf/gflops` (model FLOPs of a pass over the timed engine time; INT8 "FLOPs" are the same
multiply-adds done in 8 bits) and `perf/roofline_pct` (that over the peak for its precision)."""
from __future__ import annotations

import hashlib
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Sequence

from ernie_lab import artifacts
from ernie_lab.runtime import cpu_flag_set

# Which probe measures a precision's peak (a precision without one logs perf/gflops and no roofline percentage).
PEAK_OF = {"fp32": "fp32", "int8": "int8", "bf16": "bf16"}
# Bumped when the probe changes, so that cached peaks are measured again (2: bf16 added).
PROBE_VERSION = 2


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


def peaks(runtime: dict, cache_file: Path, seconds: float = 0.5) -> dict:
    """This machine's GEMM peaks at runtime['threads'] (GFLOP/s per precision, the ISA, the probe's details),
    from `cache_file` when it holds this machine's key, else probed in a fresh process and added to it."""
    threads = int(runtime["threads"])
    key = machine_key(threads)
    cached = artifacts.read_json(cache_file) if cache_file.is_file() else {}
    if key in cached:
        return cached[key]
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        found = pool.submit(_probe, runtime, seconds).result()
    found = {"isa": isa_name(cpu_flag_set()), "threads": threads, "measured_at": artifacts.now_iso(), **found}
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    latest = artifacts.read_json(cache_file) if cache_file.is_file() else {}
    artifacts.write_json_atomic(cache_file, {**latest, key: found})
    return found


def _best_rate(run, flops: float, seconds: float) -> float:
    """GFLOP/s of the fastest call of `run` (after one warm-up call) within about `seconds`."""
    run()
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t)
    return flops / best / 1e9


def _probe(runtime: dict, seconds: float) -> dict:
    """Runs in the child: square GEMMs big enough to reach the kernels' peak and small enough to stay quick."""
    from omegaconf import OmegaConf

    from ernie_lab import runtime as rt

    rt.prepare(OmegaConf.create(runtime))  # thread counts (OMP/MKL), MKL's AMD switch: as the engines run
    import numpy as np
    from threadpoolctl import threadpool_limits

    threads, size = int(runtime["threads"]), 1024
    flops = 2.0 * size**3
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    with threadpool_limits(limits=threads):
        numpy_fp32 = _best_rate(lambda: a @ b, flops, seconds)
    import paddle

    pa, pb = paddle.to_tensor(a), paddle.to_tensor(b)
    paddle_fp32 = _best_rate(lambda: paddle.matmul(pa, pb).numpy(), flops, seconds)
    out = {"fp32_gflops": max(numpy_fp32, paddle_fp32), "fp32_numpy_gflops": numpy_fp32,
           "fp32_paddle_gflops": paddle_fp32, "gemm_size": size}
    try:
        out["int8_gflops"] = _ort_int8_rate(size, threads, seconds)
        out["int8_source"] = "onnxruntime MatMulInteger u8s8"
    except ImportError:  # ONNX Runtime not installed: no int8 roofline
        pass
    # elsewhere OpenVINO would quietly run the "bf16" MatMul in fp32, and the peak would be fp32's
    if rt.has_bf16():
        try:
            out["bf16_gflops"] = _openvino_bf16_rate(a, b, threads, seconds)
            out["bf16_source"] = "openvino MatMul, inference precision bf16"
        except ImportError:  # OpenVINO not installed: no bf16 roofline
            pass
    return out


def _openvino_bf16_matmul(b, threads: int):
    """x -> x @ b as OpenVINO's CPU plugin runs it with a bf16 inference precision (oneDNN's bf16 GEMM)."""
    import openvino as ov
    import openvino.opset13 as ops

    x = ops.parameter(list(b.shape), ov.Type.f32, name="a")
    model = ov.Model([ops.matmul(x, ops.constant(b), False, False)], [x], "bf16_gemm")
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "bf16",
                                                      "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    return lambda a: request.infer({0: a})[0]


def _openvino_bf16_rate(a, b, threads: int, seconds: float) -> float:
    matmul = _openvino_bf16_matmul(b, threads)
    return _best_rate(lambda: matmul(a), 2.0 * a.shape[0] ** 3, seconds)


def _ort_int8_rate(size: int, threads: int, seconds: float) -> float:
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.integers(-127, 128, (size, size), dtype=np.int8)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "w"], ["y"])], "int8_gemm",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [size, size])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [size, size])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
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
        probe = PEAK_OF.get(precision)
        if probe and f"{probe}_gflops" in peak:
            metrics["perf/roofline_pct"] = 100.0 * gflops / peak[f"{probe}_gflops"]
            params["roofline.peak_used"] = f"{probe}_gflops"
            if metrics["perf/roofline_pct"] > 100:
                # the probe's peak is too low: it ran while other processes held the cores
                params["roofline.warning"] = (f"above the probed {probe} peak ({peak['measured_at']}): the probe ran on "
                                              "a busy CPU; delete its entry in benchmark.roofline.cache_file to re-probe")
    return metrics, params


def for_run(cfg, task, manifest: dict, batch_shapes: Sequence[tuple[int, int]], examples: int, features: int,
            qps_engine: float) -> tuple[dict, dict]:
    """What infer.py logs about a run's roofline (see `run_metrics`), with the peak probed or read from the cache
    named by `benchmark.roofline`."""
    from omegaconf import OmegaConf

    settings = cfg.benchmark.get("roofline")
    if settings is not None and not settings.enabled:
        return {}, {}
    cache_file = Path(settings.cache_file) if settings is not None and settings.get("cache_file") else default_cache_file()
    seconds = float(settings.probe_seconds) if settings is not None else 0.5
    peak = None
    if cfg.runtime.device == "cpu":
        peak = peaks(OmegaConf.to_container(cfg.runtime, resolve=True), cache_file, seconds)
    shapes = model_shapes(cfg.model, manifest, task)
    return run_metrics(shapes, batch_shapes, features, examples, qps_engine, cfg.precision.name, peak)


def default_cache_file() -> Path:
    return Path.home() / ".cache" / "ernie-lab" / "roofline_peaks.json"
