"""The traced split: stages cut from torch.export's graph, run one after another in one process, equal the model."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

from conveyor.models import GPT, GPTConfig, lm_loss
from conveyor.schedules.graph import Edge, StageGraph
from conveyor.split.materialize import DeferredModel
from conveyor.split.traced import TracedSplit, TracedStage, pipe_split, trace_split

SEQ = 8

# Running stages the way the runtime does


def run_stages(
    split: TracedSplit,
    stages: Sequence[nn.Module],
    microbatch: Any,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    sent: dict[Edge, list[torch.Tensor]] | None = None,
) -> Any:
    """Run stages 0..n-1 on one micro-batch, each later stage on detached copies of what its in-edges carry.

    With `loss_fn`, backpropagate stage by stage from the last, sending a
    gradient back only on edges with `grad`, and summing the gradients of an
    output that went on several edges. `sent` collects each edge's values.
    """
    graph = split.graph
    outputs: dict[int, Any] = {}
    taken: dict[int, list[tuple[Edge, int, torch.Tensor]]] = {}
    for index, stage in enumerate(stages):
        if index == 0:
            output = stage(**microbatch) if isinstance(microbatch, dict) else stage(*microbatch)
        else:
            taken[index] = []
            for edge in graph.in_edges(index):
                source = outputs[edge.src]
                values = edge.values if edge.values is not None else range(len(source))
                assert edge.grad or not any(source[at].requires_grad for at in values), f"{edge} drops a gradient"
                for at in values:
                    value = source[at].detach()
                    if edge.grad and value.is_floating_point():
                        value.requires_grad_()
                    taken[index].append((edge, at, value))
                if sent is not None:
                    sent[edge] = [source[at] for at in values]
            output = stage(*(value for _, _, value in taken[index]))
        if index < len(stages) - 1:
            assert isinstance(output, tuple) and all(isinstance(t, torch.Tensor) for t in output), type(output)
        outputs[index] = output
    if loss_fn is None:
        return output
    grads: dict[int, dict[int, torch.Tensor]] = {index: {} for index in range(len(stages))}
    for index in reversed(range(len(stages))):
        if index == len(stages) - 1:
            loss_fn(output).backward()
        else:
            pairs = [(outputs[index][at], grad) for at, grad in grads[index].items()]
            if pairs:
                torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
        for edge, at, value in taken.get(index, []):
            if edge.grad and value.grad is not None:
                previous = grads[edge.src].get(at)
                grads[edge.src][at] = value.grad if previous is None else previous + value.grad
    return output


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    error = (actual.double() - expected.double()).norm().item()
    scale = expected.double().norm().item()
    assert error <= rtol * max(scale, 1e-12), f"{what} differs: |error| {error:.3g} against |expected| {scale:.3g}"


def assert_matches_model(
    model: nn.Module,
    split: TracedSplit,
    microbatch: Any,
    loss_fn: Callable[[Any], torch.Tensor],
    output_of: Callable[[Any], torch.Tensor] = lambda out: out,
) -> list[TracedStage]:
    """The stages' output equals the model's (1e-6), and every parameter's gradient too (1e-5), ties summed."""
    stages = [split.build_stage(index) for index in range(split.num_stages)]
    model.zero_grad()
    expected = model(**microbatch) if isinstance(microbatch, dict) else model(*microbatch)
    loss_fn(expected).backward()
    actual = run_stages(split, stages, microbatch, loss_fn)
    assert type(actual) is type(expected)
    assert_close(output_of(actual), output_of(expected), 1e-6, "the output")
    tied = {name for tie in split.graph.ties for _, name in tie.names}
    for tie in split.graph.ties:
        grad = sum(stages[stage].get_parameter(name).grad for stage, name in tie.names)
        assert isinstance(grad, torch.Tensor)
        reference = model.get_parameter(tie.names[0][1]).grad
        assert reference is not None
        assert_close(grad, reference, 1e-5, f"the gradient of tied {tie.names}")
    for name, parameter in model.named_parameters():
        if name in tied:
            continue
        holders = [stage for stage in stages if name in dict(stage.named_parameters())]
        assert len(holders) == 1, f"{name} is on {len(holders)} stages"
        grad = holders[0].get_parameter(name).grad
        assert grad is not None and parameter.grad is not None, f"{name} has no gradient"
        assert_close(grad, parameter.grad, 1e-5, f"the gradient of {name}")
    return stages


def state_keys(split: TracedSplit) -> list[str]:
    return [key for index in range(split.num_stages) for key in split.build_stage(index).state_dict()]


# Models


def gpt(dropout: float = 0.0) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(layers=4, dim=32, heads=2, context=16, dropout=dropout))


def tokens(batch: int = 3, vocab: int = 256) -> torch.Tensor:
    return torch.randint(1, vocab, (batch, SEQ), generator=torch.Generator().manual_seed(batch))


def gpt_loss(logits: torch.Tensor) -> torch.Tensor:
    return lm_loss(logits, tokens(logits.shape[0]))


class Skip(nn.Module):
    """The embedding's output feeds the head directly, over the three blocks: a skip connection."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(4, 8)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3))
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = torch.tanh(self.embed(x))
        h = skip
        for block in self.blocks:
            h = block(h)
        return self.head(torch.cat([h, skip], dim=-1))


SKIP_CUTS = {"blocks.0": "beginning", "blocks.1": "beginning", "blocks.2": "beginning"}


def floats(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 4, generator=torch.Generator().manual_seed(batch))


def square_loss(out: torch.Tensor) -> torch.Tensor:
    return out.pow(2).mean()


@pytest.fixture(scope="module")
def gpt_two() -> tuple[GPT, TracedSplit]:
    model = gpt()
    return model, trace_split(model, (tokens(),), split_points={"layers.2": "beginning"})


@pytest.fixture(scope="module")
def gpt_four() -> tuple[GPT, TracedSplit]:
    model = gpt()
    return model, trace_split(model, (tokens(),), split_points={f"layers.{i}": "beginning" for i in (1, 2, 3)})


# (a) conveyor's GPT, by split points and by counts; (g) the stages' state dicts make up the model's


@pytest.mark.parametrize("fixture", ["gpt_two", "gpt_four"])
def test_gpt_stages_by_split_points_equal_the_model(fixture: str, request: pytest.FixtureRequest) -> None:
    model, split = request.getfixturevalue(fixture)
    assert split.graph == StageGraph.chain(split.num_stages)
    stages = assert_matches_model(model, split, (tokens(),), gpt_loss)
    assert next(name for name, _ in stages[1].named_parameters()) == f"layers.{4 // split.num_stages}.norm1.weight"
    assert split.parameter_names(split.num_stages - 1)[-1] == "head.weight"
    assert sorted(state_keys(split)) == sorted(model.state_dict())


@pytest.mark.parametrize(
    ("fixture", "how"), [("gpt_two", {"num_stages": 2}), ("gpt_four", {"layers_per_stage": [1] * 4})]
)
def test_gpt_stages_by_count_equal_those_by_split_points(
    fixture: str, how: dict[str, Any], request: pytest.FixtureRequest
) -> None:
    model, by_points = request.getfixturevalue(fixture)
    split = trace_split(model, (tokens(),), **how)
    assert split.graph == by_points.graph
    for stage in range(split.num_stages):
        assert split.parameter_names(stage) == by_points.parameter_names(stage)
    assert_matches_model(model, split, (tokens(),), gpt_loss)


# (f) micro-batches of other sizes than the example's


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_stages_run_other_micro_batch_sizes(gpt_four: tuple[GPT, TracedSplit], batch: int) -> None:
    model, split = gpt_four
    assert_matches_model(model, split, (tokens(batch),), gpt_loss)


def test_an_example_of_one_sample_still_gives_a_dynamic_batch() -> None:
    model = Skip()
    split = trace_split(model, (floats(1),), split_points=SKIP_CUTS)
    for batch in (1, 2, 4):
        assert_matches_model(model, split, (floats(batch),), square_loss)


class SeqBranch(nn.Module):
    """Doubles the embedding of sequences longer than 4 (with `branch`): export takes that branch once, at the
    example's length; an optional mask multiplies the embedding position by position."""

    def __init__(self, branch: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.branch = branch
        self.embed = nn.Embedding(11, 6)
        self.blocks = nn.ModuleList(nn.Linear(6, 6) for _ in range(2))
        self.head = nn.Linear(6, 11)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed(tokens)
        if self.branch and tokens.shape[1] > 4:
            h = 2 * h
        if mask is not None:
            h = h * mask.unsqueeze(-1)
        for block in self.blocks:
            h = h + torch.tanh(block(h))
        return self.head(h)


def short(batch: int = 3, length: int = 6) -> torch.Tensor:
    return torch.randint(0, 11, (batch, length), generator=torch.Generator().manual_seed(length))


def test_a_length_the_export_fixed_raises_instead_of_running_another_graph() -> None:
    model = SeqBranch()
    split = trace_split(model, (short(3, 6),), num_stages=2)
    stages = [split.build_stage(index) for index in range(2)]
    # Run, the graph of a 6-long sequence would take the branch for a 3-long one too: not the model's answer.
    fixed = (
        r"input 'tokens' dimension 1 is 3, but the model was traced with it fixed at 6 \(its graph may bake that size"
        r" in or branch on it\): trace with an example of the shape you run, or mark the dimension dynamic"
        r" \(trace_split\(\.\.\., dynamic_shapes=\{'tokens': \{1: 'seq'\}\}\)"
    )
    with pytest.raises(ValueError, match=fixed):
        stages[0](short(2, 3))
    with pytest.raises(ValueError, match=r"input 'tokens' has 3 dimension\(s\) \(\[2, 6, 1\]\), but the model was"):
        stages[0](short(2, 6)[..., None])
    # A later stage checks what enters it too.
    with pytest.raises(
        ValueError, match=r"stage 1's input 0 \('\w+'\) dimension 1 is 3, but .* fixed at 6 .* micro-batch"
    ):
        stages[1](torch.randn(2, 3, 6))
    for batch in (1, 2, 5):  # the batch stays dynamic
        assert_matches_model(model, split, (short(batch, 6),), square_loss)


def test_dynamic_shapes_trace_more_dimensions_as_dynamic() -> None:
    model = SeqBranch()
    split = trace_split(model, (short(3, 6),), num_stages=2, dynamic_shapes={"tokens": {1: Dim.AUTO}})
    for length in (5, 9):
        assert_matches_model(model, split, (short(2, length),), square_loss)
    # Export found that the forward needs more than 4 positions: a shorter sequence is refused.
    with pytest.raises(ValueError, match=r"input 'tokens' dimension 1 is 4, but the model was traced for sizes of at"
                       r" least 5 \(its forward relies on that"):  # fmt: skip
        split.build_stage(0)(short(2, 4))
    # Dimensions of one name are one size.
    model = SeqBranch(branch=False)
    example = {"tokens": short(3, 6), "mask": torch.ones(3, 6)}
    split = trace_split(model, (), example, num_stages=2, dynamic_shapes={"tokens": {1: "seq"}, "mask": {-1: "seq"}})
    for length in (2, 7):
        assert_matches_model(model, split, {"tokens": short(2, length), "mask": torch.rand(2, length)}, square_loss)
    agree = r"input 'mask' dimension 1 is 4, but the model was traced with it equal to dimension 1 of input 'tokens',"
    with pytest.raises(ValueError, match=agree + r" which is 3"):
        split.build_stage(0)(tokens=short(2, 3), mask=torch.ones(2, 4))


def test_a_pipeline_step_on_a_length_the_export_fixed_raises(tmp_path: Path) -> None:
    """The issue's case: traced at 6, a step at 3 gave another loss than the model's, without a word."""
    from conveyor import Pipeline, PipelineSpec

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    model = SeqBranch()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        split = trace_split(model, (short(3, 6),), num_stages=2)
        pipe = Pipeline(split, PipelineSpec("interleaved-1f1b", 1, 2), loss_fn=loss_fn)
        loss = pipe.step(short(4, 6), short(4, 6) % 7)
        assert loss is not None
        assert_close(loss, loss_fn(model(short(4, 6)), short(4, 6) % 7), 1e-6, "the loss at the traced length")
        with pytest.raises(
            ValueError, match=r"input 'tokens' dimension 1 is 3, but the model was traced with it fixed"
        ):
            pipe.step(short(4, 3), short(4, 3) % 7)
    finally:
        dist.destroy_process_group()


def test_shapes_are_checked_once_per_input_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    from conveyor.split.traced.guards import ShapeGuards

    checked: list[tuple[int, ...]] = []
    verify = ShapeGuards._verify
    monkeypatch.setattr(
        ShapeGuards, "_verify", lambda self, values: (checked.append(values[0].shape), verify(self, values))
    )
    stage = trace_split(SeqBranch(), (short(3, 6),), num_stages=2).build_stage(0)
    for batch in (2, 2, 3, 2, 3):
        stage(short(batch, 6))
    assert checked == [(2, 6), (3, 6)]


def test_devices_in_the_graph_follow_the_stage(gpt_two: tuple[GPT, TracedSplit]) -> None:
    stage = gpt_two[1].build_stage(0, "meta")
    devices = {v for node in stage.graph.nodes for v in node.kwargs.values() if isinstance(v, torch.device)}
    assert devices == {torch.device("meta")}  # the positions' arange
    (hidden,) = stage(tokens().to("meta"))
    assert hidden.device.type == "meta" and hidden.shape == (3, SEQ, 32)


# (b) a skip connection travels directly


def test_a_skip_connection_goes_straight_to_its_stage() -> None:
    model = Skip()
    split = trace_split(model, (floats(),), split_points=SKIP_CUTS)
    assert split.graph.edges == (Edge(0, 1), Edge(0, 3), Edge(1, 2), Edge(2, 3))
    sent: dict[Edge, list[torch.Tensor]] = {}
    assert_matches_model(model, split, (floats(),), square_loss)
    run_stages(split, [split.build_stage(s) for s in range(4)], (floats(),), sent=sent)
    assert [t.shape for t in sent[Edge(1, 2)]] == [(3, 8)]  # only the block's output, not the skip as well
    assert [t.shape for t in sent[Edge(2, 3)]] == [(3, 8)]


def test_strict_export_cuts_the_same() -> None:
    model = Skip()
    split = trace_split(model, (floats(),), split_points=SKIP_CUTS, strict=True)
    assert split.graph.edges == (Edge(0, 1), Edge(0, 3), Edge(1, 2), Edge(2, 3))
    assert_matches_model(model, split, (floats(),), square_loss)


class Pool(nn.Module):
    """The last stage needs the batch size, and nothing it receives has it: it travels as a 0-d tensor."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.b(torch.tanh(self.a(x))).sum(0)
        return self.c(pooled).expand(x.shape[0], 4)


def test_a_size_no_input_of_a_stage_has_is_carried_as_a_tensor() -> None:
    model = Pool()
    split = trace_split(model, (floats(),), split_points={"b": "beginning", "c": "beginning"})
    assert split.graph.edges == (Edge(0, 1, (0,)), Edge(0, 2, (1,), grad=False), Edge(1, 2))
    sent: dict[Edge, list[torch.Tensor]] = {}
    run_stages(split, [split.build_stage(s) for s in range(3)], (floats(5),), sent=sent)
    (size,) = sent[Edge(0, 2, (1,), grad=False)]
    assert size.dtype == torch.int64 and size.dim() == 0 and size.item() == 5
    for batch in (2, 5):
        assert_matches_model(model, split, (floats(batch),), square_loss)


class Stateful(nn.Module):
    """Buffers updated in forward, a constant made in forward, a no_grad region, an unused module, a dict output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.norm, self.b = nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 4)
        self.unused = nn.Linear(2, 2)
        self.register_buffer("scale", torch.full((4,), 2.0))

    def forward(self, x: torch.Tensor, shift: float = 1.0) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            total = self.a(x).sum()
        h = self.norm(self.a(x)) * self.scale + torch.tensor([1.0, 2.0, 3.0, 4.0]) * shift
        return {"y": self.b(h) + total, "total": total}


def test_buffers_constants_and_no_grad_values_find_their_stages() -> None:
    model = Stateful()
    reference = Stateful()
    example = {"x": floats(), "shift": 1.0}
    split = trace_split(model, (), example, split_points={"norm": "beginning", "b": "beginning"})
    assert split.graph.edges == (Edge(0, 1, (1,)), Edge(0, 2, (0,), grad=False), Edge(1, 2))  # `total` skips stage 1
    stages = [split.build_stage(s) for s in range(3)]
    assert sorted(state_keys(split)) == sorted(model.state_dict())
    assert "unused.weight" in stages[0].state_dict()
    output = run_stages(split, stages, example, lambda out: out["y"].sum())
    expected = reference(floats())
    expected["y"].sum().backward()
    assert set(output) == {"y", "total"}
    assert_close(output["y"], expected["y"], 1e-6, "the output")
    assert_close(stages[1].get_buffer("norm.running_mean"), reference.norm.running_mean, 1e-6, "the running mean")
    assert int(stages[1].get_buffer("norm.num_batches_tracked")) == 1
    assert_close(stages[0].get_parameter("a.weight").grad, reference.a.weight.grad, 1e-5, "the gradient of a.weight")
    with pytest.raises(TypeError, match=r"traced with the non-tensor input 1\.0 .* got 2\.0: trace again"):
        stages[0](x=floats(), shift=2.0)


# (c) and (d) Hugging Face GPT-2: a tied embedding, keyword inputs, a mask every block uses


def gpt2_config() -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.GPT2Config(
        n_layer=4, n_embd=32, n_head=2, vocab_size=100, n_positions=16, use_cache=False, pad_token_id=0
    )


def test_gpt2_ties_its_embedding_and_head_across_stages() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(gpt2_config()).eval()
    split = trace_split(
        model, (), {"input_ids": tokens(vocab=100)}, split_points={f"transformer.h.{i}": "beginning" for i in (1, 2, 3)}
    )
    (tie,) = split.graph.ties
    assert tie.names == ((0, "transformer.wte.weight"), (3, "lm_head.weight"))
    stages = assert_matches_model(
        model,
        split,
        {"input_ids": tokens(vocab=100)},
        lambda out: F.cross_entropy(out.logits.flatten(0, 1), tokens(out.logits.shape[0], 100).flatten()),
        output_of=lambda out: out.logits,
    )
    first, last = stages[0].get_parameter("transformer.wte.weight"), stages[3].get_parameter("lm_head.weight")
    assert first is not last and first.data_ptr() != last.data_ptr()
    assert sorted(state_keys(split)) == sorted(model.state_dict())


def test_gpt2_classifier_sends_the_mask_from_stage_0_to_every_block() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2ForSequenceClassification(gpt2_config()).eval()

    def batch(size: int) -> dict[str, torch.Tensor]:
        ids, mask = tokens(size, 100), torch.ones(size, SEQ, dtype=torch.long)
        ids[0, 6:], mask[0, 6:] = 0, 0  # the first sample is padded
        return {"input_ids": ids, "attention_mask": mask}

    split = trace_split(model, (), batch(3), num_stages=4)
    assert [(e.src, e.dst, e.grad) for e in split.graph.edges] == [
        (0, 1, True),
        (0, 2, False),
        (0, 3, False),
        (1, 2, True),
        (2, 3, True),
    ]
    sent: dict[Edge, list[torch.Tensor]] = {}
    run_stages(split, [split.build_stage(s) for s in range(4)], batch(3), sent=sent)
    mask = next(t for t in sent[Edge(0, 1, split.graph.edge(0, 1).values)] if t.dtype == torch.bool)
    for stage in (2, 3):
        assert any(t is mask for t in sent[split.graph.edge(0, stage)]), f"the mask does not go 0->{stage} directly"
        assert all(t.dtype != torch.bool for t in sent[split.graph.edge(stage - 1, stage)])
    assert any(t.dtype == torch.int64 for t in sent[split.graph.edge(0, 3)])  # input_ids, for the pooling

    def loss(out: Any) -> torch.Tensor:
        return F.cross_entropy(out.logits, torch.tensor([0, 1, 0, 1, 1])[: out.logits.shape[0]])

    for size in (1, 2, 3):
        assert_matches_model(model, split, batch(size), loss, output_of=lambda out: out.logits)


# (e) pipe_split() in forward


class Marked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        pipe_split()
        h = torch.tanh(self.b(h))
        pipe_split()
        return self.c(h)


def test_pipe_split_markers_cut_the_graph() -> None:
    model = Marked()
    model(floats())  # a no-op when run eagerly
    split = trace_split(model, (floats(),))
    assert split.graph == StageGraph.chain(3)
    assert split.parameter_names(1) == ["b.weight", "b.bias"]
    assert_matches_model(model, split, (floats(),), square_loss)
    split = trace_split(model, (floats(),), split_points={"a": "end"})  # a split point adds a cut
    assert split.graph == StageGraph.chain(4)


# Train and eval


def test_stages_follow_train_and_eval_like_the_model() -> None:
    model = gpt(dropout=0.5)
    split = trace_split(model, (tokens(),), num_stages=2)
    assert all(module.training for module in model.modules())  # exporting in eval mode left it as it was
    stages = [split.build_stage(s) for s in range(2)]
    assert all(stage.training for stage in stages)
    torch.manual_seed(1)
    expected = model(tokens())
    torch.manual_seed(1)
    trained = run_stages(split, stages, (tokens(),))
    assert_close(trained, expected, 1e-6, "the output in train mode")
    model.eval()
    evaluated = run_stages(split, [stage.eval() for stage in stages], (tokens(),))
    assert_close(evaluated, model(tokens()), 1e-6, "the output in eval mode")
    assert not torch.allclose(evaluated, trained)


class ModeDependent(nn.Module):
    """In train mode the second stage also needs the input: the two modes' stages exchange different values."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.b(self.a(x))
        return h + x if self.training else h


def test_a_mode_the_stages_cannot_switch_to_raises() -> None:
    split = trace_split(ModeDependent(), (floats(),), split_points={"b": "beginning"})
    stage = split.build_stage(1)
    with pytest.raises(RuntimeError, match=r"stage 1 cannot run in eval mode: .*trace_split the model in eval mode"):
        stage.eval()
    assert stage.training


# (h) Errors that say what to change


def test_a_split_point_naming_no_submodule_suggests_the_nearest() -> None:
    with pytest.raises(
        ValueError, match=r"'layers\.7\.attn' names no submodule of GPT: did you mean 'layers\.3\.attn'"
    ):
        trace_split(gpt(), (tokens(),), split_points={"layers.7.attn": "beginning"})
    with pytest.raises(ValueError, match="'layers.1' is 'start': use 'beginning' or 'end'"):
        trace_split(gpt(), (tokens(),), split_points={"layers.1": "start"})


def test_split_points_out_of_execution_order() -> None:
    with pytest.raises(
        ValueError, match=r"must follow the order .* 'blocks\.0' \(beginning\) comes before 'blocks\.2'"
    ):
        trace_split(Skip(), (floats(),), split_points={"blocks.2": "beginning", "blocks.0": "beginning"})


def test_split_points_that_leave_a_stage_empty() -> None:
    with pytest.raises(ValueError, match=r"stage 1 of 3 would run nothing: .*'blocks\.0' \(end\) and 'blocks\.1'"):
        trace_split(Skip(), (floats(),), split_points={"blocks.0": "end", "blocks.1": "beginning"})
    with pytest.raises(ValueError, match=r"stage 1 of 2 would run nothing: .*'head' \(end\) and the end of the model"):
        trace_split(Skip(), (floats(),), split_points={"head": "end"})


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ({"num_stages": 5}, r"num_stages=5, but layers holds 4 blocks: use 1 to 4 stages"),
        ({"layers_per_stage": [2, 3]}, r"must be non-negative and add up to the 4 blocks of layers"),
        ({"layers_per_stage": [2, 0, 2]}, r"gives stage 1 no blocks"),
        ({"num_stages": 2, "split_points": {"layers.1": "end"}}, r"not both"),
        ({"num_stages": 2, "blocks": "norm"}, r"'norm' is not a non-empty ModuleList/ModuleDict/Sequential of GPT"),
    ],
)
def test_bad_stage_counts(how: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        trace_split(gpt(), (tokens(),), **how)


def test_two_block_containers_ask_which_one() -> None:
    model = nn.Module()
    model.encoder, model.decoder = nn.ModuleList([nn.Linear(2, 2)]), nn.ModuleList([nn.Linear(2, 2)])
    with pytest.raises(ValueError, match=r"2 outermost .* \(encoder, decoder\): name the one .* blocks="):
        trace_split(model, (torch.ones(2, 2),), num_stages=2)


def test_markers_and_a_stage_count_conflict() -> None:
    model = nn.Sequential(Marked())
    with pytest.raises(ValueError, match=r"marks 2 cut\(s\) with pipe_split\(\), and num_stages"):
        trace_split(model, (floats(),), num_stages=1)
    with pytest.raises(ValueError, match=r"Skip has no pipe_split\(\) in its forward: say where to cut"):
        trace_split(Skip(), (floats(),))


def test_an_example_of_the_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"Skip fails on the example micro-batch itself \(RuntimeError: mat1 and mat2"):
        trace_split(Skip(), (torch.randn(3, 5),), split_points=SKIP_CUTS)
    with pytest.raises(ValueError, match=r"disagree on the batch size \(dim 0\): \[2, 3\]"):
        trace_split(Skip(), (floats(3), torch.ones(2)), split_points=SKIP_CUTS)


class FixedBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x).view(3, 4)  # the batch size written into the code


class FixedLength(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(1, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x.view(x.shape[0], 6, 1))  # the length written into the code


def test_what_dynamic_shapes_cannot_mark() -> None:
    def marking(model: nn.Module, dynamic: dict[str, Any]) -> None:
        trace_split(model, (short(3, 6),), num_stages=2, dynamic_shapes=dynamic)

    with pytest.raises(ValueError, match=r"names 'ids', which is no tensor input of SeqBranch's forward in the example:"
                       r" name one of \['tokens'\]"):  # fmt: skip
        marking(SeqBranch(), {"ids": {1: "seq"}})
    with pytest.raises(ValueError, match=r"names dimension 0, the batch, which is always dynamic"):
        marking(SeqBranch(), {"tokens": {0: "seq"}})
    with pytest.raises(ValueError, match=r"names dimension 2, but 'tokens' has 2 dimensions"):
        marking(SeqBranch(), {"tokens": {2: "seq"}})
    with pytest.raises(ValueError, match=r"is 'batch': name a dimension by an identifier other than 'batch'"):
        marking(SeqBranch(), {"tokens": {1: "batch"}})
    limits = (
        r"SeqBranch's code limits the dimension 'seq', which dynamic_shapes marks dynamic, to 5 <= seq: give it that"
        r" range \(seq = Dim\('seq', min=5\), as torch.export.Dim\), or mark it Dim.AUTO"
    )
    with pytest.raises(ValueError, match=limits):
        marking(SeqBranch(), {"tokens": {1: "seq"}})
    with pytest.raises(ValueError, match=r"FixedLength's code fixes the dimension 'seq', which dynamic_shapes marks"
                       r" dynamic, to 6: leave it out of dynamic_shapes"):  # fmt: skip
        trace_split(
            FixedLength(), (torch.randn(3, 6),), split_points={"a": "beginning"}, dynamic_shapes={"x": {1: "seq"}}
        )


def test_a_model_that_fixes_the_batch_size() -> None:
    with pytest.raises(ValueError, match=r"FixedBatch's code fixes the batch size \(dim 0 of its inputs\) to 3"):
        trace_split(FixedBatch(), (floats(),), split_points={"a": "end"})


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if h.sum() > 0:  # data-dependent control flow: export cannot capture it
            return h
        return -h


def test_a_model_export_cannot_capture_names_the_construct_and_the_manual_split() -> None:
    with pytest.raises(
        RuntimeError, match=r"cannot capture DataDependent \(at test_split_traced\.py:\d+, in forward: if"
    ):
        trace_split(DataDependent(), (floats(),), split_points={"a": "end"})
    with pytest.raises(RuntimeError, match=r"data-dependent .* conveyor\.split_model"):
        trace_split(DataDependent(), (floats(),), split_points={"a": "end"})


def test_a_stage_outside_the_split(gpt_four: tuple[GPT, TracedSplit]) -> None:
    with pytest.raises(ValueError, match="stage 4 does not exist in this 4-stage split"):
        gpt_four[1].build_stage(4)


def test_stage_0_is_called_like_the_example(gpt_four: tuple[GPT, TracedSplit]) -> None:
    stage = gpt_four[1].build_stage(0)
    with pytest.raises(TypeError, match=r"stage 0 was traced with keyword inputs \[\]; got \['x'\]"):
        stage(x=tokens())


# (i) From a builder: exported on the meta device, each stage materializes only its own tensors


def gpt_builder() -> GPT:
    return GPT(GPTConfig(layers=4, dim=32, heads=2, context=16))


def own_bytes(module: nn.Module) -> int:
    """Bytes of the distinct storages of a module's parameters and buffers, but the constants a stage holds."""
    buffers = [t for name, t in module.named_buffers() if not name.startswith(("_train_", "_eval_"))]
    tensors = [*module.parameters(), *buffers]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def assert_same_tensors(actual: nn.Module, expected: nn.Module, stage: int) -> None:
    """Both stages hold the same parameters and buffers, under the same names, bitwise equal."""
    for named in ("named_parameters", "named_buffers"):
        have = dict(getattr(actual, named)(remove_duplicate=False))
        want = dict(getattr(expected, named)(remove_duplicate=False))
        assert list(have) == list(want), f"stage {stage}'s {named} differ: {list(have)} against {list(want)}"
        for name, tensor in have.items():
            assert tensor.dtype == want[name].dtype, f"stage {stage}'s {name} is {tensor.dtype}, not {want[name].dtype}"
            assert tensor.requires_grad == want[name].requires_grad, f"stage {stage}'s {name} differs in requires_grad"
            assert torch.equal(tensor, want[name]), f"stage {stage}'s {name} differs from the CPU build's"


def assert_built_like_the_model(
    builder: Callable[[], nn.Module], seed: int, example: Any, **how: Any
) -> tuple[nn.Module, TracedSplit]:
    """Traced from `builder`, each stage holds exactly the tensors of the same stage traced from
    `torch.manual_seed(seed); builder()` (returned), and materializes only those; the model stays on meta."""
    args, kwargs = ((), example) if isinstance(example, dict) else (example, {})
    split = trace_split(builder, args, kwargs, seed=seed, **how)
    deferred = split.source
    assert isinstance(deferred, DeferredModel)
    torch.manual_seed(seed)
    model = builder()
    reference = trace_split(model, args, kwargs, **how)
    assert split.graph == reference.graph
    for stage in range(split.num_stages):
        built = split.build_stage(stage)
        assert deferred.computed_bytes == own_bytes(built), f"stage {stage} computed more than its own tensors"
        assert own_bytes(built) < own_bytes(model)
        assert_same_tensors(built, reference.build_stage(stage), stage)
    assert all(t.is_meta for t in [*deferred.module.parameters(), *deferred.module.buffers()])
    return model, split


@pytest.mark.parametrize("how", [{"split_points": {f"layers.{i}": "beginning" for i in (1, 2, 3)}}, {"num_stages": 2}])
def test_gpt_from_a_builder_equals_the_cpu_build(how: dict[str, Any]) -> None:
    model, split = assert_built_like_the_model(gpt_builder, 3, (tokens(),), **how)
    for batch in (3, 5):
        assert_matches_model(model, split, (tokens(batch),), gpt_loss)
    assert split.build_stage(0).get_parameter("tok_emb.weight").device.type == "cpu"


def test_gpt2_from_a_builder_materializes_the_tied_head_under_its_own_name() -> None:
    transformers = pytest.importorskip("transformers")
    config = gpt2_config()
    cuts = {f"transformer.h.{i}": "beginning" for i in (1, 2, 3)}
    example = {"input_ids": tokens(vocab=100)}
    model, split = assert_built_like_the_model(
        lambda: transformers.GPT2LMHeadModel(config).eval(), 0, example, split_points=cuts
    )
    (tie,) = split.graph.ties
    assert tie.names == ((0, "transformer.wte.weight"), (3, "lm_head.weight"))
    assert_matches_model(
        model,
        split,
        example,
        lambda out: F.cross_entropy(out.logits.flatten(0, 1), tokens(out.logits.shape[0], 100).flatten()),
        output_of=lambda out: out.logits,
    )


def test_a_builder_whose_stages_follow_train_and_eval() -> None:
    def builder() -> GPT:
        return GPT(GPTConfig(layers=2, dim=32, heads=2, context=16, dropout=0.5))

    split = trace_split(builder, (tokens(),), num_stages=2, seed=1)
    torch.manual_seed(1)
    model = builder()
    stages = [split.build_stage(s) for s in range(2)]
    torch.manual_seed(2)
    expected = model(tokens())
    torch.manual_seed(2)
    assert_close(run_stages(split, stages, (tokens(),)), expected, 1e-6, "the output in train mode")
    model.eval()
    evaluated = run_stages(split, [stage.eval() for stage in stages], (tokens(),))
    assert_close(evaluated, model(tokens()), 1e-6, "the output in eval mode")


class MovedConstant(nn.Module):
    """A tensor made on the CPU in forward and moved to the input's device: a constant with values, even on meta."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x) * torch.tensor([1.0, 2.0, 3.0, 4.0]).to(x.device))


@pytest.mark.parametrize(
    ("builder", "how"),
    [
        (Marked, {}),
        pytest.param(
            Skip,
            {"split_points": SKIP_CUTS, "strict": True},
            # Dynamo's own check of a meta parameter's alignment; harmless, and not ours to fix
            marks=pytest.mark.filterwarnings("ignore:Accessing the data pointer of FakeTensor"),
        ),
        (Pool, {"split_points": {"b": "beginning", "c": "beginning"}}),
        (MovedConstant, {"split_points": {"b": "beginning"}}),
    ],
)
def test_small_models_from_a_builder(builder: Callable[[], nn.Module], how: dict[str, Any]) -> None:
    model, split = assert_built_like_the_model(builder, 0, (floats(),), **how)
    assert_matches_model(model, split, (floats(),), square_loss)


class DataConstant(nn.Module):
    """A tensor made from data in forward: lifted as a constant, which on the meta device has no values."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x) * torch.tensor([1.0, 2.0, 3.0, 4.0], device=x.device))


def test_what_a_builder_cannot_trace_says_what_to_change() -> None:
    with pytest.raises(
        ValueError, match=r"Stateful's code \(at test_split_traced\.py:\d+, .*makes a tensor on the CPU"
    ):
        trace_split(Stateful, (), {"x": floats()}, split_points={"b": "beginning"})
    with pytest.raises(ValueError, match=r"DataConstant's forward \(at test_split_traced\.py:\d+.*CPU and move it"):
        trace_split(DataConstant, (floats(),), split_points={"b": "beginning"})
    model = DataConstant()  # built, it traces
    assert_matches_model(
        model, trace_split(model, (floats(),), split_points={"b": "beginning"}), (floats(),), square_loss
    )
    with pytest.raises(RuntimeError, match=r"cannot capture DataDependent \(at test_split_traced\.py:\d+, in forward"):
        trace_split(DataDependent, (floats(),), split_points={"a": "end"})
    with pytest.raises(ValueError, match=r"Skip fails on the example micro-batch itself"):
        trace_split(Skip, (torch.randn(3, 5),), split_points=SKIP_CUTS)
    with pytest.raises(TypeError, match=r"an nn.Module or a function that builds one; got 42"):
        trace_split(42, (floats(),))  # type: ignore[arg-type]
