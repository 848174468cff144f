"""Manual splitting: each stage keeps its own layers under their full-model names."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tiny_models import TinyTransformer, mlp, mlp_batch, token_batch, transformer
from torch import nn

from conveyor.schedules import Tie
from conveyor.split import Layout, even_split, layout_of, manual_split, split_model, stage_plan


def names(module: nn.Module) -> list[str]:
    return [name for name, _ in module.named_parameters()]


# Layouts


def test_layout_of_a_sequential() -> None:
    assert layout_of(mlp()) == Layout("", ("0", "1", "2", "3", "4", "5", "6"))


def test_layout_of_a_transformer() -> None:
    assert layout_of(transformer()) == Layout("layers", ("0", "1", "2", "3"), ("embed",), ("norm", "head"))


def test_layout_with_two_containers_asks_which_one() -> None:
    class TwoLists(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.ModuleList([nn.Linear(2, 2)])
            self.decoder = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])

    with pytest.raises(
        ValueError, match=r"TwoLists has 2 .* outside any other \(encoder, decoder\): name the one .* blocks="
    ):
        layout_of(TwoLists())
    assert layout_of(TwoLists(), blocks="decoder") == Layout("decoder", ("0", "1"), ("encoder",), ())
    with pytest.raises(ValueError, match="no block container 'middle'; its .* modules are \\['encoder', 'decoder'\\]"):
        layout_of(TwoLists(), blocks="middle")


class Nested(nn.Module):
    """GPT-2's shape: the blocks sit inside a body (`body.h`), the head beside the body; the forward skips None."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Module()
        self.body.embed = nn.Embedding(7, 4)
        self.body.h = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(3))
        self.body.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.body.embed.weight  # tied, as GPT-2's LM head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body.embed(x) if self.body.embed is not None else x
        for block in self.body.h:
            h = block(h)
        h = self.body.norm(h) if self.body.norm is not None else h
        return self.head(h) if self.head is not None else h


def test_a_nested_block_container_is_found_and_its_neighbours_go_to_the_ends() -> None:
    layout = Layout("body.h", ("0", "1", "2"), ("body.embed",), ("body.norm", "head"))
    assert layout_of(Nested()) == layout == layout_of(Nested(), blocks="body.h")
    assert stage_plan(layout, 2) == [["body.embed", "body.h.0", "body.h.1"], ["body.h.2", "body.norm", "head"]]


def test_a_weight_shared_across_stages_is_a_tie_and_split_model_warns_it_is_cut() -> None:
    split = manual_split(Nested(), 2)
    assert split.graph.ties == (Tie(((0, "body.embed.weight"), (1, "head.weight"))),)
    with pytest.warns(UserWarning, match=r"stage 1 shares parameters with other stages \(stage 0 body.embed.weight ="):
        split_model(Nested(), 1, 2)
    assert manual_split(Nested(), 1).graph.ties == (), "on one stage the weight is simply shared"
    whole = manual_split(Nested(), 1).build_stage(0)
    assert whole.head.weight is whole.body.embed.weight


def test_even_split() -> None:
    assert even_split(5, 2) == [3, 2]
    assert even_split(4, 4) == [1, 1, 1, 1]
    assert even_split(10, 4) == [3, 3, 2, 2]


@given(st.integers(0, 200), st.integers(1, 64))
def test_even_split_properties(num_layers: int, num_stages: int) -> None:
    counts = even_split(num_layers, num_stages)
    assert len(counts) == num_stages and sum(counts) == num_layers
    assert max(counts) - min(counts) <= 1 and counts == sorted(counts, reverse=True)


def test_stage_plan_puts_the_end_modules_on_the_end_stages() -> None:
    layout = layout_of(transformer())
    assert stage_plan(layout, 2) == [["embed", "layers.0", "layers.1"], ["layers.2", "layers.3", "norm", "head"]]
    assert stage_plan(layout, 3, [1, 3, 0]) == [
        ["embed", "layers.0"],
        ["layers.1", "layers.2", "layers.3"],
        ["norm", "head"],
    ]


# Names and ownership


def test_sequential_stages_keep_the_original_names() -> None:
    model = mlp()
    first, second = (split_model(model, s, 2) for s in range(2))  # layers 0-3 | 4-6
    assert names(first) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert names(second) == ["4.weight", "4.bias", "6.weight", "6.bias"]


def test_transformer_stages_keep_the_original_names() -> None:
    model = transformer()
    first, second = (split_model(model, s, 2) for s in range(2))
    assert {n.split(".")[0] + "." + n.split(".")[1] for n in names(first) if n.startswith("layers.")} == {
        "layers.0",
        "layers.1",
    }
    second_names = names(second)
    # Stage 1 of 2 holds layers.2 and layers.3 under those names, not renumbered from 0.
    assert "layers.2.ff.weight" in second_names and "layers.3.mix.bias" in second_names
    assert not any(n.startswith(("layers.0.", "layers.1.")) for n in second_names)
    assert "embed.weight" in names(first) and "embed.weight" not in second_names
    assert "head.weight" in second_names and "norm.weight" in second_names
    assert second.embed is None and first.norm is None and first.head is None


@pytest.mark.parametrize("build", [mlp, transformer])
@pytest.mark.parametrize("num_stages", [1, 2, 3, 4])
def test_stages_partition_the_parameters(build, num_stages: int) -> None:  # type: ignore[no-untyped-def]
    model = build()
    per_stage = [names(split_model(model, s, num_stages)) for s in range(num_stages)]
    everything = [n for stage in per_stage for n in stage]
    assert sorted(everything) == sorted(names(model))  # the union is the model ...
    assert len(everything) == len(set(everything))  # ... and no parameter is on two stages


def test_built_model_weights_are_copied_and_the_model_left_alone() -> None:
    model = transformer()
    before = {n: p.clone() for n, p in model.named_parameters()}
    stage = split_model(model, 1, 2)
    assert len(model.layers) == 4 and model.embed is not None and model.head is not None
    for name, param in stage.named_parameters():
        assert torch.equal(param, before[name]), name
        assert param.data_ptr() != model.get_parameter(name).data_ptr(), f"{name} is shared, not copied"


def test_explicit_layers_per_stage() -> None:
    model = transformer()
    stages = [split_model(model, s, 3, [0, 3, 1]) for s in range(3)]
    assert names(stages[0]) == ["embed.weight"]
    assert sorted({n.split(".")[1] for n in names(stages[1])}) == ["0", "1", "2"]
    assert sorted({n.split(".")[0] + "." + n.split(".")[1] for n in names(stages[2]) if n.startswith("layers")}) == [
        "layers.3"
    ]
    assert "head.weight" in names(stages[2])


def test_even_split_gives_earlier_stages_the_remainder() -> None:
    model = mlp()
    assert [len(list(split_model(model, s, 3).children())) for s in range(3)] == [3, 2, 2]


# Running stages in sequence


def run_in_sequence(stages: list[nn.Module], inputs: object) -> torch.Tensor:
    h = stages[0](**inputs) if isinstance(inputs, dict) else stages[0](inputs)
    for stage in stages[1:]:
        h = stage(h)
    return h


@pytest.mark.parametrize("num_stages", [1, 2, 3, 4, 7])
def test_sequential_stages_in_sequence_equal_the_model(num_stages: int) -> None:
    model = mlp()
    x, _ = mlp_batch(6)
    stages = [split_model(model, s, num_stages) for s in range(num_stages)]
    assert torch.equal(run_in_sequence(stages, x), model(x))


@pytest.mark.parametrize("layers_per_stage", [None, [1, 1, 1, 1], [0, 2, 2, 0], [4, 0]])
def test_transformer_stages_in_sequence_equal_the_model(layers_per_stage: list[int] | None) -> None:
    model = transformer()
    tokens, _ = token_batch(3)
    num_stages = len(layers_per_stage) if layers_per_stage else 3
    stages = [split_model(model, s, num_stages, layers_per_stage) for s in range(num_stages)]
    assert torch.equal(run_in_sequence(stages, tokens), model(tokens))
    inputs = {"tokens": tokens, "scale": 0.5, "offset": torch.ones(3, 1, 8)}
    assert torch.equal(run_in_sequence(stages, inputs), model(**inputs))


# Building from a function on the meta device


def test_building_from_a_function_materializes_only_the_local_stage() -> None:
    split = manual_split(TinyTransformer, 2)
    stage = split.build_stage(1)
    assert all(p.device.type == "cpu" for p in stage.parameters())
    assert sorted(names(stage)) == sorted(names(split_model(transformer(), 1, 2)))
    # Only the stage's own tensors were computed, never the full model.
    own = sum(t.nbytes for t in [*stage.parameters(), *stage.buffers()])
    assert split.source.computed_bytes == own  # type: ignore[union-attr]
    assert all(p.device.type == "meta" for p in split.source.module.parameters())  # type: ignore[union-attr]


def test_meta_build_initializes_a_layer_the_same_whatever_the_stage_count() -> None:
    one = dict(split_model(TinyTransformer, 0, 1).named_parameters())
    for num_stages in (2, 3, 4):
        for s in range(num_stages):
            for name, param in split_model(TinyTransformer, s, num_stages).named_parameters():
                assert torch.equal(param, one[name]), f"{name} differs on stage {s} of {num_stages}"


def test_meta_build_stages_in_sequence_equal_the_one_stage_model() -> None:
    tokens, _ = token_batch(3)
    whole = split_model(TinyTransformer, 0, 1)
    stages = [split_model(TinyTransformer, s, 3) for s in range(3)]
    assert torch.equal(run_in_sequence(stages, tokens), whole(tokens))


def test_meta_build_seed_changes_weights_and_layers_differ() -> None:
    a = split_model(TinyTransformer, 0, 1, seed=0)
    b = split_model(TinyTransformer, 0, 1, seed=1)
    assert not torch.equal(a.layers[0].ff.weight, b.layers[0].ff.weight)
    assert not torch.equal(a.layers[0].ff.weight, a.layers[1].ff.weight), "layers must not share an init"


def test_meta_build_with_a_custom_init() -> None:
    def init(module: nn.Module) -> None:
        for param in module.parameters():
            nn.init.constant_(param, 0.25)

    stage = split_model(TinyTransformer, 1, 2, init=init)
    assert all(torch.all(p == 0.25) for p in stage.parameters())


class Odd(nn.Module):
    """Modules the old meta build refused: no public reset_parameters, and a buffer computed in __init__."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.gain = nn.Parameter(torch.randn(8))
        self.register_buffer("freqs", torch.polar(torch.ones(4, 2), torch.outer(torch.arange(4.0), torch.rand(2))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x)[0] * self.gain + self.freqs.real.sum()


def test_meta_build_gives_every_stage_the_values_of_a_cpu_build() -> None:
    def build() -> nn.Sequential:
        return nn.Sequential(nn.Linear(8, 8), Odd(), nn.LayerNorm(8), Odd(), nn.Linear(8, 3))

    torch.manual_seed(3)
    cpu = build()
    for num_stages in (1, 2, 3):
        for s in range(num_stages):
            stage = split_model(build, s, num_stages, seed=3)
            for name, tensor in [*stage.named_parameters(), *stage.named_buffers()]:
                expected = cpu.get_parameter(name) if "freqs" not in name else cpu.get_buffer(name)
                assert torch.equal(tensor, expected), f"{name} on stage {s} of {num_stages}"


# Errors


def test_a_stage_that_would_own_no_layers() -> None:
    with pytest.raises(ValueError, match=r"stage 1 would own no layers \(layers_per_stage \[2, 0, 5\]"):
        split_model(mlp(), 0, 3, [2, 0, 5])
    with pytest.raises(ValueError, match="stage 7 would own no layers .*: use at most 7 stages"):
        split_model(mlp(), 0, 8)


def test_the_hint_for_too_many_stages_is_a_count_that_works() -> None:
    # 4 blocks, embed before them and norm/head after: an even split works up to 5 stages
    # (the last one holding only norm and head).
    with pytest.raises(ValueError, match="stage 4 would own no layers .*: use at most 5 stages"):
        split_model(transformer(), 0, 6)
    assert [names(split_model(transformer(), s, 5))[-1] for s in range(5)][-1] == "head.bias"
    # With explicit counts the embedding can have a stage of its own too: 6 stages.
    with pytest.raises(ValueError, match="stage 2 would own no layers .*: use at most 6 stages or give it a layer"):
        split_model(transformer(), 0, 7, [0, 1, 0, 1, 1, 1, 0])
    assert names(split_model(transformer(), 0, 6, [0, 1, 1, 1, 1, 0])) == ["embed.weight"]


@pytest.mark.parametrize(
    ("layers_per_stage", "message"),
    [
        ([2, 2], "layers_per_stage has 2 entries for 3 stages"),
        ([2, 2, 2], r"layers_per_stage \[2, 2, 2\] must be non-negative and add up to the model's 7 layers"),
        ([8, -1, 0], r"layers_per_stage \[8, -1, 0\] must be non-negative"),
    ],
)
def test_bad_layers_per_stage(layers_per_stage: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        split_model(mlp(), 0, 3, layers_per_stage)


@pytest.mark.parametrize("stage", [-1, 2])
def test_a_stage_outside_the_pipeline(stage: int) -> None:
    with pytest.raises(ValueError, match=f"stage {stage} does not exist in a 2-stage pipeline"):
        split_model(mlp(), stage, 2)
