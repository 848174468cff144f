"""The tutorial's second example with conveyor: GPT-2 for sequence classification, split automatically into 4 stages.

    python examples/gpt2_classification.py                    # spawns its 4 ranks; GPT-2's real size (124M)
    python examples/gpt2_classification.py --small            # a tiny GPT-2, for a quick look
    torchrun --nproc-per-node 4 examples/gpt2_classification.py

Needs Hugging Face transformers (`pip install "conveyor[hf]"`); the model is
built from a config with random weights, so nothing is downloaded. No rank
ever holds the whole model: each builds it on the meta device, traces it with
torch.export, cuts it before blocks 3, 6 and 9 (as the tutorial's split_spec
does) and materializes only its own stage. Every rank prints its stage's size;
the last stage's rank prints the loss of each training step.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F

from conveyor import Pipeline, PipelineSpec, run_ranks, trace_split

BATCH, SEQ, MICROBATCHES, LABELS = 8, 64, 4, 2


def gpt2_config(small: bool) -> Any:
    from transformers import GPT2Config

    sizes = {"n_layer": 4, "n_embd": 64, "n_head": 4, "n_positions": SEQ} if small else {}  # else GPT-2's 124M
    return GPT2Config(**sizes, num_labels=LABELS, pad_token_id=50256, use_cache=False)


def batches(steps: int) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """Random right-padded sequences with their attention masks and labels (every rank draws the same)."""
    generator = torch.Generator().manual_seed(0)
    made = []
    for _ in range(steps):
        ids = torch.randint(0, 50000, (BATCH, SEQ), generator=generator)
        lengths = torch.randint(SEQ // 4, SEQ + 1, (BATCH,), generator=generator)
        mask = (torch.arange(SEQ) < lengths[:, None]).long()
        inputs = {"input_ids": torch.where(mask.bool(), ids, 50256), "attention_mask": mask}
        made.append((inputs, torch.randint(0, LABELS, (BATCH,), generator=generator)))
    return made


def loss_fn(output: Any, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output.logits, labels)


def rank_main(rank: int, world: int, small: bool, steps: int) -> None:
    from transformers import GPT2ForSequenceClassification

    torch.manual_seed(100 + rank)  # GPT-2's dropout draws from each rank's generator: seeded, a run repeats
    config = gpt2_config(small)
    data = batches(steps)
    example = {name: tensor[: BATCH // MICROBATCHES] for name, tensor in data[0][0].items()}  # one micro-batch
    per_rank = config.n_layer // world
    print(f"[rank {rank}] decoders per rank = {per_rank}", flush=True)
    split = trace_split(
        lambda: GPT2ForSequenceClassification(config),
        example_kwargs=example,
        split_points={f"transformer.h.{i * per_rank}": "beginning" for i in range(1, world)},
        seed=0,
    )
    pipe = Pipeline(
        split,
        PipelineSpec("gpipe", world, MICROBATCHES),
        loss_fn=loss_fn,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-4),
    )
    for stage, held in pipe.stages.items():
        print(
            f"Pipeline stage {stage} {sum(p.numel() for p in held.module.parameters()) / 1e6:.0f}M params", flush=True
        )
    if rank == 0:
        print(split.graph.describe(), flush=True)
    for step, (inputs, labels) in enumerate(data):
        loss = pipe.step(inputs, labels)
        if loss is not None:
            print(f"step {step}: loss {loss.item():.4f}", flush=True)
    pipe.close()
    print(f"Rank {rank} completes", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a tiny GPT-2 (4 blocks of width 64) instead of 124M")
    parser.add_argument("--steps", type=int, default=2)
    options = parser.parse_args()
    try:
        import transformers  # noqa: F401
    except ImportError:
        parser.exit(2, 'this example needs Hugging Face transformers: pip install "conveyor[hf]"\n')
    run_ranks(rank_main, 4, (options.small, options.steps), timeout_s=900)


if __name__ == "__main__":
    main()
