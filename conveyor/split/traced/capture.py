"""Capturing a model with torch.export: the pipe_split() marker, a dynamic batch dimension, clear errors."""

from __future__ import annotations

import inspect
import os
import re
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx, nn
from torch.export import Dim, ExportedProgram, ShapesCollection

__all__ = [
    "PIPE_SPLIT",
    "at_least_two",
    "export_error",
    "export_in_mode",
    "first_lines",
    "input_names",
    "on_meta",
    "pipe_split",
    "where_in_trace",
]

# An operator of its own, so that torch.export records the marker as a node; declaring it side-effectful keeps
# export's dead-code elimination from dropping a node that returns nothing.
_LIBRARY = torch.library.Library("conveyor", "FRAGMENT")
_LIBRARY.define("pipe_split() -> ()")
_LIBRARY.impl("pipe_split", lambda: None, "CompositeExplicitAutograd")
torch.library.register_fake("conveyor::pipe_split", lambda: None, lib=_LIBRARY)
PIPE_SPLIT = torch.ops.conveyor.pipe_split.default
fx.node.has_side_effect(PIPE_SPLIT)

_TORCH_DIR = str(Path(torch.__file__).parent)
_PACKAGE_DIR = str(Path(__file__).parent) + os.sep
# A frame of the stack trace export records with each node.
_TRACE_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n(.*)')
# What torch says when code mixes a CPU tensor it made with the model's meta ones.
_CPU_WITH_META = re.compile(r"device cpu is not on the expected device meta|tensors to be on the same device")


def pipe_split() -> None:
    """Mark a cut between stages inside a model's forward (kept by torch.export as an op; a no-op when run eagerly)."""
    torch.ops.conveyor.pipe_split()


def on_meta(tree: Any) -> Any:
    """`tree` with every tensor replaced by a meta tensor of its shape and dtype (an example for a meta model)."""
    return pytree.tree_map_only(torch.Tensor, lambda tensor: tensor.to("meta"), tree)


def at_least_two(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The example, repeated to two samples if it has one: export would fix a batch size of 1 as a constant."""
    sizes = {t.shape[0] for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() > 0}
    if not sizes:
        raise ValueError("the example has no tensor with a batch dimension (dim 0): give one micro-batch of inputs")
    if len(sizes) > 1:
        raise ValueError(
            f"the example's tensors disagree on the batch size (dim 0): {sorted(sizes)}; the runtime cuts every"
            " tensor input along dim 0 into micro-batches, so give tensors of one batch size"
        )
    if sizes.pop() != 1:
        return tuple(args), kwargs

    def twice(value: Any) -> Any:
        return torch.cat([value, value]) if isinstance(value, torch.Tensor) and value.dim() > 0 else value

    return pytree.tree_map(twice, (tuple(args), kwargs))  # type: ignore[no-any-return]


def export_in_mode(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    strict: bool,
    training: bool,
    dynamic: Sequence[tuple[torch.Tensor, dict[int, Any]]] = (),
) -> ExportedProgram:
    """torch.export of `model` in train or eval mode with dim 0 of every tensor input dynamic, and the dimensions
    `dynamic` marks (from `dynamic_dims`); modes restored."""
    batch = Dim("batch")
    marked = {id(tensor): dims for tensor, dims in dynamic}
    shapes = ShapesCollection()
    for tensor in pytree.tree_leaves((args, kwargs)):
        if isinstance(tensor, torch.Tensor) and tensor.dim() > 0:
            shapes[tensor] = {0: batch, **marked.get(id(tensor), {})}
    modes = [(module, module.training) for module in model.modules()]
    model.train(training)
    try:
        dynamic_shapes = shapes.dynamic_shapes(model, args, kwargs)
        return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=strict)
    finally:
        for module, mode in modes:
            module.training = mode


def input_names(model: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The example's top-level inputs by name: keywords by theirs, positional ones by forward's parameters'."""
    names = dict(kwargs)
    parameters = inspect.signature(model.forward).parameters.values()
    positional = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names.update(zip(positional, args, strict=False))
    return names


def dynamic_dims(
    model: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any], dynamic: Mapping[str, Mapping[int, Any]]
) -> list[tuple[torch.Tensor, dict[int, Any]]]:
    """Each tensor input `dynamic` names, with its dimensions to trace as dynamic besides the batch.

    `dynamic`: input name -> {dimension: a name (dimensions of one name are one size) or a torch.export `Dim`,
    `Dim.AUTO` included}.
    """
    inputs = input_names(model, args, kwargs)
    named: dict[str, Any] = {"batch": None}  # dimension name -> its Dim, one per name
    found = []
    for name, dims in dynamic.items():
        tensor = inputs.get(name)
        if not isinstance(tensor, torch.Tensor):
            tensors = sorted(n for n, v in inputs.items() if isinstance(v, torch.Tensor))
            raise ValueError(
                f"dynamic_shapes names {name!r}, which is no tensor input of {type(model).__name__}'s forward in the"
                f" example: name one of {tensors}"
            )
        marked = {}
        for dim, how in dims.items():
            if not isinstance(dim, int) or not -tensor.dim() <= dim < tensor.dim():
                raise ValueError(
                    f"dynamic_shapes[{name!r}] names dimension {dim!r}, but {name!r} has {tensor.dim()} dimensions"
                )
            if dim % tensor.dim() == 0:
                raise ValueError(
                    f"dynamic_shapes[{name!r}] names dimension 0, the batch, which is always dynamic: name the others"
                )
            if isinstance(how, str):
                if how == "batch" or not how.isidentifier():
                    raise ValueError(
                        f"dynamic_shapes[{name!r}][{dim}] is {how!r}: name a dimension by an identifier other than"
                        " 'batch' (the micro-batch's size)"
                    )
                how = named.setdefault(how, Dim(how))
            marked[dim % tensor.dim()] = how
        found.append((tensor, marked))
    return found


def export_error(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], error: Exception, built_on_meta: bool
) -> Exception:
    """One clear sentence for an export failure: the example's fault, the batch dimension's, or the model's code.

    `built_on_meta`: the model is a builder's, on the meta device, and so are `args` and `kwargs`.
    """
    name = type(model).__name__
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception as eager:  # noqa: BLE001 - whatever the model raises on the example is the user's to see
        # On the meta device a run also fails where it needs values (`.item()`, an `if` on a tensor) or meets a
        # tensor the code made on the CPU: not the example's fault, and export's own error says more.
        if not (built_on_meta and "meta" in str(eager)):
            return ValueError(
                f"{name} fails on the example micro-batch itself ({type(eager).__name__}: {first_lines(eager)}):"
                " give an example shaped like one micro-batch of real input"
            )
    if built_on_meta and _CPU_WITH_META.search(str(error)):
        return ValueError(
            f"{name}'s code{_where_raised(error)} makes a tensor on the CPU and uses it with the model's, which are on"
            " the meta device when trace_split gets a builder: make it on the input's device (torch.ones(...,"
            " device=x.device); from data, torch.tensor([...]).to(x.device)), or register it as a buffer in the"
            " builder, or give trace_split the built model"
        )
    violated = re.search(r"Constraints violated \((\w+)\)", str(error))
    if violated and violated[1] != "batch":
        return _marked_dimension_error(name, violated[1], str(error))
    fixed = re.search(r"specialized it to be a constant \((\d+)\)", str(error))
    if fixed:
        return ValueError(
            f"torch.export found that {name}'s code fixes the batch size (dim 0 of its inputs) to {fixed[1]}, but"
            " micro-batches vary in size: compute it from the input (x.shape[0]), or, if another dimension of the"
            f" example is also {fixed[1]}, give an example whose batch size no other dimension has"
        )
    return RuntimeError(
        f"torch.export cannot capture {name}{_where_raised(error)}: {type(error).__name__}: {first_lines(error)}."
        " Make that code exportable (see torch.export's documentation), or split the model by hand with"
        " conveyor.split_model"
    )


def _marked_dimension_error(model: str, dim: str, message: str) -> ValueError:
    """The error for a dimension marked dynamic (`dynamic_shapes`) that the model's code fixes or limits."""
    fixed = re.search(r"specialized it to be a constant \((\d+)\)", message)
    if fixed:
        return ValueError(
            f"torch.export found that {model}'s code fixes the dimension {dim!r}, which dynamic_shapes marks dynamic,"
            f" to {fixed[1]}: leave it out of dynamic_shapes and run inputs of that size, or make the code compute it"
            " from the input (x.shape[1])"
        )
    guard = re.search(r"satisfy the generated guard (.*)", message)
    limits = ""
    if guard:
        limits = re.sub(r"L\[[^\]]*\]\.size\(\)\[\d+\]", dim, guard[1]).strip()
        limits = re.sub(rf" and {dim} <= IntInfinity\(\)", "", limits)
    fixes = [line.strip() for line in message.partition("Suggested fixes:")[2].strip().split("\n\n")[0].splitlines()]
    return ValueError(
        f"torch.export found that {model}'s code limits the dimension {dim!r}, which dynamic_shapes marks dynamic"
        + (f", to {limits}" if limits else "")
        + (f": give it that range ({'; '.join(fixes)}, as torch.export.Dim)" if fixes else "")
        + ", or mark it Dim.AUTO to take the range export finds (a size outside it then raises when run)"
    )


def first_lines(error: BaseException, most: int = 300) -> str:
    """The first line of an error's message, and the second if the first says little."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = " ".join(lines[:2] if lines and len(lines[0]) < 60 else lines[:1]) or type(error).__name__
    text = text.rstrip(".")
    return text if len(text) <= most else text[: most - 3] + "..."


def _where_raised(error: BaseException) -> str:
    """ " (at file:line, in function: code)" for the model's own code that failed, when it can be found."""
    frames = [
        (f.filename, f.lineno or 0, f.name, f.line or "")
        for f in traceback.extract_tb(error.__traceback__)
        if _is_models(f.filename)
    ]
    # Strict export (Dynamo) raises from its own frames, and names the user's line in the message instead.
    named = re.search(r'File "([^"]+)", line (\d+), in (\w+), code: (.*)', str(error))
    if named:
        frames.append((named[1], int(named[2]), named[3], named[4]))
    return _at(*frames[-1]) if frames else ""


def where_in_trace(stack_trace: str) -> str:
    """ " (at file:line, in function: code)" for the model's innermost frame in a node's recorded stack trace."""
    frames = [frame for frame in _TRACE_FRAME.findall(stack_trace) if _is_models(frame[0])]
    return _at(*frames[-1]) if frames else ""


def _is_models(filename: str) -> bool:
    """Whether a frame is the model's code: not torch's, not conveyor's, not generated ("<string>")."""
    return not filename.startswith((_TORCH_DIR, _PACKAGE_DIR, "<"))


def _at(filename: str, line: int | str, function: str, code: str) -> str:
    code = code.strip()
    return f" (at {Path(filename).name}:{line}, in {function}{': ' + code if code else ''})"
