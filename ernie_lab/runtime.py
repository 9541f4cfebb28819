"""Process-level set-up that must happen before paddle starts its threads: thread counts, denormal flushing,
and the check that the requested precision can run on the requested runtime."""
from __future__ import annotations

import ctypes
import logging
import mmap
import os
import platform

from omegaconf import DictConfig

from ernie_lab.errors import ConfigError, check_choice

log = logging.getLogger(__name__)

RUNTIMES = ("cpu", "gpu")


def check_precision(runtime: DictConfig, precision: str) -> None:
    """Reject a precision the runtime or this machine cannot run, before any work starts, saying what to use."""
    check_choice("runtime", runtime.name, RUNTIMES)
    if precision not in runtime.precisions:
        if precision == "fp16" and runtime.device == "cpu":
            raise ConfigError(
                "precision=fp16 cannot run on runtime=cpu: Paddle Inference has no FP16 CPU kernels. "
                "Use precision=bf16 on a CPU with AVX512-BF16/AMX, or runtime=gpu for fp16."
            )
        if precision == "bf16" and runtime.device == "gpu":
            raise ConfigError("precision=bf16 is a CPU (oneDNN) precision here; on runtime=gpu use precision=fp16")
        raise ConfigError(
            f"precision={precision!r} cannot run on runtime={runtime.name}; valid there: {', '.join(runtime.precisions)}"
        )
    gap = hardware_gap(runtime, precision)
    if gap:
        raise ConfigError(gap)


def hardware_gap(runtime: DictConfig, precision: str) -> str | None:
    """Why this machine cannot run a precision that its runtime supports in general, or None."""
    if precision == "bf16" and runtime.device == "cpu":
        flags = cpu_flags()
        if not (flags.get("avx512_bf16") or flags.get("amx_bf16")):
            # Paddle Inference would quietly fall back to FP32 and the run would be mislabelled.
            return (
                f"precision=bf16 needs a CPU with AVX512-BF16 or AMX-BF16; this one ({cpu_model()}) has neither, "
                "and Paddle Inference would silently run FP32 instead. Use precision=fp32 or precision=int8 here."
            )
    return None


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


def cpu_flags() -> dict[str, bool]:
    """The instruction-set extensions that decide INT8/BF16 speed (logged with every benchmark)."""
    flags = set(_cpuinfo_field("flags").split())
    return {name: name in flags for name in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16")}


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


def prepare(runtime: DictConfig, precision: str | None = None, threads: int | None = None) -> dict:
    """Apply the runtime's process settings (`threads` overrides runtime.threads, e.g. for training).
    Call before the first `import paddle` of the process."""
    if precision is not None:
        check_precision(runtime, precision)
    threads = int(threads or runtime.threads)
    # paddle sets OMP_NUM_THREADS=1 at import when it is unset, which pins eager training to one core.
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["MKL_NUM_THREADS"] = str(threads)
    if cpu_vendor() == "AuthenticAMD":
        # MKL picks its slowest kernels on AMD CPUs unless told otherwise (3x on eager matmul, measured).
        os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")
    flushed = bool(runtime.get("flush_denormals")) and _set_ftz_daz()
    import paddle

    if runtime.device == "cpu":
        paddle.set_device("cpu")
        paddle.base.core.set_num_threads(threads)
    else:
        if not paddle.is_compiled_with_cuda():
            raise ConfigError(
                "runtime=gpu needs paddlepaddle-gpu (install with `make setup DEVICE=gpu`); "
                "this environment has the CPU build. Use runtime=cpu."
            )
        paddle.set_device(f"gpu:{runtime.gpu_id}")
    return {"threads": threads, "flush_denormals": flushed, **cpu_flags()}
