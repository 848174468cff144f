"""Host memory between steps: keep what one step frees for the next (glibc's malloc, on Linux).

A training step frees most of what it allocated (activations, their gradients) and allocates the same again in
the next step. glibc's malloc gives such memory back to the system: it trims the top of its heap once more than
a few MiB lie free there, and serves blocks above its mmap threshold from fresh mappings. Every step then faults
the same pages in again. On this project's CPU machines that made pipeline steps measurably slower
(docs/benchmarks.md, "Keeping freed host memory"), and it made a profile charge the last block of a GPT-2 a third
to a half more than its twins: that block's memory was the part handed back and faulted in again each time. torch's CUDA
caching allocator keeps freed blocks for reuse; this does the same for host memory.

A `Pipeline` on the CPU calls `keep_freed_host_memory`, and so do the profilers, so a profile sees the
allocator the run will. A process whose environment sets glibc's malloc thresholds itself
(MALLOC_TRIM_THRESHOLD_, MALLOC_MMAP_THRESHOLD_, or those in GLIBC_TUNABLES) keeps them, and
CONVEYOR_KEEP_HOST_MEMORY=0 leaves glibc's own policy in place.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform

__all__ = ["keep_freed_host_memory"]

# mallopt's parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 << 20
"""Blocks up to this size come from the heap: glibc's largest mmap threshold on 64-bit (half its heap size), the
bound its own dynamic threshold rises to. Larger ones (rare: a tensor over 32 MiB) keep their own mappings."""
TRIM_THRESHOLD = 2**31 - 1
"""The most free bytes the heap's top may hold before glibc trims it: mallopt takes an int, so about 2 GiB."""

_ENVIRONMENT = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")
_TUNABLES = ("glibc.malloc.trim_threshold", "glibc.malloc.mmap_threshold")


@functools.cache
def keep_freed_host_memory() -> bool:
    """Make this process's malloc keep the memory a step frees, once per process; whether it now does.

    False where it leaves malloc alone: not glibc, the environment sets the thresholds (see the module
    docstring), or CONVEYOR_KEEP_HOST_MEMORY=0.
    """
    if os.environ.get("CONVEYOR_KEEP_HOST_MEMORY", "1") == "0" or _set_by_environment():
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # Setting either threshold turns off glibc's dynamic one, so both are set: the trim threshold alone would
    # leave every block over 128 KiB on a fresh mapping (and a step several times slower).
    if not libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD):
        return False
    return bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def _set_by_environment() -> bool:
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return any(name in os.environ for name in _ENVIRONMENT) or any(name in tunables for name in _TUNABLES)
