"""Search as a served model: an index folder and its bundle as one MLflow pyfunc (``gssf index --log-model``).

Why: a deployment that searches needs a long-lived process that answers captions, and the ecosystem's way to run
one is ``mlflow models serve`` on a logged model, as the bundle already is. The model's artifact is one folder
(:func:`stage_folder`) holding ``index/`` (the index folder, as ``gssf index`` wrote it) and ``bundle/`` (the
bundle it was built from). :meth:`ServedSearch.load` opens and checks both once — manifest, checksums, the
bundle's gate and digest — so a warm server pays the checks at start-up, never per request. Like ``gssf search``
it runs on ONNX Runtime, numpy and faiss alone: no torch.

Request: ``{"texts": ["a caption", ...], "k": 10}`` (``k`` optional, default :data:`DEFAULT_K`). Answer, per
caption, best first: ``ids [Q, k]`` (the index's ids; ``""`` where an approximate index reached fewer than ``k``
rows), ``rows [Q, k]`` (gallery rows, ``-1`` there) and ``scores [Q, k]`` (the learned score; ``-inf`` there).
``k`` above the gallery's size is that size. A request it cannot answer — no captions, a caption with no known
word, ``k`` that is not a whole number in [1, :data:`MAX_K`], more than :data:`MAX_QUERIES` captions, an
unknown key — is one :class:`UserInputError` line, which ``mlflow models serve`` answers with HTTP 400.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from gssf_cli.core.errors import UserInputError
from gssf_cli.deploy import index_folder, search, serving, token_index
from gssf_cli.deploy.index_folder import OpenIndex

INDEX_FOLDER: Final = "index"
BUNDLE_FOLDER: Final = "bundle"
INPUT_KEYS: Final = ("texts", "k")
DEFAULT_K: Final = 10
MAX_K: Final = 1000
"""The most results a request may ask per caption: bounds the answer's size (and a token index's re-scoring)."""
MAX_QUERIES: Final = 1024
"""The most captions one request may carry: bounds one request's work, so that one client cannot hold the
server for long; send more in several requests."""


@dataclass
class ServedSearch:
    """A checked, open index with its bundle, answering :meth:`predict` requests (see the module)."""

    opened: OpenIndex

    @classmethod
    def load(cls, folder: str | Path) -> ServedSearch:
        """The model in ``folder`` (:func:`stage_folder`'s layout), opened and checked once."""
        root = Path(folder)
        return cls(index_folder.open_index(root / INDEX_FOLDER, root / BUNDLE_FOLDER))

    def io_schema(self) -> dict[str, list[dict[str, Any]]]:
        return {
            "inputs": [{"name": "texts", "dtype": "str", "shape": [-1]}, {"name": "k", "dtype": "int64", "shape": [1]}],
            "outputs": [
                {"name": "ids", "dtype": "str", "shape": [-1, -1]},
                {"name": "rows", "dtype": "int64", "shape": [-1, -1]},
                {"name": "scores", "dtype": "float32", "shape": [-1, -1]},
            ],
        }

    def predict(self, model_input: Any) -> dict[str, np.ndarray]:
        """Each caption's ``k`` best gallery rows: ``{"ids", "rows", "scores"}``, each ``[Q, k]``."""
        given = _request(model_input)
        captions = serving.captions(given.get("texts"))
        if len(captions) > MAX_QUERIES:
            raise UserInputError(f"texts: {len(captions):,} captions; at most {MAX_QUERIES:,} per request")
        k = min(_k(given.get("k", DEFAULT_K)), len(self.opened.ids))
        scores, rows = search_captions(self.opened, captions, k, lambda i: f"texts: item {i}")
        ids = np.array([[self.opened.ids[row] if row >= 0 else "" for row in found] for found in rows.tolist()])
        return {"ids": ids.reshape(rows.shape), "rows": rows, "scores": scores}


def search_captions(
    opened: OpenIndex, captions: list[str], k: int, where: Callable[[int], str]
) -> tuple[np.ndarray, np.ndarray]:
    """``(scores [Q, k], rows [Q, k])`` for captions against either family of index, at its stored settings."""
    if opened.bundle.family == "interaction":
        words = token_index.caption_queries(opened.bundle, captions, where)
        tokens = token_index.open_tokens(opened.folder, opened.manifest, opened.bundle.dim)
        per_word = int(opened.manifest["late_interaction"]["per_word"])
        return token_index.late_interaction(opened.bundle, opened.index, opened.spec, tokens, words, k, per_word)
    queries = index_folder.text_queries(opened.bundle, captions, where)
    return search.search(opened.index, opened.spec, queries, k, vectors=opened.vectors)


def _request(model_input: Any) -> Mapping[str, Any]:
    columns = getattr(model_input, "columns", None)
    if columns is not None and not isinstance(model_input, Mapping):
        rows = {key: model_input[key].tolist() for key in columns}
        model_input = {key: (values[0] if key == "k" and len(values) == 1 else serving.column(values))
                       for key, values in rows.items()}  # fmt: skip
    if not isinstance(model_input, Mapping):
        raise UserInputError(f'expected {{"texts": [...], "k": 10}}, got {serving.describe(model_input)}')
    unknown = sorted(str(key) for key in set(model_input) - set(INPUT_KEYS))
    if unknown:
        raise UserInputError(f"unknown input keys {unknown}; expected texts and, optionally, k")
    if "texts" not in model_input:
        raise UserInputError('give the captions to search for: {"texts": ["a caption"], "k": 10}')
    return model_input


def _k(value: Any) -> int:
    if isinstance(value, (list, tuple, np.ndarray)) and len(value) == 1:
        value = value[0]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or not 1 <= value <= MAX_K:
        raise UserInputError(f"k: expected a whole number from 1 to {MAX_K}, got {serving.describe(value)}")
    return int(value)


def stage_folder(index: Path, bundle: Path, out: Path) -> Path:
    """``out`` laid out as the model's artifact: ``out/index`` and ``out/bundle``, each file hard-linked where the
    filesystem allows (an index may weigh gigabytes; MLflow copies it into the artifact store once), else copied."""
    for source, name in ((index, INDEX_FOLDER), (bundle, BUNDLE_FOLDER)):
        shutil.copytree(source, out / name, copy_function=_link_or_copy, symlinks=False)
    return out


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)
