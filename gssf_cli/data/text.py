"""Captions: reading, tokenisation and the vocabulary.

Tokenisation rule (``basic-v1``, documented in docs/method.md (Encoders)): lowercase the caption, keep runs of letters and
digits (an apostrophe suffix such as ``man's`` stays attached), drop everything else. Token ids: ``<pad>`` 0,
``<start>`` 1, ``<end>`` 2, ``<unk>`` 3, then the vocabulary words. The vocabulary holds the train
captions' words that occur at least ``min_count`` times (SCAN/VSE use 4), ordered by count then spelling,
so the same captions always give the same ids.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gssf_cli.core.errors import UserInputError

TOKENIZER = "basic-v1"
SPECIALS = ("<pad>", "<start>", "<end>", "<unk>")
PAD, START, END, UNK = range(4)
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?")


def tokenize(caption: str) -> list[str]:
    return _WORD.findall(caption.lower())


def read_captions(path: Path) -> list[str]:
    """All captions of a file, one per line; non-UTF-8 bytes or blank lines are errors naming the line."""
    if not path.is_file():
        raise UserInputError(f"{path}: file not found (captions)")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad_line = data[: exc.start].count(b"\n") + 1
        raise UserInputError(f"{path}: line {bad_line} is not valid UTF-8; re-encode the file as UTF-8") from None
    lines = text.splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise UserInputError(f"{path}: line {number} is an empty caption; every line must hold one caption")
    return lines


@dataclass(frozen=True)
class Vocabulary:
    """Word <-> id map; ids 0..3 are the special tokens."""

    words: tuple[str, ...]
    min_count: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {w: i for i, w in enumerate(self.words)})

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, caption: str) -> list[int]:
        """Token ids of one caption, framed by ``<start>`` and ``<end>``."""
        index: dict[str, int] = self._index  # type: ignore[attr-defined]
        return [START, *(index.get(t, UNK) for t in tokenize(caption)), END]

    def batch(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Captions as a padded batch of ids ``[B, L]`` and lengths ``[B]`` (int64, numpy: no torch needed)."""
        return pad_ids([self.encode(c) for c in captions])

    def known_words(self, caption: str) -> int:
        """How many of a caption's words are in the vocabulary (not ``<unk>``)."""
        return sum(token != UNK for token in self.encode(caption)[1:-1])

    def to_json(self) -> dict[str, object]:
        return {
            "format": "gssf-vocab-v1",
            "tokenizer": TOKENIZER,
            "min_count": self.min_count,
            "words": list(self.words),
        }

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), ensure_ascii=False, indent=0) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> Vocabulary:
        """Read our own format, or a SCAN/VSE vocab json (``word2idx``/``idx2word``), or a plain word list."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserInputError(f"{path}: not a readable vocabulary json ({exc})") from None
        words = _words_from_json(data, path)
        if tuple(words[: len(SPECIALS)]) != SPECIALS:
            words = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        if len(set(words)) != len(words):
            raise UserInputError(f"{path}: the vocabulary lists a word twice")
        return cls(tuple(words), data.get("min_count") if isinstance(data, dict) else None)


def pad_ids(sequences: Sequence[Sequence[int] | np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Id sequences as ids ``[B, L]`` padded with ``<pad>`` to the longest (L) and their lengths ``[B]``, int64."""
    lengths = np.array([len(ids) for ids in sequences], dtype=np.int64)
    padded = np.full((len(sequences), int(lengths.max(initial=1))), PAD, dtype=np.int64)
    for row, ids in enumerate(sequences):
        padded[row, : lengths[row]] = ids
    return padded, lengths


def build_vocabulary(captions: Iterable[str], min_count: int) -> Vocabulary:
    counts = Counter(token for caption in captions for token in tokenize(caption))
    kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    return Vocabulary((*SPECIALS, *kept), min_count)


def _words_from_json(data: object, path: Path) -> list[str]:
    if isinstance(data, dict) and isinstance(data.get("words"), list):
        return [str(w) for w in data["words"]]
    if isinstance(data, dict) and isinstance(data.get("idx2word"), dict):
        pairs = sorted((int(i), str(w)) for i, w in data["idx2word"].items())
        return [w for _, w in pairs]
    if isinstance(data, dict) and isinstance(data.get("word2idx"), dict):
        return [w for w, _ in sorted(data["word2idx"].items(), key=lambda item: int(item[1]))]
    if isinstance(data, list) and all(isinstance(w, str) for w in data):
        return list(data)
    raise UserInputError(f"{path}: unrecognised vocabulary format (expected 'words', 'idx2word' or 'word2idx')")


def encode_all(vocab: Vocabulary, captions: Sequence[str]) -> list[list[int]]:
    return [vocab.encode(c) for c in captions]
