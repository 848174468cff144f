"""Gradient flow through an exported graph: which values a gradient can reach a parameter or an input from."""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import fx

__all__ = ["gradient_flow", "written_args"]

_NUMBERS = (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)
_NO_GRAD_OPS = {torch.ops.aten.detach.default, torch.ops.aten.detach_.default}


def gradient_flow(graph: fx.Graph, state: Collection[fx.Node], trainable: Collection[fx.Node]) -> dict[fx.Node, bool]:
    """For every node, whether a gradient can flow from its value back to a parameter or a float input.

    `state` are the placeholders of parameters, buffers and constants; `trainable` those of the parameters that
    require a gradient. Every other placeholder is a user input.
    """
    flows: dict[fx.Node, bool] = {}
    for node in graph.nodes:
        meta = node.meta.get("val")
        if node.op == "placeholder":
            if node in state:
                flows[node] = node in trainable
            else:
                flows[node] = isinstance(meta, torch.Tensor) and _can_grad(meta)
        elif node.op != "call_function" or node.target in _NO_GRAD_OPS or isinstance(meta, _NUMBERS):
            flows[node] = False
        elif node.target is torch.ops.higher_order.wrap_with_set_grad_enabled and not node.args[0]:
            flows[node] = False  # a `with torch.no_grad():` region
        else:
            flows[node] = any(flows.get(arg, False) for arg in node.all_input_nodes)
            if isinstance(meta, torch.Tensor):
                flows[node] = flows[node] and _can_grad(meta)
            # An in-place op makes what it writes into depend on its other inputs too.
            for arg in written_args(node):
                flows[arg] = flows.get(arg, False) or flows[node]
    return flows


def written_args(node: fx.Node) -> list[fx.Node]:
    """The arguments an in-place op writes to (a running mean, the `x` of `x.add_(y)`)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return []
    return [
        value
        for arg, value in zip(schema.arguments, node.args, strict=False)
        if arg.alias_info is not None and arg.alias_info.is_write and isinstance(value, fx.Node)
    ]


def _can_grad(meta: torch.Tensor) -> bool:
    return meta.dtype.is_floating_point or meta.dtype.is_complex
