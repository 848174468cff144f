"""What verifying a checkpoint costs: checksums, the restricted `.metadata` reader, against a whole load.

Trains `conveyor train`'s default model for one step with a checkpoint (2 ranks), then times, in this
process, `checkpoint.verify` and its parts (hashing every file; reading `.metadata` with conveyor's reader,
and with pickle for comparison) and `checkpoint.load_model` (which verifies, then reads every tensor), and
the in-memory speed of SHA-256 and blake2b on 64 MiB. Medians of `--repeats` runs.

    python benchmarks/checkpoint_verify.py --json out.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from conveyor import checkpoint
from conveyor.checkpoint_manifest import file_record
from conveyor.checkpoint_metadata import read_metadata
from conveyor.models import GPT, GPTConfig


def _median_ms(run: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _hash_rate(make: Callable[[], object], data: bytes, repeats: int) -> float:
    """GB/s of a hash over `data` in memory (the best of `repeats`)."""
    best = float("inf")
    for _ in range(repeats):
        hasher: object = make()
        start = time.perf_counter()
        hasher.update(data)  # type: ignore[attr-defined]
        best = min(best, time.perf_counter() - start)
    return len(data) / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dim", type=int, default=GPTConfig().dim, help="model width (default: conveyor train's)")
    parser.add_argument("--layers", type=int, default=GPTConfig().layers, help="blocks (default: conveyor train's)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        sizes = ["--dim", str(args.dim), "--layers", str(args.layers)]
        subprocess.run(
            [sys.executable, "-m", "conveyor", "train", "--steps", "1", "--no-progress", "--checkpoint-dir", scratch]
            + sizes,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        folder = Path(scratch) / "step-1"
        files = sorted(p for p in folder.iterdir() if p.is_file())
        model = GPT(GPTConfig(dim=args.dim, layers=args.layers))  # the model conveyor train trained
        results = {
            "bytes": sum(p.stat().st_size for p in files),
            "files": len(files),
            "metadata_bytes": (folder / ".metadata").stat().st_size,
            "verify_ms": _median_ms(lambda: checkpoint.verify(folder), args.repeats),
            "hash_files_ms": _median_ms(lambda: [file_record(p) for p in files], args.repeats),
            "metadata_reader_ms": _median_ms(lambda: read_metadata(folder), args.repeats),
            "metadata_pickle_ms": _median_ms(lambda: pickle.loads((folder / ".metadata").read_bytes()), args.repeats),
            "load_model_ms": _median_ms(lambda: checkpoint.load_model(model, folder), args.repeats),
        }
    data = os.urandom(64 << 20)
    results["sha256_gb_s"] = _hash_rate(hashlib.sha256, data, 3)
    results["blake2b_gb_s"] = _hash_rate(lambda: hashlib.blake2b(digest_size=32), data, 3)
    results["load_average"] = os.getloadavg()[0]
    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
