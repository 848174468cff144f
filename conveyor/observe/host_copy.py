"""What moving activations to host memory and back costs on this machine: the time of an offload's copies.

On a CPU the runtime's offload is the rank's own copy into a separate buffer (`runtime/offload.py`), so that
is what is timed, and it keeps the rank busy; on CUDA the copies go to and from pinned host memory on a side
stream, beside the computes.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from ..runtime.host_memory import keep_freed_host_memory

__all__ = ["HostCopy", "measure_host_copy"]


@dataclass(frozen=True)
class HostCopy:
    """The cost of copying activations to host memory or back (each way), measured at `nbytes`."""

    seconds_per_byte: float
    copy_stream: bool
    """Whether copies run beside the computes (CUDA's side stream) rather than keeping the rank busy (CPU)."""
    nbytes: int
    device: str

    def seconds(self, nbytes: float) -> float:
        return nbytes * self.seconds_per_byte


def measure_host_copy(device: str | torch.device = "cpu", nbytes: int = 8 * 2**20, repeats: int = 7) -> HostCopy:
    """Time the copies an offload makes, `nbytes` at a time (median of `repeats`, after one untimed), keeping
    freed host memory as a Pipeline does (`runtime/host_memory.py`), so a buffer is not faulted in anew."""
    device = torch.device(device)
    keep_freed_host_memory()
    source = torch.ones(nbytes, dtype=torch.uint8, device=device)
    times = []
    if device.type == "cuda":
        stream = torch.cuda.Stream(device)
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        for _ in range(repeats + 1):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(stream):
                start.record()
                host.copy_(source, non_blocking=True)
                source.copy_(host, non_blocking=True)
                end.record()
            end.synchronize()
            times.append((start.elapsed_time(end)) / 2e3)  # ms for both ways -> seconds each way
    else:
        for _ in range(repeats + 1):
            begin = time.perf_counter()
            torch.empty_like(source).copy_(source)
            times.append(time.perf_counter() - begin)
    return HostCopy(statistics.median(times[1:]) / nbytes, device.type == "cuda", nbytes, str(device))
