"""Deferred models: built once without memory, their tensors materialized on demand exactly as a CPU build makes them.

`build_deferred` runs the builder on fake CPU tensors (torch's `FakeTensorMode`:
tensors with a shape, a dtype and a meta storage, but no data) and records a
tape of every aten call it makes. `DeferredModel.materialize` walks the tape
backwards from the wanted tensors to the calls that wrote them (and to what
those read), then replays only those calls on real CPU tensors.

Why fake CPU tensors and not `torch.device("meta")`: code that sees the meta
device skips work. `nn.init.orthogonal_` and `trunc_normal_` return at once
on a meta tensor, and Hugging Face's `post_init` skips initialization when
`torch.tensor([])` lands on the meta device. Fake tensors say they are on the
CPU, so the builder runs exactly the code a CPU build runs.

Random numbers are the delicate part: a CPU build draws them all, in order,
from one generator, so a stage's weights depend on every draw made before
them. While recording, each random call also runs once on throw-away CPU
scratch tensors, so the CPU generator moves exactly as in a CPU build, and its
state just before the call is kept with the call. A replay sets that state
before each random call it runs and skips all the others. The builder's own
`torch.manual_seed`, `fork_rng` or `.item()` therefore behave as on the CPU.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from itertools import chain
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensor,
    FakeTensorMode,
)
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

__all__ = ["DeferredModel", "build_deferred"]

_CPU = torch.device("cpu")
# How `torch.tensor(data)` hands its (real) tensor to the dispatcher.
_LIFTS = (torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default)
# Random calls whose tensor inputs only give a shape: their scratch draw needs no input values.
_SHAPE_ONLY_RANDOM = frozenset({"aten::rand_like", "aten::randn_like", "aten::randint_like", "aten::native_dropout"})


@dataclass(frozen=True)
class _Ref:
    """A recorded tensor: the storage it views (by id), and how."""

    storage: int
    dtype: torch.dtype
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    conj: bool
    neg: bool


@dataclass(frozen=True)
class _Op:
    """One aten call of the build, with `_Ref`s in place of its tensors."""

    func: torch._ops.OpOverload
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    creates: tuple[tuple[int, _Ref], ...]  # (index among the output's tensors, the new storage it starts)
    reads: frozenset[int]
    writes: frozenset[int]  # storages it starts or mutates
    rng: tuple[torch.Generator, torch.Tensor] | None  # a random call's generator, and its state just before


def _ref_of(tensor: torch.Tensor, storage: int) -> _Ref:
    return _Ref(
        storage,
        tensor.dtype,
        tuple(tensor.shape),
        tuple(tensor.stride()),
        int(tensor.storage_offset()),
        tensor.is_conj(),
        tensor.is_neg(),
    )


def _view(storage: torch.UntypedStorage, ref: _Ref) -> torch.Tensor:
    """A tensor viewing `storage` as `ref` viewed its recorded storage."""
    tensor = torch.empty(0, dtype=ref.dtype, device=storage.device).set_(storage, ref.offset, ref.size, ref.stride)
    if ref.conj:
        tensor = tensor.conj()
    if ref.neg:
        tensor = torch._neg_view(tensor)
    return tensor


def _has_data(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.untyped_storage().device.type != "meta"


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(tree) if isinstance(x, torch.Tensor)]


def _written(func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    """The arguments `func` writes into (in-place and out= ones), by its schema."""
    found = []
    for i, argument in enumerate(func._schema.arguments):
        if argument.alias_info is None or not argument.alias_info.is_write:
            continue
        if argument.kwarg_only or argument.name in kwargs:
            value = kwargs.get(argument.name)
        else:
            value = args[i] if i < len(args) else None
        found.extend(pytree.tree_leaves(value))
    return found


@contextmanager
def _states_kept(generators: Collection[torch.Generator]) -> Iterator[None]:
    states = [(g, g.get_state()) for g in generators]
    try:
        yield
    finally:
        for g, state in states:
            g.set_state(state)


class _Tape:
    """The calls of one build, in order, and what is known of each storage they touched."""

    def __init__(self) -> None:
        self.ops: list[_Op] = []
        self.nbytes: list[int] = []  # by storage id: its size when first seen
        self.initial: dict[int, torch.UntypedStorage] = {}  # real storages from outside the build: copies
        self.unknown: set[int] = set()  # storages from outside the build with no data (meta, fake)
        # While recording, storage address -> id; the storages are kept alive, so no address is reused.
        self._ids: dict[int, int] = {}
        self._alive: list[torch.UntypedStorage] = []

    # -- recording --

    def ref(self, tensor: torch.Tensor, created: bool = False) -> _Ref:
        """The `_Ref` of `tensor`; a storage first seen here is new if `created`, else it comes from outside."""
        if tensor.layout != torch.strided:
            raise ValueError(f"build_deferred records strided tensors only; the builder made a {tensor.layout} one")
        storage = tensor.untyped_storage()
        sid = self._ids.get(storage._cdata)
        if sid is None:
            sid = len(self.nbytes)
            self._ids[storage._cdata] = sid
            self._alive.append(storage)
            self.nbytes.append(storage.nbytes())
            if created:
                pass
            elif storage.device.type == "meta":
                self.unknown.add(sid)
            else:  # copied now: the build may change it later, and a replay starts from this value
                with _disable_current_modes():
                    self.initial[sid] = storage.clone()
        return _ref_of(tensor, sid)

    def record(
        self,
        func: torch._ops.OpOverload,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        rng: tuple[torch.Generator, torch.Tensor] | None,
    ) -> Callable[[Any], None]:
        """Note a call about to run; call what this returns with its output once it has run.

        The inputs are noted first, as the call may change a storage (`set_`) or the values of one from outside.
        """
        args, kwargs = pytree.tree_map_only(torch.Tensor, self.ref, (args, kwargs))
        reads = frozenset(r.storage for r in pytree.tree_leaves((args, kwargs)) if isinstance(r, _Ref))
        written = frozenset(r.storage for r in _written(func, args, kwargs) if isinstance(r, _Ref))

        def finish(out: Any) -> None:
            known = len(self.nbytes)
            refs = [self.ref(t, created=True) for t in _tensors(out)]
            creates = tuple((i, r) for i, r in enumerate(refs) if r.storage >= known)
            writes = written | {r.storage for _, r in creates}
            self.ops.append(_Op(func, args, kwargs, creates, reads, frozenset(writes), rng))

        return finish

    def seal(self) -> None:
        """Stop recording: let go of the build's storages (its real temporaries among them)."""
        self._ids.clear()
        self._alive.clear()

    # -- replaying --

    def plan(self, wanted: Collection[int]) -> tuple[list[int], set[int]]:
        """The calls a replay of `wanted` runs, and every storage it computes on the way."""
        needed = set(wanted)
        run = []
        for i in reversed(range(len(self.ops))):
            op = self.ops[i]
            # Every writer of a needed storage runs, even one that writes only a part (a padding row).
            if op.writes & needed:
                run.append(i)
                needed |= op.reads
        run.reverse()
        return run, needed

    def replay(self, wanted: Collection[int], blame: Callable[[int], str]) -> dict[int, torch.UntypedStorage]:
        """Real CPU storages for `wanted`, computed by the calls of the tape that lead to them.

        `blame(storage)` names, for an error, what depends on that storage.
        """
        run, needed = self.plan(wanted)
        for sid in sorted(needed & self.unknown):
            reader = next((self.ops[i].func for i in run if sid in self.ops[i].reads), None)
            what = f"is computed (by {reader}) from a tensor" if reader else "is a tensor"
            raise ValueError(
                f"{blame(sid)} {what} that has no data and that the builder did not make (a meta tensor made before"
                " it ran, or by torch.tensor(..., device='meta')), so its values were never recorded: make it inside"
                " the builder, on the default device"
            )
        last_use = {sid: i for i in run for sid in self.ops[i].reads | self.ops[i].writes}
        shadows = {sid: self.initial[sid].clone() for sid in needed if sid in self.initial}
        generators = {op.rng[0] for op in self.ops if op.rng is not None} - {torch.default_generator}
        with torch.random.fork_rng(devices=[]), _states_kept(generators), torch.no_grad():
            for i in run:
                op = self.ops[i]
                if op.rng is not None:
                    op.rng[0].set_state(op.rng[1])
                args, kwargs = pytree.tree_map_only(_Ref, lambda r: _view(shadows[r.storage], r), (op.args, op.kwargs))
                args, kwargs = _meta_to_cpu((args, kwargs))
                try:
                    out = op.func(*args, **kwargs)
                except Exception as error:
                    raise RuntimeError(
                        f"{blame(min(op.writes & needed))}: replaying {op.func} on the CPU failed: {error}"
                    ) from error
                tensors = _tensors(out)
                inputs = {t.untyped_storage()._cdata for t in _tensors((args, kwargs))}
                for index, ref in op.creates:
                    if ref.storage in needed:
                        shadows[ref.storage] = self._adopt(tensors[index], ref, inputs)
                for sid in op.reads | op.writes:
                    if last_use.get(sid) == i and sid not in wanted:
                        shadows.pop(sid, None)  # a temporary that nothing later reads: free it now
        return shadows

    def _adopt(self, real: torch.Tensor, ref: _Ref, inputs: set[int]) -> torch.UntypedStorage:
        """The storage for a call's new output: its own when laid out as recorded, else a copy laid out so.

        `inputs` are the addresses of the call's input storages: an output new on the tape can be one of them
        on the CPU (`lift_fresh` returns its input there), and must then be a copy.
        """
        storage = real.untyped_storage()
        if (
            storage.nbytes() == self.nbytes[ref.storage]
            and _ref_of(real, ref.storage) == ref
            and storage._cdata not in inputs
        ):
            return storage
        fresh = torch.empty(self.nbytes[ref.storage], dtype=torch.uint8, device=_CPU).untyped_storage()
        _view(fresh, ref).copy_(real)
        return fresh

    def values(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Real CPU values of tensors of the build so far, for a call that needs them while recording."""
        refs = [self.ref(t) for t in tensors]
        shadows = self.replay({r.storage for r in refs}, blame=lambda _: "a value the builder reads")
        return [_view(shadows[r.storage], r) for r in refs]


def _meta_to_cpu(tree: Any) -> Any:
    """`tree` with the meta device (where the builder asked for meta tensors itself) replaced by the CPU."""
    return pytree.tree_map_only(torch.device, lambda d: _CPU if d.type == "meta" else d, tree)


class _Scratch:
    """Throw-away CPU tensors for random draws, carved from one buffer that the whole build reuses.

    Reused, not allocated per draw: freeing megabytes between the build's many small allocations fragments
    the heap, and the process would grow by every draw's size.
    """

    def __init__(self) -> None:
        self._buffer = torch.UntypedStorage(0)

    def like(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """CPU tensors laid out as `tensors`, offsets and all: CPU kernels pick their path (and draws) by layout."""
        slots = [-(-t.untyped_storage().nbytes() // 64) * 64 for t in tensors]  # 64-byte aligned, as allocations are
        if self._buffer.nbytes() < sum(slots):
            self._buffer = torch.UntypedStorage(0)  # freed before the larger one is made
            self._buffer = torch.empty(sum(slots), dtype=torch.uint8, device=_CPU).untyped_storage()
        made, at = [], 0
        for tensor, slot in zip(tensors, slots, strict=True):
            ref = _ref_of(tensor, -1)
            made.append(_view(self._buffer, replace(ref, offset=ref.offset + at // tensor.element_size())))
            at += slot
        return made


class _Recorder(TorchDispatchMode):
    """Records every aten call of the build, and moves the CPU generator as a CPU build moves it."""

    def __init__(self, tape: _Tape, fake: FakeTensorMode) -> None:
        super().__init__()
        self.tape = tape
        self.fake = fake
        self.scratch = _Scratch()

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is torch.ops.prim.device.default:  # fake tensors asking where they are: nothing to record
            return func(*args, **kwargs)
        rng = None
        if torch.Tag.nondeterministic_seeded in func.tags:
            leaves = pytree.tree_leaves((args, kwargs))
            generator = next((x for x in leaves if isinstance(x, torch.Generator)), torch.default_generator)
            rng = (generator, generator.get_state())
        finish = self.tape.record(func, args, kwargs, rng)
        if rng is not None:
            self._draw(func, args, kwargs)
        try:
            if func in _LIFTS and not any(isinstance(x, FakeTensor) for x in _tensors((args, kwargs))):
                # A plain fake tensor. FakeTensorMode would make a "constant" that keeps the data to answer
                # `.item()` itself (stale once changed in place; a replay is exact), and holds a weak reference
                # to it that stops `module.double()` from swapping it.
                out = self.fake.from_tensor(args[0])
            else:
                out = func(*args, **kwargs)
        except (DataDependentOutputException, DynamicOutputShapeException):
            if rng is not None:  # the call itself draws now: undo the scratch draw
                rng[0].set_state(rng[1])
            out = self._on_values(func, args, kwargs)
        finish(out)
        # FakeTensorMode remembers (weakly) each fake tensor it wraps; `module.to(dtype)` must swap a parameter
        # for its converted self, and torch refuses to swap a tensor that a weak reference points to.
        self.fake.fake_tensor_converter.tensor_memo.clear()
        return out

    def _on_values(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run a call that needs its inputs' values (`.item()`, `nonzero`) on them, computed by a replay."""
        with _disable_current_modes():
            fakes = [x for x in _tensors((args, kwargs)) if not _has_data(x)]
            real = dict(zip(map(id, fakes), self.tape.values(fakes), strict=True))
            real_args, real_kwargs = pytree.tree_map_only(torch.Tensor, lambda x: real.get(id(x), x), (args, kwargs))
            out = func(*real_args, **real_kwargs)
        return pytree.tree_map_only(torch.Tensor, self.fake.from_tensor, out)

    def _draw(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Run a random call on CPU scratch tensors, to draw from the generator what a CPU build draws."""
        with _disable_current_modes(), torch.no_grad():
            written = {id(t) for t in _written(func, args, kwargs)}
            fakes = list({id(x): x for x in _tensors((args, kwargs)) if not _has_data(x)}.values())
            # Inputs can decide how much a call draws (a gamma's rejection sampling), so they get their values;
            # what the call writes over, and the inputs of calls that only read a shape, get scratch.
            shape_only = func._schema.name in _SHAPE_ONLY_RANDOM
            valued = [x for x in fakes if id(x) not in written and not shape_only]
            blank = [x for x in fakes if id(x) in written or shape_only]
            made = self.tape.values(valued) + self.scratch.like(blank)
            real = dict(zip(map(id, valued + blank), made, strict=True))
            args, kwargs = pytree.tree_map_only(torch.Tensor, lambda x: real.get(id(x), x), (args, kwargs))
            func(*_meta_to_cpu(args), **_meta_to_cpu(kwargs))


class DeferredModel:
    """A model built on the meta device, its tensors materialized on demand, each exactly as a CPU build makes it."""

    module: nn.Module
    """The model, every parameter and buffer on the meta device."""
    computed_bytes: int
    """Bytes of CPU storage the last `materialize` computed: the wanted tensors and the temporaries they came from."""

    def __init__(self, module: nn.Module, tape: _Tape, refs: dict[str, _Ref]) -> None:
        self.module = module
        self.computed_bytes = 0
        self._tape = tape
        self._refs = refs

    def materialize(self, names: Collection[str]) -> dict[str, torch.Tensor]:
        """CPU tensors for these parameter/buffer names, bitwise equal to `torch.manual_seed(seed); builder()`'s.

        Names are those of `module.named_parameters()`/`named_buffers(remove_duplicate=False)` as built, so tied
        aliases (`lm_head.weight`) work too, and come back as one tensor. The tensors are plain (not
        `nn.Parameter`) and share storage as in a CPU build. Costs the memory of those tensors plus the
        temporaries they are computed from (an `orthogonal_` init's matrices), freed as soon as they are used,
        and the time of the calls that make them. Leaves every random generator as it was.
        """
        if isinstance(names, str):
            raise TypeError(f"materialize takes a collection of names, not one string: use [{names!r}]")
        wanted = list(dict.fromkeys(names))
        for name in wanted:
            if name not in self._refs:
                close = difflib.get_close_matches(name, self._refs, n=5, cutoff=0.5) or list(self._refs)[:5]
                raise ValueError(
                    f"{name!r} is not a parameter or buffer of {type(self.module).__name__}; the closest names are "
                    + ", ".join(close)
                )
        storages = {self._refs[name].storage for name in wanted}
        shadows = self._tape.replay(storages, blame=lambda sid: self._dependents(sid, wanted))
        self.computed_bytes = sum(self._tape.nbytes[sid] for sid in self._tape.plan(storages)[1])
        views: dict[_Ref, torch.Tensor] = {}
        for name in wanted:
            ref = self._refs[name]
            views.setdefault(ref, _view(shadows[ref.storage], ref))
        return {name: views[self._refs[name]] for name in wanted}

    def _dependents(self, storage: int, names: list[str]) -> str:
        """The names among `names` whose values depend on `storage`, for an error."""
        hit = [name for name in names if storage in self._tape.plan([self._refs[name].storage])[1]]
        return ", ".join(hit or names)


def build_deferred(builder: Callable[[], nn.Module], seed: int = 0) -> DeferredModel:
    """Call `builder` once on the meta device, recording how every tensor was made.

    The builder runs on fake CPU tensors (see the module docstring), then the model's tensors are moved to the
    meta device. Costs the time of the builder's random draws (each is made once into CPU scratch, freed at
    once, so the peak is the largest random tensor) and about 5 KB of generator state per random call, kept for
    replays. Leaves the global random state as it was.
    """
    tape = _Tape()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fake = FakeTensorMode(allow_non_fake_inputs=True)
        with fake, _Recorder(tape, fake):
            module = builder()
    if not isinstance(module, nn.Module):
        raise TypeError(f"build_deferred needs a builder that returns an nn.Module; it returned {type(module)}")
    named = chain(module.named_parameters(remove_duplicate=False), module.named_buffers(remove_duplicate=False))
    refs = {name: tape.ref(tensor) for name, tensor in named}
    _move_to_meta(module)
    tape.seal()
    return DeferredModel(module, tape, refs)


def _move_to_meta(module: nn.Module) -> None:
    """Swap every tensor the module holds (fake, or real when the builder brought it in) for a meta one."""
    storages: dict[int, torch.UntypedStorage] = {}  # by address, so views of one storage stay views of one
    swapped: dict[int, torch.Tensor] = {}  # by id, so a tied tensor stays one tensor

    def meta_twin(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in swapped:
            storage = tensor.untyped_storage()
            if storage._cdata not in storages:
                on_meta = storage.device.type == "meta"
                storages[storage._cdata] = storage if on_meta else torch.UntypedStorage(storage.nbytes(), device="meta")
            twin = _view(storages[storage._cdata], _ref_of(tensor, -1))
            if isinstance(tensor, nn.Parameter):
                twin = nn.Parameter(twin, requires_grad=tensor.requires_grad)
            swapped[id(tensor)] = twin
        return swapped[id(tensor)]

    for sub in module.modules():
        # By setattr, which an LSTM overrides to keep its list of flat weights in step.
        for name, tensor in chain(sub._parameters.items(), sub._buffers.items()):
            if tensor is not None:
                setattr(sub, name, meta_twin(tensor))
        for name, value in list(vars(sub).items()):
            # Plain tensor attributes (a cached table) would stay fake tensors, unusable outside the build.
            if isinstance(value, torch.Tensor) and not _has_data(value):
                object.__setattr__(sub, name, meta_twin(value))
