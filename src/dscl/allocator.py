"""Keep freed memory in the process on Linux/glibc, so large tensors are not re-faulted each step.

glibc serves allocations above a threshold with fresh ``mmap`` pages and returns them on free;
a training step that allocates the same (B*L, K) logit matrices every time then pays a page
fault per 4 KiB, every step (measured here: a 640 x 65,536 multiply 4.5x slower than into a
reused buffer). Serving every allocation from the heap and never trimming it lets the next step
reuse the pages, the effect that jemalloc or tcmalloc give PyTorch on CPUs. The CLI calls this
once at start-up; ``DSCL_KEEP_FREED_MEMORY=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Returns whether the setting was applied (glibc on Linux, not disabled by the environment)."""
    if not sys.platform.startswith("linux") or os.environ.get("DSCL_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): leave the allocator alone
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
