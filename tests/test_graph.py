"""The stage graph: edges between stages and tied parameters, checked when built."""

from __future__ import annotations

import pytest

from conveyor.schedules import Edge, StageGraph, Tie


def test_a_chain_feeds_each_stage_to_the_next() -> None:
    graph = StageGraph.chain(3)
    assert graph.edges == (Edge(0, 1), Edge(1, 2))
    assert graph.is_chain
    assert graph.in_edges(0) == [] and graph.out_edges(2) == []


def test_edges_are_listed_in_the_order_stages_take_their_inputs() -> None:
    graph = StageGraph(4, (Edge(2, 3, (0,)), Edge(0, 3, (1,), grad=False), Edge(0, 1), Edge(1, 2)))
    assert graph.in_edges(3) == [Edge(0, 3, (1,), grad=False), Edge(2, 3, (0,))]
    assert graph.out_edges(0) == [Edge(0, 1), Edge(0, 3, (1,), grad=False)]
    assert not graph.is_chain
    assert graph.edge(0, 3).grad is False
    with pytest.raises(KeyError, match="no edge from stage 1 to stage 3"):
        graph.edge(1, 3)


def test_tied_stages_form_components() -> None:
    ties = (Tie(((0, "wte.weight"), (3, "head.weight"))), Tie(((3, "x"), (5, "y"))))
    graph = StageGraph(6, tuple(Edge(s, s + 1) for s in range(5)), ties)
    assert graph.tied_with(0) == [0, 3, 5]
    assert graph.tied_with(1) == []
    assert [t.name_on(3) for t in graph.ties_of(3)] == ["head.weight", "x"]
    assert "tied: stage 0 wte.weight = stage 3 head.weight" in graph.describe()


@pytest.mark.parametrize(
    ("edges", "ties", "message"),
    [
        ((Edge(1, 0),), (), "must go from an earlier to a later stage"),
        ((Edge(0, 1), Edge(0, 1, (0,))), (), "two edges to stage 1"),
        ((Edge(0, 2),), (), "stage 1 sends its outputs nowhere"),
        ((Edge(0, 1), Edge(0, 2)), (), "stage 1 sends its outputs nowhere"),
        ((Edge(0, 1), Edge(1, 2)), (Tie(((0, "w"),)),), "a tie needs two or more distinct stages"),
        ((Edge(0, 1), Edge(1, 2)), (Tie(((0, "w"), (7, "w"))),), "a tie needs two or more distinct stages"),
    ],
)
def test_malformed_graphs_are_refused(edges: tuple[Edge, ...], ties: tuple[Tie, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StageGraph(3, edges, ties)


def test_a_stage_that_receives_nothing_is_refused() -> None:
    with pytest.raises(ValueError, match="stage 2 receives nothing"):
        StageGraph(4, (Edge(0, 1), Edge(1, 3), Edge(2, 3)))
