"""What splitting the backward costs: B then W against one whole backward, for one stage of the benchmark GPT.

One thread, one process: a middle stage (2 of the 8 layers, dim 256) on a micro-batch of 2 x 128 tokens.

    python benchmarks/split_backward_cost.py
    python benchmarks/split_backward_cost.py --rounds 5 --dim 512
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from conveyor.models import GPT, GPTConfig
from conveyor.runtime.stage import Stage
from conveyor.split import split_model


def backward_ms(stage: Stage, x: torch.Tensor, split: bool, repeats: int = 12) -> tuple[float, float]:
    """Median milliseconds of B (or the whole backward) and of W."""
    b_times, w_times = [], []
    for _ in range(repeats):
        (output,) = stage.forward(0, [x.clone().requires_grad_()])  # a middle stage takes its input tensors
        start = time.perf_counter()
        stage.backward(0, [torch.ones_like(output)], split=split)
        middle = time.perf_counter()
        if split:
            stage.weight(0)
        b_times.append(middle - start)
        w_times.append(time.perf_counter() - middle)
    return 1e3 * statistics.median(b_times[2:]), 1e3 * statistics.median(w_times[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="measurements printed, each a median (3)")
    parser.add_argument(
        "--repeats", type=int, default=12, help="backwards per median, the first 2 of them dropped (12)"
    )
    parser.add_argument("--dim", type=int, default=256, help="model width (256)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sample; 2 samples (128)")
    args = parser.parse_args()
    if args.repeats < 3:
        parser.error(f"--repeats must be at least 3 (the first 2 are dropped); got {args.repeats}")
    torch.set_num_threads(1)
    config = GPTConfig(dim=args.dim, layers=8, heads=4, context=args.seq)
    module = split_model(lambda: GPT(config), 1, 4)
    stage = Stage(module, 1, 4)
    x = torch.randn(2, args.seq, args.dim)
    for _ in range(args.rounds):
        whole, _ = backward_ms(stage, x, split=False, repeats=args.repeats)
        b, w = backward_ms(stage, x, split=True, repeats=args.repeats)
        extra = (b + w) / whole - 1
        print(f"whole backward {whole:.1f} ms;  B {b:.1f} ms + W {w:.1f} ms = {b + w:.1f} ms ({extra:+.1%})")


if __name__ == "__main__":
    main()
