"""Data for training: text from files (or the standard library's source), cut into fixed-length sequences,
and the stream of mini-batches a run reads, with a position a checkpoint keeps."""

from .batches import Batches, fixed_batches
from .stdlib_text import stdlib_documents
from .text_files import ByteTokenizer, TokenSequences, read_documents, tokenize

__all__ = [
    "Batches",
    "ByteTokenizer",
    "TokenSequences",
    "fixed_batches",
    "read_documents",
    "stdlib_documents",
    "tokenize",
]
