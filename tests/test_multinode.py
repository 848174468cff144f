"""Two "nodes" on this machine: two torchrun launches that meet at one c10d rendezvous on 127.0.0.1.

Each launch starts one rank; torchrun's rendezvous numbers them, and
`conveyor train` runs one pipeline over both. It must print the same losses,
bit for bit, as the same run started on one node (the same ranks, stages and
arithmetic; only the launcher differs).
"""

from __future__ import annotations

import csv
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ARGS = ["train", "--steps", "4", "--dim", "32", "--layers", "2", "--heads", "2", "--context", "32"]
ARGS += ["--batch-size", "8", "--no-progress", "--timeout-s", "60"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _losses(path: Path) -> list[float]:
    return [float(row["loss"]) for row in csv.DictReader(path.open())]


@pytest.mark.timeout(180)
def test_two_torchrun_nodes_train_as_one(tmp_path: Path) -> None:
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not on the PATH")
    port = _free_port()
    two_nodes = tmp_path / "two-nodes.csv"
    launch = ["torchrun", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d"]
    launch += ["--rdzv-endpoint", f"127.0.0.1:{port}", "-m", "conveyor", *ARGS, "--metrics", str(two_nodes)]
    nodes = [subprocess.Popen(launch, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = []
    for node in nodes:
        try:
            out, _ = node.communicate(timeout=150)
        finally:
            node.kill()
        outputs.append(out)
    for index, (node, out) in enumerate(zip(nodes, outputs, strict=True)):
        assert node.returncode == 0, f"node {index} failed:\n{out[-3000:]}"
    assert sum("loss " in out for out in outputs) == 1, "exactly one node holds the last stage and reports"
    one_node = tmp_path / "one-node.csv"
    subprocess.run([sys.executable, "-m", "conveyor", *ARGS, "--metrics", str(one_node)], check=True, timeout=150)
    assert len(_losses(two_nodes)) == 4
    assert _losses(two_nodes) == _losses(one_node)
