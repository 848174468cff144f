"""The tutorial's first example with conveyor: a Transformer split by hand into 2 stages on 2 ranks.

    python examples/manual_transformer.py                    # spawns its 2 ranks
    torchrun --nproc-per-node 2 examples/manual_transformer.py

The model is written the way a manual split wants it: its blocks sit in a
ModuleDict (deleting a block keeps the others' names, so checkpoints load at
any stage count) and its forward skips any part set to None (the parts a
stage does not own). Each rank builds the model on the meta device and
materializes only its own stage, with exactly the weights a CPU build would
give. Every rank prints what it holds; the last stage's rank prints each
micro-batch's loss, step after step, and checks the first step against the
unsplit model.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from conveyor import Pipeline, PipelineSpec, manual_split, run_ranks


@dataclass(frozen=True)
class ModelArgs:
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    vocab_size: int = 10000
    context: int = 64


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict(
            {
                str(i): nn.TransformerEncoderLayer(args.dim, args.n_heads, dropout=0.0, batch_first=True)
                for i in range(args.n_layers)
            }
        )
        self.norm: nn.LayerNorm | None = nn.LayerNorm(args.dim)
        self.output: nn.Linear | None = nn.Linear(args.dim, args.vocab_size)
        # Every stage needs the causal mask: a buffer of the whole model, kept on each stage.
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(args.context), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        mask = self.causal[: h.shape[1], : h.shape[1]]
        for layer in self.layers.values():
            h = layer(h, src_mask=mask, is_causal=True)
        h = self.norm(h) if self.norm is not None else h
        return self.output(h) if self.output is not None else h


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def rank_main(rank: int, world: int, steps: int) -> None:
    args = ModelArgs()
    split = manual_split(lambda: Transformer(args), num_stages=world, seed=0)
    pipe = Pipeline(
        split,
        PipelineSpec("gpipe", world, 4),
        loss_fn=loss_fn,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
    )
    for stage, held in pipe.stages.items():
        count = sum(p.numel() for p in held.module.parameters())
        print(f"rank {rank}: stage {stage} holds {count / 1e6:.1f}M parameters", flush=True)

    generator = torch.Generator().manual_seed(1)  # every rank draws the same batches
    for step in range(steps):
        tokens = torch.randint(0, args.vocab_size, (8, args.context + 1), generator=generator)
        losses: list[torch.Tensor] = []
        loss = pipe.step(tokens[:, :-1], tokens[:, 1:], losses=losses)
        if loss is not None:
            print(
                f"step {step}: losses {[round(x.item(), 4) for x in losses]}, mini-batch {loss.item():.4f}", flush=True
            )
            if step == 0:
                _check_against_one_process(args, tokens, loss)
    pipe.close()


def _check_against_one_process(args: ModelArgs, tokens: torch.Tensor, loss: torch.Tensor) -> None:
    """The pipeline's first loss is the unsplit model's (same seed, same init)."""
    torch.manual_seed(0)
    whole = Transformer(args)
    expected = loss_fn(whole(tokens[:, :-1]), tokens[:, 1:])
    error = abs(loss.item() - expected.item()) / expected.item()
    print(f"unsplit model: {expected.item():.4f} (relative difference {error:.1e})", flush=True)
    assert error < 1e-5, "the pipeline does not compute the unsplit model's loss"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    options = parser.parse_args()
    run_ranks(rank_main, 2, (options.steps,), timeout_s=300)  # under torchrun: this process is one of its ranks


if __name__ == "__main__":
    main()
