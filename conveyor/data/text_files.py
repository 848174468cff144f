"""Text from files, cut into fixed-length training sequences: documents in, (inputs, labels) samples out.

A data path is a text file (one document), a folder of text files (each a document; a `.jsonl` file
among them counts as JSON lines), or a `.jsonl` file whose lines are objects with a `text` field (each
a document). Each document is tokenized on its own, an end-of-text token appended where the tokenizer
has one, and cut into pieces of `length` tokens; a document's last piece is padded, its padding masked
out of attention and labelled -100, so that a loss over tokens (`conveyor.losses.causal_lm`) skips it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils.data import Dataset

__all__ = ["ByteTokenizer", "TokenSequences", "Tokenizer", "check_data", "read_documents", "tokenize"]

IGNORE_INDEX = -100


class Tokenizer(Protocol):
    """What turning text into ids needs: a Hugging Face tokenizer has it, `ByteTokenizer` too."""

    @property
    def eos_token_id(self) -> int | None: ...

    @property
    def pad_token_id(self) -> int | None: ...

    def __call__(self, text: str, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes as ids (a vocabulary of 256): what conveyor's own models read, no tokenizer needed."""

    eos_token_id: int | None = None
    pad_token_id: int | None = 0
    vocab_size: int = 256

    def __call__(self, text: str, **kwargs: Any) -> dict[str, list[int]]:
        return {"input_ids": list(text.encode("utf-8"))}


def read_documents(path: str | Path) -> list[str]:
    """The documents at `path` (see the module's docstring), in a fixed order (a folder's files sorted)."""
    source = Path(path)
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise ValueError(f"the data folder {source} holds no files")
        return [doc for file in files for doc in _read_file(file)]
    if not source.is_file():
        raise ValueError(f"no data at {source}: give a text file, a folder of text files or a .jsonl file")
    documents = _read_file(source)
    if not documents:
        raise ValueError(f"the data file {source} holds no text")
    return documents


def check_data(path: str | Path) -> None:
    """What can be checked of a data path without reading it all: that it exists, and that a .jsonl file's
    first record has its text (the rest is read, and checked, where it is used)."""
    source = Path(path)
    if not source.exists():
        raise ValueError(f"no data at {source}: give a text file, a folder of text files or a .jsonl file")
    if source.is_file() and source.suffix == ".jsonl":
        with source.open(encoding="utf-8", errors="replace") as file:
            first = next((line for line in file if line.strip()), "")
        if first:
            _read_record(first, source, 1)


def _read_record(line: str, file: Path, number: int) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{file}, line {number}: not JSON ({error.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        found = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f'{file}, line {number}: each line needs a "text" field holding a string; found {found}')
    return record["text"]


def _read_file(file: Path) -> list[str]:
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{file} is not UTF-8 text (byte {error.start}): conveyor reads text files") from None
    if file.suffix != ".jsonl":
        return [text] if text else []
    records = (_read_record(line, file, number) for number, line in enumerate(text.splitlines(), 1) if line.strip())
    return [text for text in records if text]


def tokenize(documents: Sequence[str], tokenizer: Tokenizer) -> list[list[int]]:
    """Each document's ids, the tokenizer's end-of-text id appended (when it has one)."""
    eos = tokenizer.eos_token_id
    tokenized = []
    for text in documents:
        # verbose=False: a document longer than the model's positions is expected here, it is cut below.
        ids = list(tokenizer(text, verbose=False)["input_ids"])
        tokenized.append(ids + ([eos] if eos is not None else []))
    return tokenized


class TokenSequences(Dataset[tuple[Any, torch.Tensor]]):
    """Fixed-length sequences cut from tokenized documents: sample i is (inputs, labels).

    `inputs` is the ids, or with `attention_mask` a dict of `input_ids` and `attention_mask` (as a Hugging
    Face model takes them); `labels` are the ids with -100 at the padding, for a loss that shifts them
    (`conveyor.losses.causal_lm`). A piece of one token predicts nothing and is left out.
    """

    def __init__(
        self, documents: Sequence[Sequence[int]], length: int, pad_id: int, attention_mask: bool = False
    ) -> None:
        if length < 2:
            raise ValueError(f"a training sequence needs at least 2 tokens; got a length of {length}")
        self.length, self.pad_id, self.attention_mask = length, pad_id, attention_mask
        self._ids = torch.tensor([token for document in documents for token in document], dtype=torch.long)
        pieces = []
        start = 0
        for document in documents:
            for offset in range(0, len(document), length):
                size = min(length, len(document) - offset)
                if size >= 2:
                    pieces.append((start + offset, size))
            start += len(document)
        if not pieces:
            raise ValueError("the data holds no document of 2 tokens or more")
        self._pieces = torch.tensor(pieces, dtype=torch.long)

    def __len__(self) -> int:
        return len(self._pieces)

    def __getitem__(self, index: int) -> tuple[Any, torch.Tensor]:
        start, size = (int(v) for v in self._pieces[index])
        ids = torch.full((self.length,), self.pad_id, dtype=torch.long)
        ids[:size] = self._ids[start : start + size]
        labels = ids.clone()
        labels[size:] = IGNORE_INDEX
        if not self.attention_mask:
            return ids, labels
        mask = torch.zeros(self.length, dtype=torch.long)
        mask[:size] = 1
        return {"input_ids": ids, "attention_mask": mask}, labels

    @property
    def max_id(self) -> int:
        return int(self._ids.max()) if len(self._ids) else 0

    def split(self, held_out: float) -> tuple[TokenSequences, TokenSequences]:
        """(training, held out): the last `held_out` share of the sequences (at least one), in document order,
        so held-out text is mostly whole documents the training never sees."""
        count = max(1, round(len(self) * held_out))
        if count >= len(self):
            raise ValueError(f"the data has {len(self)} sequence(s): too few to hold some out for evaluation")
        return self._subset(slice(0, len(self) - count)), self._subset(slice(len(self) - count, None))

    def _subset(self, part: slice) -> TokenSequences:
        subset = object.__new__(TokenSequences)
        subset.length, subset.pad_id, subset.attention_mask = self.length, self.pad_id, self.attention_mask
        subset._ids, subset._pieces = self._ids, self._pieces[part]
        return subset
