"""The served model's code: ``load_context`` builds the loader class its model config names from the artifact
folder, and ``predict`` answers with that model (the real loaders, logged and loaded through MLflow:
tests/unit/stages/test_train_model.py, test_export.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from mlflow.pyfunc import PythonModelContext

from gssf_cli.tracking.pyfunc_model import ARTIFACT, LOADER_KEY, GssfModel


class ScaledModel:
    """What a loader's ``load(folder)`` returns: here, a model that reads one number from the folder."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def predict(self, model_input: dict[str, Any]) -> dict[str, Any]:
        return {"images": [self.scale * x for x in model_input["images"]], "texts": model_input["texts"]}


class ScaleLoader:
    @staticmethod
    def load(folder: str) -> ScaledModel:
        return ScaledModel(float((Path(folder) / "scale.txt").read_text()))


def _context(folder: Path, loader: str) -> PythonModelContext:
    return PythonModelContext(artifacts={ARTIFACT: str(folder)}, model_config={LOADER_KEY: loader})


def test_the_loader_named_in_the_config_reads_the_artifact_folder(tmp_path: Path) -> None:
    (tmp_path / "scale.txt").write_text("2.5")
    model = GssfModel()
    model.load_context(_context(tmp_path, f"{__name__}:ScaleLoader"))
    assert isinstance(model.model, ScaledModel) and model.model.scale == 2.5
    answer = model.predict(None, {"images": [1.0, 2.0], "texts": ["a dog"]})
    assert answer == {"images": [2.5, 5.0], "texts": ["a dog"]}


def test_a_loader_that_does_not_exist_fails_on_load(tmp_path: Path) -> None:
    with pytest.raises(AttributeError):
        GssfModel().load_context(_context(tmp_path, f"{__name__}:NoSuchLoader"))
    with pytest.raises(ModuleNotFoundError):
        GssfModel().load_context(_context(tmp_path, "gssf_cli.no_such_module:ScaleLoader"))
