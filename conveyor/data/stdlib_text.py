"""A corpus every machine has: the Python standard library's own source, one document per file."""

from __future__ import annotations

import sysconfig
from pathlib import Path

__all__ = ["stdlib_documents"]


def stdlib_documents(max_bytes: int = 4_000_000) -> list[str]:
    """Up to `max_bytes` of the standard library's .py files, in path order, one document each."""
    root = Path(sysconfig.get_paths()["stdlib"])
    documents: list[str] = []
    total = 0
    for path in sorted(root.glob("*.py")):
        text = path.read_bytes()[: max_bytes - total]
        total += len(text)
        documents.append(text.decode("utf-8", errors="replace"))
        if total >= max_bytes:
            break
    if total == 0:
        raise FileNotFoundError(f"found no Python source files under {root}")
    return documents
