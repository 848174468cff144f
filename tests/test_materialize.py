"""Deferred models: any subset of tensors materializes bitwise equal to a CPU build, at the memory of that subset."""

from __future__ import annotations

from collections.abc import Callable
from itertools import chain
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from conveyor.split.materialize import build_deferred

Builder = Callable[[], nn.Module]


def cpu_build(builder: Builder, seed: int) -> dict[str, torch.Tensor]:
    """The reference: every parameter and buffer of a real CPU build, by name (tied aliases included)."""
    torch.manual_seed(seed)
    model = builder()
    return dict(chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False)))


def assert_same(got: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], names: list[str]) -> None:
    assert sorted(got) == sorted(names)
    for name in names:
        assert got[name].device.type == "cpu", name
        assert (got[name].dtype, got[name].shape) == (reference[name].dtype, reference[name].shape), name
        assert torch.equal(got[name], reference[name]), f"{name} differs from the CPU build"


# -- the models: each piece sits between two Linears, so its values depend on the draws before it --


class Orthogonal(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tall = nn.Parameter(torch.empty(6, 4))
        self.wide = nn.Parameter(torch.empty(3, 2, 4))  # rows < columns: orthogonal_ transposes in place
        nn.init.orthogonal_(self.tall)
        nn.init.orthogonal_(self.wide, gain=2.0)


class TruncNormal(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(40, 3))
        nn.init.trunc_normal_(self.weight, std=0.02)  # uniform_, erfinv_, mul_, add_, clamp_ in place


class Rotary(nn.Module):
    """A rotary table computed in `__init__` (complex, non-persistent), as in Llama."""

    def __init__(self, dim: int = 8, end: int = 16, theta: float = 10000.0) -> None:
        super().__init__()
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
        freqs = torch.outer(torch.arange(end, device=freqs.device), freqs).float()
        self.register_buffer("freqs_cis", torch.polar(torch.ones_like(freqs), freqs), persistent=False)
        self.proj = nn.Linear(dim, dim)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 4)
        self.mid = nn.Linear(4, 4)
        self.head = nn.Linear(4, 11, bias=False)
        self.head.weight = self.embed.weight


def hf_conv1d() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    return transformers.pytorch_utils.Conv1D(6, 4)


PIECES: dict[str, Builder] = {
    "linear": lambda: nn.Linear(4, 5),
    "embedding-padding": lambda: nn.Embedding(10, 4, padding_idx=2),
    "layernorm": lambda: nn.LayerNorm(6),
    "conv2d": lambda: nn.Conv2d(3, 4, 3),
    "batchnorm": lambda: nn.BatchNorm1d(5),
    "multihead-attention": lambda: nn.MultiheadAttention(8, 2),
    "orthogonal": Orthogonal,
    "trunc-normal": TruncNormal,
    "rotary": Rotary,
    "tied": Tied,
    "lstm": lambda: nn.LSTM(4, 5, num_layers=2),
    "to-dtype": lambda: nn.Linear(4, 5).to(torch.float64),  # the builder converts the module it made
    "hf-conv1d": hf_conv1d,
}


def stacked(piece: Builder) -> Builder:
    return lambda: nn.Sequential(nn.Linear(5, 6), piece(), nn.Linear(6, 3))


@pytest.mark.parametrize("piece", PIECES.values(), ids=PIECES.keys())
def test_every_subset_is_bitwise_the_cpu_build(piece: Builder) -> None:
    builder, seed = stacked(piece), 3
    reference = cpu_build(builder, seed)
    deferred = build_deferred(builder, seed)
    names = list(reference)
    stage = [n for n in names if n.startswith("1.")]  # the piece alone, as one pipeline stage holds it
    last = [n for n in names if n.startswith("2.")]
    for subset in (stage, last, names):
        assert_same(deferred.materialize(subset), reference, subset)


def test_gpt2_from_transformers() -> None:
    transformers = pytest.importorskip("transformers")
    tiny = {"n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": 100, "n_positions": 16}
    config = transformers.GPT2Config(**tiny, bos_token_id=0, eos_token_id=0)  # token ids inside the vocabulary

    def builder() -> nn.Module:
        return transformers.GPT2LMHeadModel(config)

    reference = cpu_build(builder, 0)
    deferred = build_deferred(builder, 0)
    names = list(reference)
    stage = [n for n in names if n.startswith("transformer.h.1.")]
    # The last stage holds the head, tied to the embedding: HF's post_init ties it and initializes the embedding.
    last = [n for n in names if n.startswith(("transformer.ln_f.", "lm_head."))]
    assert "lm_head.weight" in last
    for subset in (stage, last, names):
        assert_same(deferred.materialize(subset), reference, subset)
    assert deferred.module.lm_head.weight is deferred.module.transformer.wte.weight


class BuilderTricks(nn.Module):
    """A builder that seeds, forks the generator, reads values into Python and draws from its own generator."""

    def __init__(self, generator: torch.Generator) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        torch.manual_seed(11)
        with torch.random.fork_rng(devices=[]):  # draws inside must not move the generator outside
            self.forked = nn.Linear(4, 4)
        rates = [x.item() for x in torch.linspace(0, 0.1, 3)]  # a drop-path schedule, as in timm
        width = int(torch.randint(2, 6, ()).item())  # a random draw deciding a shape
        self.blocks = nn.ModuleList(nn.Linear(3, width) for _ in rates)
        self.register_buffer("rates", torch.tensor(rates))
        self.own = nn.Parameter(torch.empty(3, 3))
        nn.init.normal_(self.own, generator=generator)
        self.last = nn.Linear(4, 4)


def test_builder_tricks_behave_as_on_the_cpu() -> None:
    generator = torch.Generator()

    def builder() -> nn.Module:
        generator.manual_seed(5)
        return BuilderTricks(generator)

    reference = cpu_build(builder, 0)
    names = list(reference)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    deferred = build_deferred(builder, 0)
    assert torch.equal(before, torch.get_rng_state())  # the builder's own manual_seed did not leak out
    assert_same(deferred.materialize(names[len(names) // 2 :]), reference, names[len(names) // 2 :])
    assert_same(deferred.materialize(names), reference, names)


def test_calls_repeat_and_leave_the_random_state_alone() -> None:
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    deferred = build_deferred(stacked(Orthogonal), seed=7)
    first = deferred.materialize(["1.tall", "2.weight"])
    again = deferred.materialize(["2.weight", "1.tall", "0.bias"])
    assert torch.equal(before, torch.get_rng_state())
    assert torch.equal(first["1.tall"], again["1.tall"]) and torch.equal(first["2.weight"], again["2.weight"])


def test_module_is_on_the_meta_device_and_keeps_ties() -> None:
    deferred = build_deferred(stacked(Tied))
    module = deferred.module
    assert all(t.is_meta for t in chain(module.parameters(), module.buffers()))
    assert all(type(p) is nn.Parameter for p in module.parameters())
    assert module[1].head.weight is module[1].embed.weight
    got = deferred.materialize(["1.head.weight", "1.embed.weight"])
    assert got["1.head.weight"] is got["1.embed.weight"]


def test_unknown_name_lists_the_closest() -> None:
    deferred = build_deferred(stacked(Tied))
    with pytest.raises(ValueError, match=r"'1\.embed\.wieght' is not a parameter or buffer .* 1\.embed\.weight"):
        deferred.materialize(["1.embed.wieght"])
    with pytest.raises(TypeError, match=r"use \['0\.weight'\]"):
        deferred.materialize("0.weight")


def test_a_tensor_without_recorded_values_is_named() -> None:
    class MetaData(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fine = nn.Linear(2, 2)
            self.register_buffer("lost", torch.tensor([1.0, 2.0], device="meta"))  # no values to record

    deferred = build_deferred(MetaData)
    assert set(deferred.materialize(["fine.weight"])) == {"fine.weight"}
    with pytest.raises(ValueError, match="^lost is a tensor that has no data"):
        deferred.materialize(["fine.bias", "lost"])


class Spy(TorchDispatchMode):
    """Notes the largest tensor any aten call sees."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        tensors = [x for x in chain(args, (kwargs or {}).values(), [out]) if isinstance(x, torch.Tensor)]
        self.largest = max([self.largest, *(t.untyped_storage().nbytes() for t in tensors)])
        return out


def test_one_layer_costs_its_own_memory() -> None:
    def builder() -> nn.Module:
        return nn.Sequential(nn.Embedding(2000, 512), nn.Linear(512, 16), nn.Linear(16, 16), nn.Linear(16, 4))

    deferred = build_deferred(builder)
    spy = Spy()
    with spy:
        got = deferred.materialize(["2.weight", "2.bias"])
    layer = (16 * 16 + 16) * 4
    assert deferred.computed_bytes == layer
    assert spy.largest <= 16 * 16 * 4  # the 4 MB embedding is never made, not even as scratch
    assert_same(got, cpu_build(builder, 0), ["2.weight", "2.bias"])
