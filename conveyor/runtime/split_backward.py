"""Split a backward into B (gradient of the stage's inputs) and W (gradient of its weights), for any module.

The autograd graph of a stage's forward has an *activation path* (the nodes
from which a stage input can be reached) and *weight branches* hanging off
it, which lead only to parameters. Where a weight branch leaves the path, the
node there (for a linear layer: its matmul) is a *join*. B asks autograd for
the input gradients and for the gradient flowing into each join, without
computing any weight gradient (autograd skips branches nobody asked for). W
then runs, for each join, the backward from that gradient down its own weight
branches only. Together they give exactly the full backward's gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, Node

__all__ = ["WeightWork", "backward_input"]


@dataclass
class WeightWork:
    """What W needs: each join's incoming gradient and the parameters below it.

    `full` holds (outputs, gradients) instead when the backward could not be
    split (a stage without input gradients, or parameters shared by two joins):
    then W runs the whole backward.
    """

    joins: list[tuple[GradientEdge, torch.Tensor, list[nn.Parameter]]]
    full: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    def run(self) -> None:
        """Accumulate the weight gradients into `.grad`, then drop the graph."""
        if self.full is not None:
            outputs, grads = self.full
            torch.autograd.backward(outputs, grads)
        for edge, grad, params in self.joins:
            # `inputs` keeps autograd on this join's weight branch; it accumulates into .grad in place.
            torch.autograd.backward([edge], [grad], inputs=params)  # type: ignore[arg-type]
        self.joins, self.full = [], None


def backward_input(
    outputs: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    params: Sequence[nn.Parameter],
) -> tuple[list[torch.Tensor | None], WeightWork]:
    """B: the gradients of `inputs`, and the work W must do later for `params`."""
    if not inputs:  # the first stage: no input gradient to hurry, so all of it is W
        return [], WeightWork([], (list(outputs), list(grads)))
    input_nodes = {_grad_node(t) for t in inputs}
    param_of = {_grad_node(p): p for p in params if p.requires_grad}
    roots = [t.grad_fn for t in outputs if t.grad_fn is not None]
    on_path = _reaching(roots, input_nodes)
    joins = _joins(roots, on_path)
    branches = [(node, _params_below(node, on_path, param_of)) for node in joins]
    branches = [(node, below) for node, below in branches if below]
    owners = [p for _, below in branches for p in below]
    if len(owners) != len(set(owners)):  # a parameter under two joins: W could not tell their shares apart
        only_inputs = torch.autograd.grad(outputs, list(inputs), grads, retain_graph=True, allow_unused=True)
        return list(only_inputs), WeightWork([], (list(outputs), list(grads)))
    edges = [GradientEdge(node, i) for node, _ in branches for i in range(len(node._input_metadata))]
    owner_of_edge = [below for node, below in branches for _ in range(len(node._input_metadata))]
    # Outputs that do not depend on the inputs are weight branches of their own, with known gradients.
    direct = [(t, g) for t, g in zip(outputs, grads, strict=True) if t.grad_fn is not None and t.grad_fn not in on_path]
    wanted: list[torch.Tensor | GradientEdge] = [*inputs, *edges]
    results = torch.autograd.grad(outputs, wanted, grads, retain_graph=True, allow_unused=True)  # type: ignore[arg-type]
    input_grads: list[torch.Tensor | None] = list(results[: len(inputs)])
    work = [
        (edge, g, below)
        for edge, g, below in zip(edges, results[len(inputs) :], owner_of_edge, strict=True)
        if g is not None
    ]
    for tensor, grad in direct:
        below = _params_below(tensor.grad_fn, set(), param_of) if tensor.grad_fn is not None else []
        if below:
            work.append((torch.autograd.graph.get_gradient_edge(tensor), grad, below))
    return input_grads, WeightWork(work)


def _grad_node(tensor: torch.Tensor) -> Node:
    """The node gradients of `tensor` flow into (a leaf's accumulator, made if need be)."""
    if tensor.grad_fn is not None:
        return tensor.grad_fn
    node = tensor.view_as(tensor).grad_fn
    assert node is not None, "a stage input or parameter that does not require grad"
    accumulator = node.next_functions[0][0]
    assert accumulator is not None
    return accumulator


def _children(node: Node) -> list[Node]:
    return [child for child, _ in node.next_functions if child is not None]


def _reaching(roots: list[Node], targets: set[Node]) -> set[Node]:
    """Nodes from which some target can be reached (targets included), by an iterative post-order walk."""
    reaches: dict[Node, bool] = {}
    stack: list[tuple[Node, bool]] = [(root, False) for root in roots]
    while stack:
        node, expanded = stack.pop()
        if node in reaches and not expanded:
            continue
        if expanded:
            reaches[node] = node in targets or any(reaches.get(c, False) for c in _children(node))
            continue
        reaches.setdefault(node, False)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if c not in reaches)
    return {node for node, ok in reaches.items() if ok}


def _joins(roots: list[Node], on_path: set[Node]) -> list[Node]:
    """Nodes on the activation path with a child off it: where weight branches leave the path."""
    found, seen = [], set()
    stack = [root for root in roots if root in on_path]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        children = _children(node)
        if any(c not in on_path for c in children):
            found.append(node)
        stack.extend(c for c in children if c in on_path)
    return found


def _params_below(node: Node, on_path: set[Node], param_of: dict[Node, nn.Parameter]) -> list[nn.Parameter]:
    """The parameters reached from `node` without going back onto the activation path."""
    found, seen = [], set()
    stack = [c for c in _children(node) if c not in on_path]
    while stack:
        child = stack.pop()
        if child in seen:
            continue
        seen.add(child)
        if child in param_of:
            found.append(param_of[child])
            continue
        stack.extend(c for c in _children(child) if c not in on_path)
    return found
