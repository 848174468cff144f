"""A user's own model and data, as a new user would bring them: a local Hugging Face folder (a Llama-style model
with tied embeddings and its tokenizer, weights trained a little) and a .jsonl file, trained with `conveyor train`
and with the Trainer from Python, exported back to a folder `from_pretrained` loads; and the bad inputs."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from hf_folder import make_folder, mean_token_loss, write_jsonl  # noqa: E402 - after the skip
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from conveyor import losses  # noqa: E402
from conveyor.cli import main  # noqa: E402
from conveyor.data.batches import Batches  # noqa: E402
from conveyor.train import TrainConfig, sequences  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUN = ["--ranks", "2", "--context", "32", "--batch-size", "8", "--microbatches", "4", "--lr", "1e-3", "--no-progress"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    made = tmp_path_factory.mktemp("my-model")
    make_folder(made)
    return made


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "notes.jsonl")


@pytest.mark.timeout(600)
def test_a_local_folder_trains_from_its_weights_and_exports_to_a_folder(
    folder: Path, data: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    metrics, ck, out = tmp_path / "metrics.csv", tmp_path / "ck", tmp_path / "out"
    argv = ["train", "--model", str(folder), "--data", str(data), "--steps", "30", *RUN]
    argv += ["--checkpoint-dir", str(ck), "--checkpoint-every", "30", "--metrics", str(metrics)]
    assert main(argv) == 0
    assert "leaked" not in capfd.readouterr().err
    losses_logged = [float(row["loss"]) for row in csv.DictReader(metrics.open())]
    # The first loss is the pretrained model's on the first mini-batch, exactly: its weights were loaded.
    config = TrainConfig(model=str(folder), data=str(data), **_flags(RUN))
    batch_inputs, labels = next(Batches(sequences(config, config.source)[0], 8, seed=0))
    pretrained = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        expected = losses.causal_lm(pretrained(**batch_inputs), labels).item()
    assert abs(losses_logged[0] - expected) <= 1e-5 * expected, (losses_logged[0], expected)
    vocab = pretrained.config.vocab_size
    assert losses_logged[0] < 0.75 * math.log(vocab), f"{losses_logged[0]} is not far below ln({vocab})"
    assert sum(losses_logged[-5:]) / 5 < losses_logged[0], losses_logged
    # Exported as a Hugging Face folder: it loads, its tie holds, and it fits the text better than before.
    assert main(["export", str(ck), "--format", "hf", "--out", str(out)]) == 0
    trained = AutoModelForCausalLM.from_pretrained(out)
    assert trained.lm_head.weight.data_ptr() == trained.model.embed_tokens.weight.data_ptr(), "the tie broke"
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(folder).get_vocab()
    before, after = mean_token_loss(pretrained, tokenizer, data), mean_token_loss(trained, tokenizer, data)
    assert after < before, (before, after)


@pytest.mark.timeout(600)
def test_the_trainer_from_python_as_the_example_shows(folder: Path, data: Path, tmp_path: Path) -> None:
    command = [sys.executable, str(ROOT / "examples" / "train_your_model.py"), str(folder), str(data)]
    command += ["--steps", "12", "--checkpoints", str(tmp_path / "ck"), "--out", str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=540, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("loss "))
    first, last = (float(word) for word in line.split()[1:4:2])
    assert last < first, line
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    pretrained = AutoModelForCausalLM.from_pretrained(folder)
    assert mean_token_loss(trained, tokenizer, data) < mean_token_loss(pretrained, tokenizer, data)


def test_bad_models_and_data_are_named_before_any_rank_starts(
    folder: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    no_text = tmp_path / "no-text.jsonl"
    no_text.write_text('{"body": "hello"}\n')
    bare = tmp_path / "bare"  # the model without its tokenizer
    AutoModelForCausalLM.from_pretrained(folder).save_pretrained(bare)
    for argv, error in [
        (["--model", "gpt3"], "--model 'gpt3' is neither a known model (gpt, gpt2), a local folder"),
        (["--model", "meta-llama/Llama-3.2-1B"], "it looks like a hub name, but conveyor loads local folders only"),
        (["--model", "nowhere.at_all:build"], "cannot import build from module nowhere.at_all"),
        (["--model", str(folder), "--data", str(no_text), "--context", "32"], 'line 1: each line needs a "text" field'),
        (["--model", str(bare), "--data", str(data), "--context", "32"], "has no tokenizer"),
        (["--model", str(folder), "--data", str(data), "--context", "100"], "takes (64 positions): use --context 64"),
        (["--model", str(folder), "--data", str(tmp_path / "missing.txt"), "--context", "32"], "no data at"),
    ]:
        with pytest.raises(SystemExit):
            main(["train", *argv])
        assert error in capsys.readouterr().err, argv


def _flags(argv: list[str]) -> dict[str, object]:
    """`--name value` pairs as TrainConfig fields (numbers as numbers), switches left out."""
    values: dict[str, object] = {}
    for name, value in zip(argv, argv[1:], strict=False):
        if name.startswith("--") and not value.startswith("--"):
            field = name[2:].replace("-", "_")
            values[field] = float(value) if "e" in value or "." in value else int(value)
    return values
