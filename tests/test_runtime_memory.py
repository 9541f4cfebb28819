"""runtime.keep_freed_memory: large blocks come from the heap and go back to it, so a tensor-sized buffer allocated
again reuses its pages instead of faulting in fresh ones from the kernel (what made eager 384-token training steps
slow). Counted in page faults, not timed."""
from __future__ import annotations

import subprocess
import sys

from ernie_lab.config import PROJECT_ROOT

# malloc, touch and free a 113 MB block (a [16, 12, 384, 384] float32 score tensor) ten times; print the minor
# page faults of the last nine.
PROBE = """
import ctypes, ctypes.util, resource, sys
from ernie_lab import runtime
if sys.argv[1] == "keep":
    assert runtime._keep_freed_memory()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 16 * 12 * 384 * 384 * 4
def once():  # malloc, as paddle's CPU allocator (numpy would ask for huge pages and hide the faults)
    block = libc.malloc(SIZE)
    ctypes.memset(block, 1, SIZE)
    libc.free(block)
once()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(9):
    once()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=PROJECT_ROOT, capture_output=True, text=True,
                         timeout=120, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def test_freed_tensor_memory_is_reused_without_page_faults():
    default, kept = faults("default"), faults("keep")
    pages = 9 * 16 * 12 * 384 * 384 * 4 // 4096
    assert default > pages // 2  # glibc's default: every large block is fresh pages from the kernel
    assert kept < pages // 20  # kept in the heap: the same pages again


def test_every_cpu_runtime_keeps_freed_memory():
    from ernie_lab.config import compose_config

    for runtime in ("cpu", "onnxruntime", "openvino"):
        assert compose_config("config", [f"runtime={runtime}"]).runtime.keep_freed_memory is True
