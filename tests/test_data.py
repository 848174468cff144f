"""Data from files (conveyor/data/): documents read, cut into padded sequences, and a stream of mini-batches whose
position a checkpoint keeps, exactly, across epochs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conveyor.data import Batches, ByteTokenizer, TokenSequences, fixed_batches, read_documents, tokenize
from conveyor.data.batches import decode_state, encode_state
from conveyor.data.text_files import check_data


def test_documents_come_from_a_file_a_folder_or_json_lines(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("second")
    (tmp_path / "c.jsonl").write_text('{"text": "third"}\n\n{"text": "fourth", "id": 4}\n{"text": ""}\n')
    (tmp_path / ".hidden").write_text("never")
    assert read_documents(tmp_path / "a.txt") == ["first"]
    assert read_documents(tmp_path / "c.jsonl") == ["third", "fourth"]
    assert read_documents(tmp_path) == ["first", "third", "fourth", "second"]  # sorted paths, jsonl read as lines


def test_bad_data_names_the_file_and_the_line(tmp_path: Path) -> None:
    records = tmp_path / "r.jsonl"
    records.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r'r.jsonl, line 2: each line needs a "text" field .* found \[\'body\'\]'):
        read_documents(records)
    records.write_text("{not json\n")
    with pytest.raises(ValueError, match="r.jsonl, line 1: not JSON"):
        read_documents(records)
    with pytest.raises(ValueError, match="no data at"):
        check_data(tmp_path / "missing")
    with pytest.raises(ValueError, match="line 1: not JSON"):
        check_data(records)  # the first record is checked before any rank starts
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="b.txt is not UTF-8 text"):
        read_documents(binary)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no files"):
        read_documents(tmp_path / "empty")


def test_sequences_pad_each_documents_end_and_label_it_ignored() -> None:
    tokenizer = ByteTokenizer()
    documents = tokenize(["abcdefg", "xy", "z"], tokenizer)  # 7 bytes, 2 bytes, and 1 (which predicts nothing)
    data = TokenSequences(documents, length=4, pad_id=0, attention_mask=True)
    assert len(data) == 3  # abcd, efg_, xy__
    inputs, labels = data[1]
    assert inputs["input_ids"].tolist() == [ord("e"), ord("f"), ord("g"), 0]
    assert inputs["attention_mask"].tolist() == [1, 1, 1, 0]
    assert labels.tolist() == [ord("e"), ord("f"), ord("g"), -100]
    ids, labels = TokenSequences(documents, length=4, pad_id=0)[2]
    assert ids.tolist() == [ord("x"), ord("y"), 0, 0] and labels.tolist() == [ord("x"), ord("y"), -100, -100]
    training, held_out = TokenSequences(tokenize(["a" * 40], tokenizer), length=4, pad_id=0).split(0.1)
    assert (len(training), len(held_out)) == (9, 1)


def _sequences(count: int = 10) -> TokenSequences:
    documents = [[k] * 3 for k in range(count)]  # sequence k holds token k
    return TokenSequences(documents, length=3, pad_id=0)


def _taken(batches: Batches, n: int) -> list[list[int]]:
    return [next(batches)[0][:, 0].tolist() for _ in range(n)]


@pytest.mark.parametrize("before", [1, 2, 3, 4, 7])  # within the first epoch, at its end, into the next ones
def test_a_stream_resumes_exactly_where_it_stopped_across_epochs(before: int) -> None:
    # 10 sequences in mini-batches of 3: 3 per epoch (the last sequence left over), reshuffled each epoch.
    whole = _taken(Batches(_sequences(), 3, seed=5), before + 4)
    first = Batches(_sequences(), 3, seed=5)
    assert _taken(first, before) == whole[:before]
    saved = encode_state(first.state_dict())  # as a checkpoint keeps it: JSON text
    resumed = Batches(_sequences(), 3, seed=5)
    resumed.load_state_dict(decode_state(json.loads(json.dumps(saved))))
    assert _taken(resumed, 4) == whole[before:]
    assert whole[:3] != whole[3:6], "each epoch is shuffled anew"


def test_an_iterable_of_batches_is_fast_forwarded_and_a_bad_batch_named() -> None:
    batches = [(torch.tensor([k]), torch.tensor([k])) for k in range(5)]
    stream = Batches(batches, 99)
    assert [int(next(stream)[0]) for _ in range(3)] == [0, 1, 2]
    state = stream.state_dict()
    again = Batches(batches, 99)
    again.load_state_dict(state)
    assert [int(next(again)[0]) for _ in range(4)] == [3, 4, 0, 1]  # and round again
    with pytest.raises(TypeError, match="a mini-batch must be a pair \\(inputs, targets\\); got tuple of 3"):
        next(Batches([(1, 2, 3)], 1))
    with pytest.raises(ValueError, match="fewer than a mini-batch of 20"):
        Batches(_sequences(), 20)
    assert [int(x[0, 0]) for x, _ in fixed_batches(_sequences(), 4, 2)] == [0, 4]


def test_a_data_position_is_json_and_holds_no_object() -> None:
    state = {"epoch": 2, "loader": {"generator": torch.arange(5, dtype=torch.uint8), "seen": [1, None, True]}}
    back = decode_state(encode_state(state))
    assert back["epoch"] == 2 and back["loader"]["seen"] == [1, None, True]
    assert torch.equal(back["loader"]["generator"], state["loader"]["generator"])
    with pytest.raises(TypeError, match="holds a object"):
        encode_state({"x": object()})
