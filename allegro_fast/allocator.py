"""Keep freed memory in the process, so that large CPU tensors are not page-faulted in anew at every call.

glibc's malloc serves large requests (above 128 KiB, a threshold it raises as such blocks are freed, up to
32 MiB) with fresh mmap'd pages and returns freed memory at the top of the heap to the system. Every call
of a model then touches new pages: on the 2-core test VM, Ag256 energy + forces took about 13,000 minor page
faults per call, 15-20% of its time. `retain_freed_memory()` tells malloc to serve every size from the heap
and never to trim it, so the second call reuses the first call's pages (about 250 faults per call).

The cost is that the process keeps its peak heap after the peak has passed; the peak itself is unchanged.
It changes only glibc's malloc in this process; elsewhere (macOS, musl, Windows) it does nothing.
The same settings as environment variables, read by glibc when a process starts, are `ALLOCATOR_ENV`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

__all__ = ["ALLOCATOR_ENV", "retain_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_NEVER_TRIM = 2**31 - 1  # bytes of free heap top before malloc gives memory back (the largest mallopt takes)

# The environment-variable form, for subprocesses (glibc reads MALLOC_*_ at startup).
ALLOCATOR_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(_NEVER_TRIM)}

_applied: bool | None = None


def retain_freed_memory() -> bool:
    """Configure glibc malloc as described in the module docstring; True where it applied (idempotent)."""
    global _applied
    if _applied is None:
        _applied = False
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                trim = libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(_NEVER_TRIM))
                no_mmap = libc.mallopt(_M_MMAP_MAX, ctypes.c_int(0))
                _applied = bool(trim) and bool(no_mmap)
            except (OSError, AttributeError):
                _applied = False
    return _applied
