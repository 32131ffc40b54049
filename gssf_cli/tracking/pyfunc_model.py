"""A gssf model for ``mlflow.pyfunc``, logged from code: weights are read from the artifact folder, never unpickled.

MLflow copies this file into the logged model and runs it on load (models-from-code). Which class reads the
folder is the model's config (``loader``: ``module:Class``, e.g. the PyTorch run's or the ONNX bundle's), so one
file serves both. The loaded object answers ``predict(model_input)`` with the served contract
(:mod:`gssf_cli.deploy.serving`): the same keys for either model, so a deployment can swap one for the other.

A request the model refuses (its ``UserInputError``) leaves as :class:`RefusedInput`, which ``mlflow models serve``
answers with HTTP 400 and gssf's one-line message; anything else stays a 500. The logged signature
(:func:`signature`) declares the model's inputs and outputs but is marked as checked by the model itself, so
MLflow neither parses a request against it (which would turn quoted numbers into numbers and answer shape errors
in its own words) nor enforces it: the request's ``inputs`` reach :func:`gssf_cli.deploy.serving.predict` as sent.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

from gssf_cli.core.errors import UserInputError

ARTIFACT = "model"
"""The one artifact folder a served model is loaded from (``context.artifacts`` key)."""
LOADER_KEY = "loader"
"""The model-config key naming the loader class, ``module:Class`` whose ``load(folder)`` builds the model."""


class RefusedInput(MlflowException):
    """A request the model refused: ``INVALID_PARAMETER_VALUE`` (HTTP 400 from the scoring server) whose
    ``message`` stays gssf's one line.

    Why the message is kept: the scoring server rewrites the message of an MlflowException raised in ``predict``
    to ``Failed to predict data '<the request>'. Error: ...``, echoing every number a client sent over many lines.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        self._message = getattr(self, "_message", value)


def load(loader: str, folder: str | Path) -> Any:
    """The model ``loader`` (``module:Class``) builds from ``folder``."""
    module, _, cls = loader.partition(":")
    return getattr(importlib.import_module(module), cls).load(folder)


def signature(io_schema: Mapping[str, Sequence[Mapping[str, Any]]]) -> Any:
    """A ``ModelSignature`` of tensor specs from ``{"inputs": [...], "outputs": [...]}``, each
    ``{"name", "dtype", "shape"}`` (``-1``, or an axis name, for a dynamic size).

    It is marked the way MLflow marks a signature from type hints: the scoring server then passes a request's
    ``inputs`` on unparsed and ``predict`` skips schema enforcement, because the model checks its input itself
    (gssf's served models do, with one-line messages); MLflow's own checks would coerce quoted numbers, answer a
    wrong shape in its own words and refuse a request that gives one side only."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    def specs(side: str) -> Schema:
        return Schema([
            TensorSpec(np.dtype(s["dtype"]), tuple(d if isinstance(d, int) and d > 0 else -1 for d in s["shape"]),
                       s["name"])
            for s in io_schema[side]
        ])  # fmt: skip

    declared = ModelSignature(inputs=specs("inputs"), outputs=specs("outputs"))
    declared._is_signature_from_type_hint = True
    return declared


class GssfModel(PythonModel):
    _skip_type_hint_validation = True  # the loaded model validates its mapping of arrays itself

    def load_context(self, context: Any) -> None:
        self.model = load(str(context.model_config[LOADER_KEY]), context.artifacts[ARTIFACT])

    def predict(self, context, model_input, params=None):
        """A dict ``{"images": array, "texts": [str]}``: in Python, or a request's ``inputs`` as the server parsed
        the JSON (no annotations: MLflow would try to infer a signature from them and warn that it cannot)."""
        try:
            return self.model.predict(model_input)
        except UserInputError as exc:
            raise RefusedInput(str(exc)) from None


mlflow.models.set_model(GssfModel())
