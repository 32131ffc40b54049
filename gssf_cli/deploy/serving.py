"""What a served gssf model takes and returns — one contract for the PyTorch model and the ONNX bundle.

Why one module: ``mlflow.pyfunc.load_model`` on a train run's model (PyTorch, :class:`gssf_cli.stages.runs.TrainedModel`)
and on a registered export (ONNX Runtime, :class:`gssf_cli.deploy.bundle.BundleModel`) must answer the same call with
the same keys, so a deployment can swap one for the other. Both implement :class:`Retriever`; :func:`predict`
turns the pyfunc input into calls on it (:class:`Served`).

Input: a mapping with ``images`` (an array ``[N, ...]`` in the dataset's image layout: ``[N, F]`` features or
``[N, R, F]`` regions; for label-based data, the items) and/or ``texts`` (a list of captions; or an array
``[M, F]`` of text features when the dataset's text side is features). Output: ``image_embeddings`` ``[N, D]``,
``text_embeddings`` ``[M, D]`` and, when both are given, ``scores`` ``[N, M]`` — the learned GSSF similarity, not
the cosine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from gssf_cli.core.errors import UserInputError

INPUT_KEYS = ("images", "texts")


class Retriever(Protocol):
    def encode_images(self, images: np.ndarray) -> np.ndarray:
        """``[N, ...]`` float32 → ``[N, D]`` L2-normalised embeddings."""
        ...

    def encode_texts(self, texts: Sequence[str] | np.ndarray) -> np.ndarray:
        """``M`` captions (or ``[M, F]`` text features) → ``[M, D]`` L2-normalised embeddings."""
        ...

    def scores(self, image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> np.ndarray:
        """``[N, D] x [M, D]`` → ``[N, M]`` learned similarities."""
        ...


def predict(retriever: Retriever, model_input: Any) -> dict[str, np.ndarray]:
    """The pyfunc ``predict``: embeddings of what was given, and scores when both sides were."""
    given = _as_mapping(model_input)
    out: dict[str, np.ndarray] = {}
    if given.get("images") is not None:
        out["image_embeddings"] = retriever.encode_images(np.asarray(given["images"], dtype=np.float32))
    if given.get("texts") is not None:
        out["text_embeddings"] = retriever.encode_texts(_texts(given["texts"]))
    if not out:
        raise UserInputError(f"give at least one of {', '.join(INPUT_KEYS)}")
    if len(out) == 2:
        out["scores"] = retriever.scores(out["image_embeddings"], out["text_embeddings"])
    return out


class Served:
    """What the logged pyfunc model calls: ``predict`` on this :class:`Retriever` (mixed into each model class)."""

    def predict(self, model_input: Any) -> dict[str, np.ndarray]:
        return predict(self, model_input)  # type: ignore[arg-type]


def _as_mapping(model_input: Any) -> Mapping[str, Any]:
    """A dict as given, or a one-row pandas DataFrame (what MLflow's serving turns a JSON object into)."""
    if isinstance(model_input, Mapping):
        unknown = sorted(set(model_input) - set(INPUT_KEYS))
        if unknown:
            raise UserInputError(f"unknown input keys {unknown}; expected {', '.join(INPUT_KEYS)}")
        return model_input
    columns = getattr(model_input, "columns", None)
    if columns is not None:
        return {key: _column(model_input[key].tolist()) for key in INPUT_KEYS if key in columns}
    raise UserInputError(f"expected a mapping with {', '.join(INPUT_KEYS)}, got {type(model_input).__name__}")


def _column(values: list[Any]) -> Any:
    """One row holding a whole list (``{"texts": [[...]]}``), or one item per row."""
    if len(values) == 1 and isinstance(values[0], (list, tuple, np.ndarray)):
        return values[0]
    return values


def _texts(texts: Any) -> Sequence[str] | np.ndarray:
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, np.ndarray) and texts.dtype.kind == "f":
        return texts.astype(np.float32)
    items = list(texts)
    if items and all(isinstance(t, str) for t in items):
        return items
    return np.asarray(items, dtype=np.float32)
