"""Process-level set-up that must happen before paddle starts its threads: thread counts, denormal flushing,
and the check that the requested precision can run on the requested runtime."""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import os
import platform

from omegaconf import DictConfig

from ernie_lab.errors import ConfigError, check_choice

log = logging.getLogger(__name__)

RUNTIMES = ("cpu", "gpu", "onnxruntime", "openvino")
# runtime=auto is not an engine: it is replaced by one of RUNTIMES (auto_runtime) before a stage uses its config.
AUTO = "auto"
# Paddle Inference runtimes: their rows carry no runtime label, and their FP32 row is the baseline.
PADDLE_RUNTIMES = ("cpu", "gpu")


def runtime_label(runtime: str, precision: str, int8_mode: str | None) -> str:
    """The engine a benchmark run names in its `runtime_label` tag: empty for Paddle Inference, else e.g.
    `onnxruntime dynamic` (the results tables read it back to tell engines apart)."""
    if runtime in PADDLE_RUNTIMES:
        return ""
    if precision == "fp16" and runtime == "openvino":  # f16 on the CPU: native (AMX-FP16) or converted
        return f"{runtime} {fp16_arithmetic() or 'f32 (no FP16 here)'}"
    return f"{runtime} {int8_mode}" if precision == "int8" and int8_mode else runtime


def check_precision(runtime: DictConfig, precision: str) -> None:
    """Reject a precision the runtime or this machine cannot run, before any work starts, saying what to use."""
    check_choice("runtime", runtime.name, RUNTIMES)
    if precision not in runtime.precisions:
        if precision == "fp16" and runtime.name == "cpu":
            raise ConfigError(
                "precision=fp16 cannot run on runtime=cpu: Paddle Inference has no FP16 CPU kernels. "
                "Use runtime=auto (OpenVINO f16 on CPUs with AVX512-FP16/AMX-FP16, else the GPU), "
                "precision=bf16 on a CPU with AVX512-BF16/AMX, or runtime=gpu."
            )
        if precision == "bf16" and runtime.device == "gpu":
            raise ConfigError(
                "precision='bf16' is a CPU (oneDNN) precision here and cannot run on runtime=gpu; "
                f"choose one of: {', '.join(runtime.precisions)} (fp16 is the GPU's half precision)"
            )
        raise ConfigError(
            f"precision={precision!r} cannot run on runtime={runtime.name}; valid there: {', '.join(runtime.precisions)}"
        )
    if runtime.device == "gpu" and precision == "int8" and not runtime.tensorrt.enabled:
        # Paddle's own GPU kernels would run the quantize/dequantize ops in float: a mislabelled FP32 run.
        raise ConfigError(
            "precision=int8 on runtime=gpu needs TensorRT (runtime.tensorrt.enabled=true); "
            "with runtime.tensorrt.enabled=false choose one of: fp32, fp16"
        )
    gap = hardware_gap(runtime, precision)
    if gap:
        raise ConfigError(gap)


def hardware_gap(runtime: DictConfig, precision: str) -> str | None:
    """Why this machine cannot run a precision that its runtime supports in general, or None."""
    if precision == "fp16" and runtime.device == "cpu" and fp16_arithmetic() is None:
        # OpenVINO's CPU plugin would quietly run another precision (bf16 on a Zen 4) and the row would be mislabelled.
        return (f"precision=fp16 needs a CPU with FP16 arithmetic ({' or '.join(FP16_FLAGS)}); this one "
                f"({cpu_model()}) has neither, and runtime={runtime.name} would run another precision instead. {instead('fp16')}")
    if precision == "bf16" and runtime.device == "cpu":
        if not has_bf16():
            # Paddle Inference would quietly fall back to FP32 and the run would be mislabelled.
            return (
                f"precision=bf16 needs a CPU with AVX512-BF16 or AMX-BF16; this one ({cpu_model()}) has neither, "
                f"and runtime={runtime.name} would silently run FP32 instead. Use precision=fp32 or precision=int8 here."
            )
    if runtime.device == "gpu":
        return gpu_gap(runtime, tensorrt=bool(runtime.tensorrt.enabled))
    return None


NO_GPU_BUILD = ("runtime=gpu needs paddlepaddle-gpu, but this environment has the CPU build of paddlepaddle. "
                "Install the GPU stack with `make setup DEVICE=gpu` (scripts/setup.sh gpu), or use runtime=cpu.")


def gpu_presence_gap() -> str | None:
    """Why runtime=gpu cannot run here, as far as can be told without importing paddle (a sweep's pre-flight,
    runtime=auto); None does not promise a working GPU: gpu_gap, in the job, checks the rest."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("paddlepaddle-gpu")
    except PackageNotFoundError:
        return NO_GPU_BUILD
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = "/proc/driver/nvidia/gpus"
    if visible in ("", "-1") or not (os.path.isdir(gpus) and os.listdir(gpus)):
        return (f"runtime=gpu: no NVIDIA GPU is visible (CUDA_VISIBLE_DEVICES={visible if visible is not None else '<unset>'}; "
                "`nvidia-smi` should list one, with a driver loaded). Use runtime=cpu on this machine.")
    return None


def gpu_gap(runtime: DictConfig, tensorrt: bool) -> str | None:
    """Why this process cannot run paddle on `runtime.gpu_id` (with TensorRT if `tensorrt`), or None.
    Imports paddle: call after the thread settings of `prepare`."""
    import paddle
    from paddle import inference

    if not paddle.device.is_compiled_with_cuda():
        return NO_GPU_BUILD
    count = paddle.device.cuda.device_count()
    if count == 0:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
        return (
            f"runtime=gpu: paddlepaddle-gpu sees no GPU (CUDA_VISIBLE_DEVICES={visible}; `nvidia-smi` should list "
            "one, with a driver loaded). Use runtime=cpu on this machine."
        )
    if not 0 <= int(runtime.gpu_id) < count:
        return f"runtime.gpu_id={runtime.gpu_id} is not a visible GPU; choose one of: {', '.join(map(str, range(count)))}"
    if not tensorrt:
        return None
    built = inference.get_trt_compile_version()
    if not any(built):
        return (
            "runtime.tensorrt.enabled=true, but this paddlepaddle-gpu build has no TensorRT support "
            "(paddle.inference.get_trt_compile_version() is 0.0.0). Install a TensorRT build of paddlepaddle-gpu, "
            "or set runtime.tensorrt.enabled=false (fp32/fp16 on Paddle's own GPU kernels)."
        )
    # Paddle dlopens the unversioned libnvinfer.so when the first engine is built; a failure there can abort
    # the process, so try the same load here, where it is a clean error.
    problem = _load_error("libnvinfer.so")
    if problem:
        return (
            f"runtime.tensorrt.enabled=true: paddlepaddle-gpu was built against TensorRT {_dotted(built)}, but "
            f"libnvinfer.so cannot be loaded ({problem}). Install TensorRT {built[0]}.x and put its lib directory on "
            "LD_LIBRARY_PATH, or set runtime.tensorrt.enabled=false."
        )
    found = inference.get_trt_runtime_version()
    if found[0] != built[0]:
        return (
            f"runtime.tensorrt.enabled=true: the TensorRT on the library path is {_dotted(found)}, but "
            f"paddlepaddle-gpu was built against {_dotted(built)}; install TensorRT {built[0]}.x."
        )
    return None


def _load_error(library: str) -> str | None:
    try:
        ctypes.CDLL(library)
    except OSError as exc:
        return str(exc)
    return None


def _dotted(version) -> str:
    return ".".join(str(v) for v in version)


def gpu_info(runtime: DictConfig) -> dict:
    """What a GPU result depends on (logged with every run; part of the TensorRT engine cache key)."""
    import paddle
    from paddle import inference

    gpu_id = int(runtime.gpu_id)
    major, minor = paddle.device.cuda.get_device_capability(gpu_id)
    info = {
        "gpu_name": paddle.device.cuda.get_device_name(gpu_id),
        "gpu_capability": f"{major}.{minor}",
        "cuda": paddle.version.cuda(),
        "cudnn": paddle.version.cudnn(),
        "paddle": paddle.__version__,
        "tensorrt_built": _dotted(inference.get_trt_compile_version()),
    }
    if runtime.tensorrt.enabled and _load_error("libnvinfer.so") is None:
        info["tensorrt_runtime"] = _dotted(inference.get_trt_runtime_version())
    return info


def cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or "unknown CPU"


def _cpuinfo_field(field: str) -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_vendor() -> str:
    return _cpuinfo_field("vendor_id")


def cpu_flag_set() -> set[str]:
    """Every flag of /proc/cpuinfo's `flags` line (empty where there is none)."""
    return set(_cpuinfo_field("flags").split())


def cpu_flags() -> dict[str, bool]:
    """The instruction-set extensions that decide INT8/BF16 speed (logged with every benchmark)."""
    flags = cpu_flag_set()
    return {name: name in flags for name in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                                             "amx_int8", "amx_bf16", "amx_fp16")}


def _set_ftz_daz() -> bool:
    """Set the SSE flush-to-zero and denormals-are-zero bits (MXCSR |= 0x8040) of the calling thread.

    Threads started later inherit it, so this runs before paddle spawns its OpenMP/MKL pool. Done with
    six bytes of machine code because no dependency of ours exposes it."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    code = bytes([
        0x0F, 0xAE, 0x5C, 0x24, 0xFC,                    # stmxcsr [rsp-4]
        0x81, 0x4C, 0x24, 0xFC, 0x40, 0x80, 0x00, 0x00,  # or dword [rsp-4], 0x8040
        0x0F, 0xAE, 0x54, 0x24, 0xFC,                    # ldmxcsr [rsp-4]
        0xC3,                                            # ret
    ])
    try:
        buf = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except (OSError, ValueError):
        return False
    buf.write(code)
    address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    ctypes.CFUNCTYPE(None)(address)()
    return True


def _keep_freed_memory() -> bool:
    """Make glibc serve large blocks from the heap and keep what is freed there (mallopt: no mmap'd blocks, trim only
    past 2 GiB). By default every block over the mmap threshold (at most 32 MiB) gets fresh pages from the kernel
    and gives them back when freed, so each large tensor an eager op writes pays a page fault per 4 KiB: a paddle
    add of two [16, 12, 384, 384] tensors took 36.9 ms with it and 5.8 ms without, and a 12-layer training step at
    16 x 384 tokens 15.5 s against 11.7 s (2 cores, measured; peak memory 5.6 -> 7.0 GB). Short sequences, whose
    tensors stay under the threshold, do not change."""
    if platform.system() != "Linux":
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def data_parallel_rank() -> tuple[int, int]:
    """(rank, number of processes) when started by `python -m paddle.distributed.launch`; (0, 1) otherwise."""
    return int(os.environ.get("PADDLE_TRAINER_ID", "0")), int(os.environ.get("PADDLE_TRAINERS_NUM", "1"))


def prepare(runtime: DictConfig, precision: str | None = None, threads: int | None = None) -> dict:
    """Apply the runtime's process settings (`threads` overrides runtime.threads, e.g. for training).
    Call before the first `import paddle` of the process."""
    threads = int(threads or runtime.threads)
    # paddle sets OMP_NUM_THREADS=1 at import when it is unset, which pins eager training to one core.
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["MKL_NUM_THREADS"] = str(threads)
    if cpu_vendor() == "AuthenticAMD":
        # MKL picks its slowest kernels on AMD CPUs unless told otherwise (3x on eager matmul, measured).
        os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")
    # MXCSR only governs host SSE math: on runtime=gpu the model's arithmetic never sees it.
    flushed = runtime.device == "cpu" and bool(runtime.get("flush_denormals")) and _set_ftz_daz()
    kept = bool(runtime.get("keep_freed_memory")) and _keep_freed_memory()
    if precision is not None:  # here, not earlier: the GPU checks import paddle, after the thread settings
        check_precision(runtime, precision)
    import paddle

    if runtime.device == "cpu":
        paddle.set_device("cpu")
        claim_threads(threads)
        return {"threads": threads, "flush_denormals": flushed, "keep_freed_memory": kept, **cpu_flags()}
    # Training and the benchmark child need the GPU; TensorRT is checked with the precision (infer only).
    gap = gpu_gap(runtime, tensorrt=False)
    if gap:
        raise ConfigError(gap)
    paddle.set_device(f"gpu:{runtime.gpu_id}")
    # `threads` still sizes the host side (tokenization, ops Paddle keeps on the CPU).
    return {"threads": threads, "flush_denormals": flushed, "keep_freed_memory": kept, **cpu_flags(), **gpu_info(runtime)}


def claim_threads(threads: int) -> None:
    """Give paddle's eager CPU kernels `threads` threads again. A Paddle Inference predictor that has run in this
    process (an infer stage's check, the roofline probe at the end of a training) leaves the math library on fewer:
    eager GEMMs then ran at 55% of their speed (2 cores, measured), and rounded differently. Every eager training
    (fine-tuning, distillation) calls this first, so its speed and its weights do not depend on what ran before it."""
    import paddle

    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    paddle.base.core.set_num_threads(int(threads))


# CPU flags with which u8s8 integer kernels cannot saturate (ONNX Runtime docs, "Data type selection"): without
# them ONNX Runtime and NNCF store 7-bit weights.
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def has_vnni() -> bool:
    flags = cpu_flag_set()
    return any(f in flags for f in VNNI_FLAGS)


BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def has_bf16() -> bool:
    """bf16 GEMM instructions; without them oneDNN and OpenVINO quietly run "bf16" in fp32."""
    flags = cpu_flags()
    return any(flags.get(f) for f in BF16_FLAGS)


# FP16 arithmetic on the CPU: AMX-FP16 multiplies FP16 tiles natively; AVX512-FP16 has FP16 vector math, with which
# OpenVINO compiles an f16 model but (on Sapphire Rapids) converts around its GEMMs, slower than f32 (issue #18).
FP16_FLAGS = ("avx512_fp16", "amx_fp16")


def fp16_arithmetic(flags: set[str] | None = None) -> str | None:
    """`native` (AMX-FP16), `converted` (AVX512-FP16 only) or None: no FP16 arithmetic on this CPU."""
    flags = cpu_flag_set() if flags is None else flags
    if "amx_fp16" in flags:
        return "native"
    if "avx512_fp16" in flags:
        return "converted"
    return None


def gpu_usable() -> bool:
    """A CUDA build of paddle and an NVIDIA GPU the driver shows (runtime=auto's test; no paddle import)."""
    return gpu_presence_gap() is None


def instead(precision: str, flags: set[str] | None = None) -> str:
    """What to run on this machine in place of a precision it cannot run."""
    flags = cpu_flag_set() if flags is None else flags
    if precision == "fp16" and any(f in flags for f in BF16_FLAGS):
        return "Run precision=bf16 instead (this CPU has BF16 arithmetic), or precision=fp32 / int8."
    return "Run precision=fp32 or precision=int8 instead."


# Which engine runs BF16 best, by the CPU's BF16 units (docs/engines-and-precisions.md): with AMX,
# Paddle's oneDNN BF16 ran at the probed bf16 peak at Medium size, where OpenVINO BF16 crashed (issue #20); with
# AVX512-BF16 alone (Zen 4), see BF16_ENGINE_AVX512.
BF16_ENGINE_AMX = "cpu"
BF16_ENGINE_AVX512 = "openvino"


def auto_runtime(precision: str, flags: set[str] | None = None, gpu: bool | None = None) -> tuple[str, str]:
    """runtime=auto's one rule: (runtime, why) for a precision on this machine, or a ConfigError naming what
    to run instead. The main job's pipeline.int8_runtime=auto asks the same question for its INT8 rows."""
    flags = cpu_flag_set() if flags is None else flags
    gpu = gpu_usable() if gpu is None else gpu
    if gpu and precision in ("fp32", "fp16", "int8"):
        return "gpu", "a GPU is usable: Paddle Inference with TensorRT"
    if precision == "fp32":
        return "cpu", "FP32 on Paddle Inference (oneDNN), the baseline every other row is measured against"
    if precision == "int8":
        vnni = [f for f in VNNI_FLAGS if f in flags]
        if vnni:
            return "openvino", (f"CPU has VNNI ({vnni[0]}): OpenVINO's NNCF INT8 kept accuracy within 0.3 point and "
                                "ran fastest; Paddle's oneDNN INT8 lost ~9 MSRA_NER F1")
        return "onnxruntime", ("CPU has no VNNI: ONNX Runtime's dynamic INT8 (7-bit weights) kept accuracy within 0.3 "
                               "point; OpenVINO INT8 ran at half its FP32 speed and Paddle's lost ~9 MSRA_NER F1")
    if precision == "bf16":
        if "amx_bf16" in flags:
            return BF16_ENGINE_AMX, "CPU has AMX-BF16: Paddle's oneDNN BF16 runs at the bf16 GEMM peak there"
        if "avx512_bf16" in flags:
            return BF16_ENGINE_AVX512, "CPU has AVX512-BF16 (no AMX): OpenVINO BF16 measured faster than Paddle's here"
        raise ConfigError(f"precision=bf16 needs a CPU with {' or '.join(BF16_FLAGS)}; this one ({cpu_model()}) has "
                          f"neither. {instead('bf16', flags)}")
    if precision == "fp16":
        kind = fp16_arithmetic(flags)
        if kind is not None:
            return "openvino", f"CPU has FP16 arithmetic ({kind}): OpenVINO at f16 inference precision"
        raise ConfigError(f"precision=fp16 needs a GPU or a CPU with FP16 arithmetic ({' or '.join(FP16_FLAGS)}); "
                          f"this machine ({cpu_model()}) has neither. {instead('fp16', flags)}")
    raise ConfigError(f"precision={precision!r} has no engine on this machine; choose one of: fp32, int8, bf16, fp16")
