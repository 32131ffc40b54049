"""Captions: the tokenisation rule, the vocabulary and its file formats, reading caption files, padding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gssf_cli.core.errors import UserInputError
from gssf_cli.data.text import SPECIALS, UNK, Vocabulary, build_vocabulary, pad_ids, read_captions, tokenize


def test_tokenizer_rule() -> None:
    assert tokenize("A Man's dog, running-fast: 2 times!") == [
        "a",
        "man's",
        "dog",
        "running",
        "fast",
        "2",
        "times",
    ]
    vocab = build_vocabulary(["b a a", "a c"], min_count=2)
    assert vocab.words == (*SPECIALS, "a")
    assert vocab.encode("a zebra") == [1, 4, 3, 2]


def test_vocabulary_orders_words_by_count_then_spelling() -> None:
    vocab = build_vocabulary(["Dog cat", "cat bird", "ant bird"], min_count=1)
    assert vocab.words == (*SPECIALS, "bird", "cat", "ant", "dog")
    assert vocab.known_words("A cat and a dog") == 2
    assert vocab.encode("zebra")[1] == UNK


def test_vocabulary_file_round_trip(tmp_path: Path) -> None:
    vocab = build_vocabulary(["a café by the sea", "the sea"], min_count=1)
    vocab.save(tmp_path / "vocab.json")
    again = Vocabulary.load(tmp_path / "vocab.json")
    assert again == vocab and again.min_count == 1
    assert again.encode("The café") == vocab.encode("The café")
    assert json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))["tokenizer"] == "basic-v1"


def test_a_scan_vocabulary_gets_the_specials_first(tmp_path: Path) -> None:
    path = tmp_path / "scan.json"
    path.write_text(json.dumps({"idx2word": {"1": "dog", "0": "a"}}))
    assert Vocabulary.load(path).words == (*SPECIALS, "a", "dog")
    path.write_text(json.dumps(["a", "dog", "a"]))
    with pytest.raises(UserInputError, match="lists a word twice"):
        Vocabulary.load(path)
    path.write_text(json.dumps({"tokens": []}))
    with pytest.raises(UserInputError, match="unrecognised vocabulary format"):
        Vocabulary.load(path)


def test_read_captions_names_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "caps.txt"
    path.write_text("a dog\na cat\n")
    assert read_captions(path) == ["a dog", "a cat"]
    path.write_text("a dog\n \na cat\n")
    with pytest.raises(UserInputError, match=r"caps\.txt: line 2 is an empty caption"):
        read_captions(path)
    path.write_bytes(b"a dog\na caf\xe9\n")
    with pytest.raises(UserInputError, match=r"caps\.txt: line 2 is not valid UTF-8"):
        read_captions(path)
    with pytest.raises(UserInputError, match="file not found"):
        read_captions(tmp_path / "missing.txt")


def test_pad_ids_pads_to_the_longest() -> None:
    padded, lengths = pad_ids([[1, 5, 2], [1, 2]])
    assert padded.dtype == np.int64 and padded.tolist() == [[1, 5, 2], [1, 2, 0]]
    assert lengths.tolist() == [3, 2]
    empty, none = pad_ids([])
    assert empty.shape == (0, 1) and none.shape == (0,)
