"""Train your own Hugging Face model on your own text in a pipeline, from Python (`conveyor train --model DIR
--data FILE` does the same from the command line).

    python examples/train_your_model.py MODEL_DIR DATA [--ranks 2 --steps 30 --out OUT]

MODEL_DIR is a local folder written by `save_pretrained` (config, weights, tokenizer); DATA a text file, a
folder of text files or a .jsonl file with a "text" field. The weights trained end in OUT as a folder that
`from_pretrained` loads. Needs the [hf] extra.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conveyor import PipelineSpec, Trainer, TrainSettings, losses, run_ranks
from conveyor.data import TokenSequences, read_documents, tokenize


def rank_main(rank: int, world: int, args: argparse.Namespace) -> None:
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    documents = tokenize(read_documents(args.data), tokenizer)  # each document's ids, end-of-text appended
    data = TokenSequences(documents, length=32, pad_id=tokenizer.pad_token_id, attention_mask=True)
    model = AutoModelForCausalLM.from_pretrained(args.model, use_cache=False, dtype=torch.float32)
    trainer = Trainer(
        model,  # traced on one micro-batch of the data and cut into `ranks` stages at its block boundaries
        PipelineSpec("1f1b", ranks=world, microbatches=4),
        loss_fn=losses.causal_lm,  # a token mean over the padded labels, exact however padding falls
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
        data=data,
        settings=TrainSettings(steps=args.steps, batch_size=8, checkpoint_dir=args.checkpoints, progress=False),
    )
    trainer.fit()  # prints the losses on the last stage's rank; writes checkpoint step-<steps>


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a local Hugging Face model folder (save_pretrained)")
    parser.add_argument("data", help="a text file, a folder of text files, or a .jsonl file with a text field")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--checkpoints", default="checkpoints", help="checkpoint folder (default: %(default)s)")
    parser.add_argument("--out", help="also write the trained model there as a Hugging Face folder")
    args = parser.parse_args()
    run_ranks(rank_main, args.ranks, (args,), timeout_s=600)
    if args.out:
        # The checkpoint holds the unsplit model's names: load it into the model and save it as a folder.
        from conveyor import checkpoint

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        checkpoint.load_model(model, checkpoint.latest(args.checkpoints), settings={"precision": "fp32"})
        model.save_pretrained(args.out)
        AutoTokenizer.from_pretrained(args.model).save_pretrained(args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
