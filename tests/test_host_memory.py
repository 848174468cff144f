"""Host memory is kept between steps (runtime/host_memory.py): a step's churn faults no pages in again."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"
)

# 5 "steps" that each allocate, fill and free 128 MiB in blocks of 1 MiB, as a step's activations are (through
# malloc itself, so that nothing small lands between the blocks and pins the heap's top, as a tensor's own
# bookkeeping may); the minor page faults after two steps have grown the heap.
CHURN = """
import ctypes, resource
from conveyor.runtime.host_memory import keep_freed_host_memory
kept = keep_freed_host_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def step():
    blocks = [libc.malloc(1 << 20) for _ in range(128)]
    for block in blocks:
        ctypes.memset(block, 1, 1 << 20)
    for block in blocks:
        libc.free(block)
step()
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _churn(**env: str) -> tuple[bool, int]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    done = subprocess.run(
        [sys.executable, "-c", CHURN], env={**environment, **env}, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    kept, faults = done.stdout.split()
    return kept == "True", int(faults)


@pytest.mark.timeout(120)
def test_kept_memory_is_not_faulted_in_again_each_step() -> None:
    kept, faults = _churn()
    assert kept
    # 5 x 128 MiB handed back and faulted in again would be about 160,000 faults of 4 KiB pages
    assert faults < 1000, f"{faults} minor page faults in 5 steps of kept memory"
    default, default_faults = _churn(CONVEYOR_KEEP_HOST_MEMORY="0")
    assert not default
    assert default_faults > 10 * max(faults, 100), (faults, default_faults)


@pytest.mark.timeout(120)
def test_thresholds_the_environment_sets_are_left_alone() -> None:
    assert not _churn(MALLOC_TRIM_THRESHOLD_="131072", MALLOC_MMAP_THRESHOLD_="131072")[0]
    assert not _churn(GLIBC_TUNABLES="glibc.malloc.trim_threshold=131072")[0]
