"""Shape guards of a traced stage: the input shapes torch.export assumed, checked once per input signature.

A stage runs a graph exported for one example: every dimension not marked
dynamic is baked in (a `view` to that size, a branch of the forward taken or
not), and a dynamic one may hold only in a range export found (a branch on
`seq > 4` gives `seq >= 5`). A micro-batch of other shapes would still run,
through a graph traced for shapes it does not have, and give another answer
than the model; so each stage checks its inputs against what export assumed,
as `ExportedProgram.module()` does, and raises naming the input, the
dimension, the size seen and the assumption.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from .program import StageCode

__all__ = ["InputShape", "ShapeGuards", "stage_guards"]

_MOST_SIGNATURES = 64  # input signatures remembered as checked; more (inputs of ever new lengths) start again


@dataclass(frozen=True)
class InputShape:
    """What export assumed of one input of a stage: each dimension a size, or an expression of its symbols."""

    what: str  # "input 'input_ids'", "stage 2's input 1 ('add_3')"
    shape: tuple[Any, ...]  # int | sympy.Expr (sympy, which torch brings, is imported only where it must be)
    stage: int
    dynamic_name: str | None = None  # the name `trace_split(dynamic_shapes=...)` knows the input by, if any


@dataclass
class ShapeGuards:
    """The shape assumptions of one stage's graph: its inputs' shapes, and each symbol's range."""

    inputs: tuple[InputShape | None, ...]  # by input; None for what is not a tensor (or a number carried as one)
    ranges: Mapping[Any, tuple[int, int | None]]  # symbol -> (lowest, highest or None) export allows
    symbols: frozenset[Any]  # the symbols of the model's own inputs: those a size can bind
    _checked: set[tuple[Any, ...]] = field(default_factory=set, repr=False)

    def check(self, values: Sequence[Any]) -> None:
        """Raise ValueError if `values` (the stage's inputs) break a shape the graph was traced for.

        Costs a tuple of the input shapes per call; each new combination of shapes is checked once.
        """
        signature = tuple(tuple(v.shape) if isinstance(v, torch.Tensor) else None for v in values)
        if signature in self._checked:
            return
        self._verify(values)
        if len(self._checked) >= _MOST_SIGNATURES:
            self._checked.clear()
        self._checked.add(signature)

    def _verify(self, values: Sequence[Any]) -> None:
        bound: dict[Any, tuple[int, str]] = {}  # symbol -> (size, which dimension gave it)
        derived: list[tuple[InputShape, int, int, Any]] = []
        for guard, value in zip(self.inputs, values, strict=True):
            if guard is None:
                continue
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{guard.what} must be a tensor shaped {_shape(guard)}; got {type(value).__name__}")
            if value.dim() != len(guard.shape):
                raise ValueError(
                    f"{guard.what} has {value.dim()} dimension(s) ({list(value.shape)}), but the model was traced"
                    f" with {len(guard.shape)} ({_shape(guard)}): give inputs shaped like the example"
                )
            for dim, (size, expected) in enumerate(zip(value.shape, guard.shape, strict=True)):
                if isinstance(expected, int):
                    if size != expected:
                        raise ValueError(_fixed(guard, dim, size, expected))
                elif getattr(expected, "is_Symbol", False) and expected in self.symbols:
                    self._bind(bound, expected, size, guard, dim)
                elif expected.free_symbols <= self.symbols:
                    derived.append((guard, dim, size, expected))
                # else: a size the graph computes from data (an unbacked symbol), known only when it runs
        # A size of a form the micro-batch's sizes give (6 * batch): computed, or solved for the one symbol
        # nothing else gave. Of two unknown symbols, or of a form sympy cannot evaluate, it is left to the graph.
        for guard, dim, size, expected in derived:
            unknown = [symbol for symbol in expected.free_symbols if symbol not in bound]
            if len(unknown) == 1:
                self._solve(bound, expected, unknown[0], size, guard, dim)
            elif not unknown:
                value = expected.subs({symbol: value for symbol, (value, _) in bound.items()})
                if not getattr(value, "is_Integer", False):
                    continue
                wanted = int(value)
                if size != wanted:
                    given = ", ".join(f"{bound[symbol][1]} is {bound[symbol][0]}" for symbol in expected.free_symbols)
                    raise ValueError(
                        f"{guard.what} dimension {dim} is {size}, but the model was traced with it equal to"
                        f" {expected} = {wanted} (as {given}): give inputs whose sizes agree as the example's did"
                    )

    def _bind(self, bound: dict[Any, tuple[int, str]], symbol: Any, size: int, guard: InputShape, dim: int) -> None:
        if symbol in bound:
            value, where = bound[symbol]
            if size != value:
                raise ValueError(
                    f"{guard.what} dimension {dim} is {size}, but the model was traced with it equal to {where},"
                    f" which is {value}: give inputs whose sizes agree as the example's did"
                )
            return
        lowest, highest = self.ranges.get(symbol, (0, None))
        # Export assumes a dynamic size is not 0 or 1 unless told, yet its graphs run them (as torch's own check
        # allows): only a lower bound above 2 is the model's own.
        if (lowest > 2 and size < lowest) or (highest is not None and size > highest):
            span = f"from {lowest} to {highest}" if highest is not None else f"of at least {lowest}"
            raise ValueError(
                f"{guard.what} dimension {dim} is {size}, but the model was traced for sizes {span} (its forward"
                " relies on that: a branch on the size, say): give inputs in that range, or trace with an example"
                " of the size you run"
            )
        bound[symbol] = (size, f"dimension {dim} of {guard.what}")

    def _solve(
        self, bound: dict[Any, tuple[int, str]], expected: Any, symbol: Any, size: int, guard: InputShape, dim: int
    ) -> None:
        import sympy

        known = {s: value for s, (value, _) in bound.items()}
        try:
            solutions = [s for s in sympy.solve(sympy.Eq(expected.subs(known), size), symbol) if s.is_integer]
        except (NotImplementedError, TypeError, ValueError):  # a form sympy cannot solve (Max, FloorDiv...)
            return
        if not solutions:
            raise ValueError(
                f"{guard.what} dimension {dim} is {size}, but the model was traced with it of the form {expected}"
                f" for a whole {symbol}: give inputs shaped like the example"
            )
        self._bind(bound, symbol, int(solutions[0]), guard, dim)


def stage_guards(code: StageCode, exported: ExportedProgram, stage: int, dynamic_names: frozenset[str]) -> ShapeGuards:
    """The shape guards of `stage`'s inputs in one exported graph.

    `dynamic_names`: the model inputs `trace_split(dynamic_shapes=...)` can name, for the advice in errors.
    """
    inputs: list[InputShape | None] = []
    for at, value in enumerate(code.inputs):
        meta = value.node.meta.get("val")
        if value.carried or not isinstance(meta, torch.Tensor):
            inputs.append(None)
            continue
        name = value.node.name
        what = f"input {name!r}" if stage == 0 else f"stage {stage}'s input {at} ({name!r})"
        shape = tuple(_size(size) for size in meta.shape)
        inputs.append(InputShape(what, shape, stage, name if stage == 0 and name in dynamic_names else None))
    ranges = {symbol: (_finite(r.lower) or 0, _finite(r.upper)) for symbol, r in exported.range_constraints.items()}
    return ShapeGuards(tuple(inputs), ranges, _input_symbols(exported))


def _input_symbols(exported: ExportedProgram) -> frozenset[Any]:
    """The symbols of the model's inputs' sizes: the sizes a micro-batch gives, unlike those computed from data."""
    users = {spec.arg.name for spec in exported.graph_signature.input_specs if spec.kind == InputKind.USER_INPUT}
    symbols: set[Any] = set()
    for node in exported.graph_module.graph.find_nodes(op="placeholder"):
        meta = node.meta.get("val")
        if node.name in users and isinstance(meta, torch.Tensor):
            for size in meta.shape:
                if isinstance(size, torch.SymInt):
                    symbols.update(size.node.expr.free_symbols)
    return frozenset(symbols)


def _size(size: int | torch.SymInt) -> Any:
    """A dimension as export traced it: an int, or the sympy expression of a symbolic size."""
    if isinstance(size, torch.SymInt):
        expr = size.node.expr
        return int(expr) if expr.is_number else expr
    return int(size)


def _finite(bound: Any) -> int | None:
    """A range's bound as an int, or None for an infinite one."""
    return int(bound) if isinstance(bound, int) or getattr(bound, "is_Integer", False) else None


def _shape(guard: InputShape) -> str:
    return "[" + ", ".join(str(size) for size in guard.shape) + "]"


def _fixed(guard: InputShape, dim: int, size: int, expected: int) -> str:
    """The error for a size that differs from the one export baked into the graph."""
    if guard.dynamic_name is not None:
        advice = (
            f", or mark the dimension dynamic (trace_split(..., dynamic_shapes={{{guard.dynamic_name!r}: {{{dim}:"
            " 'seq'}}), one name per size that varies together)"
        )
    elif guard.stage > 0:
        advice = " (a later stage's sizes follow from those of the micro-batch)"
    else:
        advice = ""
    return (
        f"{guard.what} dimension {dim} is {size}, but the model was traced with it fixed at {expected} (its graph"
        f" may bake that size in or branch on it): trace with an example of the shape you run{advice}"
    )
