"""A gssf model for ``mlflow.pyfunc``, logged from code: weights are read from the artifact folder, never unpickled.

MLflow copies this file into the logged model and runs it on load (models-from-code). Which class reads the
folder is the model's config (``loader``: ``module:Class``, e.g. the PyTorch run's or the ONNX bundle's), so one
file serves both. The loaded object answers ``predict(model_input)`` with the served contract: the same keys for
either model, so a deployment can swap one for the other.
"""

from __future__ import annotations

import importlib
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel

ARTIFACT = "model"
"""The one artifact folder a served model is loaded from (``context.artifacts`` key)."""
LOADER_KEY = "loader"
"""The model-config key naming the loader class, ``module:Class`` whose ``load(folder)`` builds the model."""


class GssfModel(PythonModel):
    _skip_type_hint_validation = True  # the loaded model validates its mapping of arrays itself

    def load_context(self, context: Any) -> None:
        module, _, cls = str(context.model_config[LOADER_KEY]).partition(":")
        loader = getattr(importlib.import_module(module), cls)
        self.model = loader.load(context.artifacts[ARTIFACT])

    def predict(self, context: Any, model_input: Any, params: Any = None) -> Any:
        """A dict ``{"images": array, "texts": [str]}`` in Python, or the one-row DataFrame a server makes of it."""
        return self.model.predict(model_input)


mlflow.models.set_model(GssfModel())
