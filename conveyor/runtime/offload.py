"""Activation offload at run time: what a stage saved for a micro-batch's backward, moved to host memory and back.

During the forward of a micro-batch the program offloads (`schedules/offload.py`), autograd's saved tensors go
through `saved_tensors_hooks`: each storage is kept once, in a record of its micro-batch, and autograd holds a
handle. OFFLOAD copies every recorded storage to host memory and drops the device copy; RELOAD copies it back;
the backward's unpacking finds the storage on the device again and rebuilds each saved tensor as a view of it
(same offset, sizes and strides, so the backward computes bit for bit what it would have). Parameters, the
stage's own inputs and outputs (which the stage keeps for its backward anyway) and tensors a storage cannot
carry (sparse, quantized, conjugated, subclasses) stay where they are.

On CUDA the copies run on a side stream, into pinned host buffers, so they overlap the computes; the backward's
stream waits for the reload's event. On the CPU a copy into a separate buffer stands in: the bytes the stage
holds for backward fall as on a GPU, but the process's memory does not (host and device are the same).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["ActivationOffload"]


@dataclass
class _Storage:
    """One storage a micro-batch saved: on the device (`device`), or in host memory (`host`)."""

    device: torch.Tensor | None  # a flat uint8 view of the whole storage
    host: torch.Tensor | None = None
    stays: bool = False  # on the device throughout: the stage holds it anyway (one of its outputs)


@dataclass
class _Record:
    """What one micro-batch saved through the hooks, and where it is."""

    storages: dict[int, _Storage] = field(default_factory=dict)  # by the device storage's address when saved
    offloaded: bool = False
    event: torch.cuda.Event | None = None  # the last copy's completion (CUDA)


@dataclass(frozen=True)
class _Handle:
    """What autograd holds for a saved tensor: its storage's record, and the view to rebuild."""

    record: _Record
    key: int
    dtype: torch.dtype
    offset: int
    size: torch.Size
    stride: tuple[int, ...]


class ActivationOffload:
    """Stage `stage`'s saved tensors by micro-batch, for the micro-batches whose forward ran under `saving`.

    Costs: on the CPU, one copy of the saved bytes each way (the rank's own memcpy); on CUDA, the copies run on
    a side stream and cost the rank only their launch.
    """

    def __init__(self, stage: int, device: torch.device, params: Iterable[nn.Parameter]) -> None:
        self.stage = stage
        self.device = device
        self._params = {p.untyped_storage().data_ptr() for p in params}
        self._records: dict[int, _Record] = {}
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def saving(
        self, mb: int, kept: Iterable[torch.Tensor], observe: Callable[[torch.Tensor], object] | None = None
    ) -> torch.autograd.graph.saved_tensors_hooks:
        """The hooks to run micro-batch `mb`'s forward under: what autograd saves is recorded for offloading,
        except the storages of parameters and of `kept` (the stage's inputs and outputs, which it holds anyway).
        `observe` sees every saved tensor too (hooks do not nest: the innermost alone runs)."""
        if mb in self._records:
            raise RuntimeError(f"stage {self.stage}: micro-batch {mb}'s activations were saved twice")
        record = self._records[mb] = _Record()
        stay = self._params | {t.untyped_storage().data_ptr() for t in kept}

        def pack(tensor: torch.Tensor) -> torch.Tensor | _Handle:
            if observe is not None:
                observe(tensor)
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key in stay or not _movable(tensor):
                return tensor
            if key not in record.storages:
                flat = torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(storage)
                record.storages[key] = _Storage(flat)
            offset, size = int(tensor.storage_offset()), tensor.size()
            return _Handle(record, key, tensor.dtype, offset, size, tuple(int(n) for n in tensor.stride()))

        def unpack(packed: torch.Tensor | _Handle) -> torch.Tensor:
            if isinstance(packed, torch.Tensor):
                return packed
            held = packed.record.storages[packed.key].device
            if held is None:
                raise RuntimeError(
                    f"stage {self.stage}, micro-batch {mb}: its saved activations are in host memory; the backward"
                    " ran before the program's RELOAD brought them back"
                )
            view = torch.empty(0, dtype=packed.dtype, device=held.device)
            return view.set_(held.untyped_storage(), packed.offset, packed.size, packed.stride)

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)

    def keep_on_device(self, mb: int, tensors: Iterable[torch.Tensor]) -> None:
        """Leave the storages of `tensors` (the forward's outputs, known only once it ran) out of the offload."""
        record = self._record(mb, "the forward")
        for tensor in tensors:
            storage = record.storages.get(tensor.untyped_storage().data_ptr())
            if storage is not None:
                storage.stays = True

    def offload(self, mb: int) -> int:
        """Start moving micro-batch `mb`'s saved storages to host memory; returns the bytes moved off the device."""
        record = self._record(mb, "OFFLOAD")
        if record.offloaded:
            raise RuntimeError(f"stage {self.stage}: micro-batch {mb} was offloaded twice")
        moved = 0
        with self._on_side_stream(wait_for_compute=True):
            for storage in record.storages.values():
                if storage.stays:
                    continue
                assert storage.device is not None
                storage.host = _host_copy(storage.device, pinned=self._stream is not None)
                if self._stream is not None:
                    storage.device.record_stream(self._stream)  # the block is reused only once the copy ended
                moved += storage.device.numel()
                storage.device = None
            record.event = self._stream.record_event() if self._stream is not None else None
        record.offloaded = True
        return moved

    def reload(self, mb: int) -> int:
        """Start bringing micro-batch `mb`'s storages back to the device; returns the bytes brought back."""
        record = self._record(mb, "RELOAD")
        if not record.offloaded:
            raise RuntimeError(f"stage {self.stage}: RELOAD of micro-batch {mb}, which was not offloaded")
        back = 0
        with self._on_side_stream(wait_for_compute=False):  # after the offload: the side stream runs in order
            for storage in record.storages.values():
                if storage.stays:
                    continue
                assert storage.host is not None
                device = torch.empty(storage.host.numel(), dtype=torch.uint8, device=self.device)
                storage.device = device.copy_(storage.host, non_blocking=self._stream is not None)
                storage.host = None  # a pinned block in flight is kept by torch's host allocator until its copy ends
                back += device.numel()
            record.event = self._stream.record_event() if self._stream is not None else None
        record.offloaded = False
        return back

    def before_backward(self, mb: int) -> None:
        """Make micro-batch `mb`'s saved storages ready for its backward: the compute stream waits for the reload."""
        record = self._records.get(mb)
        if record is None:
            return
        if record.offloaded:
            raise RuntimeError(
                f"stage {self.stage}, micro-batch {mb}: its activations are in host memory and its backward is"
                " due: the program has no RELOAD before it"
            )
        if self._stream is not None and record.event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(record.event)
            for storage in record.storages.values():
                assert storage.device is not None
                if not storage.stays:
                    storage.device.record_stream(compute)  # allocated on the side stream, read by the backward
            record.event = None

    def release(self, mb: int) -> None:
        """Forget micro-batch `mb` once its backward (and W) ran."""
        self._records.pop(mb, None)

    def _record(self, mb: int, action: str) -> _Record:
        record = self._records.get(mb)
        if record is None:
            raise RuntimeError(
                f"stage {self.stage}: {action} of micro-batch {mb}, whose forward did not save for offloading (or"
                " whose backward already ran)"
            )
        return record

    def _on_side_stream(self, wait_for_compute: bool) -> _SideStream:
        return _SideStream(self._stream, self.device, wait_for_compute)


class _SideStream:
    """Runs its block on the copy stream (after the compute stream's work so far, if asked); on CPU, in place."""

    def __init__(self, stream: torch.cuda.Stream | None, device: torch.device, wait_for_compute: bool) -> None:
        self._stream, self._device, self._wait = stream, device, wait_for_compute
        self._context: torch.cuda.StreamContext | None = None

    def __enter__(self) -> None:
        if self._stream is None:
            return
        if self._wait:  # the saved tensors were written by kernels queued on the compute stream
            self._stream.wait_stream(torch.cuda.current_stream(self._device))
        self._context = torch.cuda.stream(self._stream)
        self._context.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self._context is not None:
            self._context.__exit__(*exc)
            self._context = None


def _host_copy(flat: torch.Tensor, pinned: bool) -> torch.Tensor:
    """A copy of a flat uint8 tensor in host memory: pinned and asynchronous from a GPU; a separate buffer on CPU."""
    if not pinned:
        return torch.empty_like(flat, device="cpu").copy_(flat)
    host = torch.empty(flat.numel(), dtype=torch.uint8, pin_memory=True)
    return host.copy_(flat, non_blocking=True)


def _movable(tensor: torch.Tensor) -> bool:
    """Whether a saved tensor can be rebuilt as a view of its storage's bytes."""
    return (
        type(tensor) in (torch.Tensor, nn.Parameter)
        and tensor.layout is torch.strided
        and not tensor.is_quantized
        and not tensor.is_conj()
        and not tensor.is_neg()
        and tensor.device.type != "meta"
        and tensor.untyped_storage().nbytes() > 0
    )
