"""A user's local Hugging Face folder, made here with nothing downloaded: a tiny Llama-style causal LM with tied
embeddings, a byte-level BPE tokenizer trained on a few sentences, and weights trained a little on them, so
its loss is well below ln(vocabulary)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

TEXT = [
    "the quick brown fox jumps over the lazy dog, and the dog sleeps on. ",
    "a pipeline splits a model into stages and runs micro-batches through them. ",
    "stages run on ranks; each rank holds some layers of the model and sends activations on. ",
    "the loss of a padded batch must count tokens, not samples, or the gradients are wrong. ",
    "checkpoints keep the weights, the optimizer state and the position in the data. ",
]


def make_folder(folder: Path, pretrain_steps: int = 30) -> Any:
    """Save the model and its tokenizer to `folder`; returns the tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(TEXT * 10, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    documents = [tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] for text in TEXT]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(pretrain_steps):
        for ids in documents:
            tokens = torch.tensor([ids[:32]])
            model(input_ids=tokens, labels=tokens).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return tokenizer


def write_jsonl(path: Path, repeats: int = 4) -> Path:
    """The sentences as a .jsonl file, one document per line, some twice as long."""
    with path.open("w") as file:
        for k in range(repeats):
            for text in TEXT:
                file.write(json.dumps({"text": text * (1 + k % 2)}) + "\n")
    return path


def mean_token_loss(model: Any, tokenizer: Any, path: Path, length: int = 64) -> float:
    """The model's mean next-token loss over the documents of `path` (each cut to `length` tokens)."""
    total, count = 0.0, 0
    for line in path.read_text().splitlines():
        ids = torch.tensor([tokenizer(json.loads(line)["text"])["input_ids"][:length]])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss
        total += loss.item() * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    return total / count
