"""What a served gssf model takes and returns — one contract for the PyTorch model and the ONNX bundle.

Why one module: ``mlflow.pyfunc.load_model`` on a train run's model (PyTorch, :class:`gssf_cli.stages.runs.TrainedModel`)
and on a registered export (ONNX Runtime, :class:`gssf_cli.deploy.bundle.BundleModel`) must answer the same call with
the same keys, and refuse the same bad requests with the same message, so a deployment can swap one for the other.
Both implement :class:`Retriever`; :func:`predict` checks the pyfunc input against the model's :class:`Layout` and
turns it into calls on it (:class:`Served`); :func:`io_schema` is that layout as the MLflow signature declares it.

Input: a mapping with ``images`` (an array ``[N, ...]`` in the dataset's image layout: ``[N, F]`` features or
``[N, R, F]`` regions; for label-based data, the items) and/or ``texts`` (a list of captions; or an array
``[M, F]`` of text features when the dataset's text side is features). Output: ``image_embeddings`` ``[N, D]``,
``text_embeddings`` ``[M, D]`` and, when both are given, ``scores`` ``[N, M]`` — the learned GSSF similarity, not
the cosine.

Refused, each with one :class:`UserInputError` line naming the input (what a server answers with HTTP 400): no
input or an unknown key; a side with no items; numbers that are strings, booleans or nulls; NaN or ±Inf (also
a number beyond float32); an array of another rank or item shape than the layout; texts that are not a list of
strings (a bare string included: one caption is ``["..."]``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from gssf_cli.core.errors import UserInputError

INPUT_KEYS = ("images", "texts")


@dataclass(frozen=True)
class Layout:
    """What a served model takes per item and gives back: ``images`` one item's shape (``(F,)`` features or
    ``(R, F)`` regions), ``texts`` one text item's shape (``(F,)`` features) or ``None`` for captions, ``dim`` the
    embedding size D. What :func:`predict` checks a request against and what :func:`io_schema` declares."""

    images: tuple[int, ...]
    texts: tuple[int, ...] | None
    dim: int

    @classmethod
    def of(cls, task: str, modalities: Mapping[str, Any], dim: int) -> Layout:
        """From a dataset manifest's ``modalities`` (a label-based dataset's one ``features`` side serves both keys)."""
        if task == "labels":
            features = tuple(int(d) for d in modalities["features"]["shape"])
            return cls(features, features, dim)
        text = modalities["text"]
        texts = None if text["type"] == "captions" else tuple(int(d) for d in text["shape"])
        return cls(tuple(int(d) for d in modalities["image"]["shape"]), texts, dim)


class Retriever(Protocol):
    @property
    def layout(self) -> Layout:
        """The per-item input shapes and D this model was trained with."""
        ...

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        """``[N, ...]`` float32 → ``[N, D]`` L2-normalised embeddings."""
        ...

    def encode_texts(self, texts: Sequence[str] | np.ndarray) -> np.ndarray:
        """``M`` captions (or ``[M, F]`` text features) → ``[M, D]`` L2-normalised embeddings."""
        ...

    def scores(self, image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> np.ndarray:
        """``[N, D] x [M, D]`` → ``[N, M]`` learned similarities."""
        ...

    def input_scores(self, images: np.ndarray, texts: Sequence[str] | np.ndarray) -> np.ndarray | None:
        """``[N, M]`` scores from the inputs themselves, for a model whose pooled embeddings cannot give them (an
        interaction model); None when :meth:`scores` of the embeddings is the answer."""
        ...


def predict(retriever: Retriever, model_input: Any) -> dict[str, np.ndarray]:
    """The pyfunc ``predict``: embeddings of what was given, and scores when both sides were. Both sides are
    checked before either is encoded, so a refused request costs no model time."""
    given = _as_mapping(model_input)
    layout = retriever.layout
    images, texts = given.get("images"), given.get("texts")
    if images is None and texts is None:
        raise UserInputError(f"give at least one of {', '.join(INPUT_KEYS)}")
    image_batch = None if images is None else _numbers(images, "images", layout.images)
    if texts is None:
        text_batch: Sequence[str] | np.ndarray | None = None
    else:
        text_batch = captions(texts) if layout.texts is None else _numbers(texts, "texts", layout.texts)
    out: dict[str, np.ndarray] = {}
    if image_batch is not None:
        out["image_embeddings"] = retriever.encode_images(image_batch)
    if text_batch is not None:
        out["text_embeddings"] = retriever.encode_texts(text_batch)
    if len(out) == 2:
        assert image_batch is not None and text_batch is not None
        scores = retriever.input_scores(image_batch, text_batch)
        out["scores"] = (
            scores if scores is not None else retriever.scores(out["image_embeddings"], out["text_embeddings"])
        )
    return out


def io_schema(layout: Layout) -> dict[str, list[dict[str, Any]]]:
    """The served model's inputs and outputs as ``{"inputs": [...], "outputs": [...]}``, each
    ``{"name", "dtype", "shape"}`` with ``-1`` for a size the request chooses (``dtype`` ``str``: captions).
    Every key is optional: a request gives either side or both, and gets ``scores`` only with both."""
    texts = (
        {"dtype": "str", "shape": [-1]} if layout.texts is None else {"dtype": "float32", "shape": [-1, *layout.texts]}
    )
    embeddings = {"dtype": "float32", "shape": [-1, layout.dim]}
    return {
        "inputs": [{"name": "images", "dtype": "float32", "shape": [-1, *layout.images]}, {"name": "texts", **texts}],
        "outputs": [
            {"name": "image_embeddings", **embeddings},
            {"name": "text_embeddings", **embeddings},
            {"name": "scores", "dtype": "float32", "shape": [-1, -1]},
        ],
    }


class Served:
    """What the logged pyfunc model calls: ``predict`` on this :class:`Retriever` (mixed into each model class),
    and the schema its MLflow signature declares."""

    def predict(self, model_input: Any) -> dict[str, np.ndarray]:
        return predict(self, model_input)  # type: ignore[arg-type]

    def io_schema(self) -> dict[str, list[dict[str, Any]]]:
        return io_schema(self.layout)  # type: ignore[attr-defined]

    def input_scores(self, images: np.ndarray, texts: Sequence[str] | np.ndarray) -> np.ndarray | None:
        """None: the embeddings' :meth:`Retriever.scores` is the answer (a model scoring token sets overrides)."""
        return None


def _as_mapping(model_input: Any) -> Mapping[str, Any]:
    """A dict as given (what a server passes on from a request's ``inputs``), or a pandas DataFrame (one row
    holding each list, or one item per row)."""
    columns = getattr(model_input, "columns", None)
    if columns is not None and not isinstance(model_input, Mapping):
        model_input = {key: column(model_input[key].tolist()) for key in columns}
    if not isinstance(model_input, Mapping):
        raise UserInputError(f"expected a mapping with {' and/or '.join(INPUT_KEYS)}, got {describe(model_input)}")
    unknown = sorted(str(key) for key in set(model_input) - set(INPUT_KEYS))
    if unknown:
        raise UserInputError(f"unknown input keys {unknown}; expected {', '.join(INPUT_KEYS)}")
    return model_input


def column(values: list[Any]) -> Any:
    """One row holding a whole list (``{"texts": [[...]]}``), or one item per row."""
    if len(values) == 1 and isinstance(values[0], (list, tuple, np.ndarray)):
        return values[0]
    return values


def _numbers(value: Any, name: str, item: tuple[int, ...]) -> np.ndarray:
    """``value`` as float32 ``[N, *item]``, refused unless it is that shape, holds numbers (not strings, booleans
    or nulls, which numpy would turn into numbers or objects), has an item, and is finite as float32."""
    expected = f"[N, {', '.join(str(d) for d in item)}]"
    try:
        array = np.asarray(value)
    except ValueError:
        raise UserInputError(f"{name}: rows of different lengths; expected an array {expected}") from None
    if array.dtype.kind not in "iuf":
        raise UserInputError(f"{name}: expected numbers {expected}, got {_kinds(array)}")
    if array.ndim and not len(array):
        raise UserInputError(f"{name}: no items; give at least one or leave {name} out")
    if array.ndim != len(item) + 1:
        raise UserInputError(
            f"{name}: expected an array {expected} ({len(item) + 1} dimensions), got shape {list(array.shape)}"
        )
    if array.shape[1:] != item:
        raise UserInputError(
            f"{name}: expected an array {expected} (each item {list(item)}), got shape {list(array.shape)}"
        )
    with np.errstate(over="ignore", invalid="ignore"):
        array = array.astype(np.float32)
    bad = ~np.isfinite(array)
    if bad.any():
        first = [int(i) for i in np.argwhere(bad)[0]]
        raise UserInputError(
            f"{name}: {int(bad.sum())} value(s) NaN, infinite or beyond float32 (first at {first}); "
            "only finite numbers can be embedded"
        )
    return array


def captions(texts: Any) -> list[str]:
    """A list of captions, refused unless a non-empty list (or 1-d array) of strings."""
    if isinstance(texts, str):
        raise UserInputError('texts: expected a list of captions, got one string; send ["..."] for one caption')
    if isinstance(texts, np.ndarray) and texts.ndim == 1:
        texts = texts.tolist()
    if not isinstance(texts, (list, tuple)):
        raise UserInputError(f"texts: expected a list of captions, got {describe(texts)}")
    if not texts:
        raise UserInputError("texts: no captions; give at least one or leave texts out")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise UserInputError(f"texts: item {i} is {describe(text)}, not a caption; expected a list of strings")
    return list(texts)


def _kinds(array: np.ndarray) -> str:
    """What an array that is not numbers holds, in words."""
    if array.dtype.kind in "US":
        return "strings (send numbers, not quoted numbers)"
    if array.dtype.kind == "b":
        return "booleans"
    return "values that are not all numbers (nulls, objects or mixed types)"


def describe(value: Any) -> str:
    """One value of a request, in words (JSON's names: null, a string, a number, a list, a dict)."""
    if value is None:
        return "null"
    if isinstance(value, (bool, np.bool_)):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float, np.number)):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    if isinstance(value, np.ndarray):
        return f"an array of shape {list(value.shape)}"
    return f"a {type(value).__name__}"
