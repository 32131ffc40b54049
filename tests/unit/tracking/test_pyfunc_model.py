"""The served model's code: ``load_context`` builds the loader class its model config names from the artifact
folder, ``predict`` answers with that model and turns its refusals into HTTP 400s, and the signature declares the
inputs without MLflow checking them (the real loaders, logged and loaded through MLflow:
tests/unit/stages/test_train_model.py, test_export.py; over HTTP: tests/behaviour/test_readme.py)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModelContext

from gssf_cli.core.errors import UserInputError
from gssf_cli.deploy.serving import Layout, Served, io_schema, predict
from gssf_cli.tracking import pyfunc_model
from gssf_cli.tracking.pyfunc_model import ARTIFACT, LOADER_KEY, GssfModel, RefusedInput, signature


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


class Sums(Served):
    """A served model on the real contract (:func:`gssf_cli.deploy.serving.predict`): an image of two features
    embeds as its sum, a caption as its length."""

    layout = Layout(images=(2,), texts=None, dim=1)

    @classmethod
    def load(cls, folder: str) -> Sums:
        return cls()

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        return images.sum(axis=1, keepdims=True)

    def encode_texts(self, texts: Sequence[str] | np.ndarray) -> np.ndarray:
        return np.array([[float(len(t))] for t in texts], np.float32)

    def scores(self, image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> np.ndarray:
        return image_embeddings @ text_embeddings.T


class Broken(Sums):
    def encode_images(self, images: np.ndarray) -> np.ndarray:
        raise RuntimeError("a bug, not a bad request")


def test_a_refusal_becomes_a_400_that_keeps_gssf_s_one_line(tmp_path: Path) -> None:
    model = GssfModel()
    model.load_context(_context(tmp_path, f"{__name__}:Sums"))
    with pytest.raises(RefusedInput) as refused:
        model.predict(None, {"images": [[1.0, float("nan")]]})
    error = refused.value
    expected = (
        "images: 1 value(s) NaN, infinite or beyond float32 (first at [0, 1]); only finite numbers can be embedded"
    )
    assert isinstance(error, MlflowException) and error.error_code == "INVALID_PARAMETER_VALUE"
    assert error.get_http_status_code() == 400 and error.message == expected
    error.message = (
        f"Failed to predict data '{[[1.0, float('nan')]]}'. \nError: {error.message}"  # what the server does
    )
    assert json.loads(error.serialize_as_json())["message"] == expected
    model.load_context(_context(tmp_path, f"{__name__}:Broken"))
    with pytest.raises(RuntimeError, match="a bug"):  # not the client's fault: the server's 500
        model.predict(None, {"images": [[1.0, 2.0]]})


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """:class:`Sums` saved from code with its signature, as ``mlflow.pyfunc.load_model`` gives it to a server."""
    import warnings

    import mlflow

    folder = tmp_path_factory.mktemp("served")
    (folder / "artifact").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no input example: the signature is declared, not inferred
        mlflow.pyfunc.save_model(
            folder / "model",
            python_model=pyfunc_model.__file__,
            artifacts={ARTIFACT: str(folder / "artifact")},
            model_config={LOADER_KEY: f"{__name__}:Sums"},
            signature=signature(Sums().io_schema()),
            pip_requirements=[],
        )
    return mlflow.pyfunc.load_model(str(folder / "model"))


def _serve(model: Any, body: str) -> tuple[int, dict[str, Any]]:
    """One request through the scoring server's own code (``invocations``, and the status and JSON its error
    handler makes of an MlflowException), without starting a server."""
    from mlflow.pyfunc import scoring_server

    try:
        answer = scoring_server.invocations(body, "application/json", model, model.metadata.get_input_schema())
    except MlflowException as error:
        return error.get_http_status_code(), json.loads(error.serialize_as_json())
    return answer.status, json.loads(answer.response)


def test_the_signature_declares_the_layout_and_leaves_the_checks_to_the_model(served: Any) -> None:
    declared = served.metadata.signature
    assert [(s.name, str(s.type), s.shape) for s in declared.inputs.inputs] == [
        ("images", "float32", (-1, 2)), ("texts", "<U0", (-1,)),
    ]  # fmt: skip
    assert [(s.name, s.shape) for s in declared.outputs.inputs] == [
        ("image_embeddings", (-1, 1)), ("text_embeddings", (-1, 1)), ("scores", (-1, -1)),
    ]  # fmt: skip
    assert served.metadata._is_signature_from_type_hint()


REFUSED: dict[str, Any] = {
    "NaN": {"images": [[1, float("nan")]]},
    "Inf": {"images": [[1.0, float("-inf")]], "texts": ["a"]},
    "string numbers": {"images": [["1.0", "2.0"]]},  # a signature MLflow parsed by would make these numbers
    "wrong dim": {"images": [[1.0, 2.0, 3.0]]},
    "wrong rank": {"images": [1.0, 2.0]},
    "texts a string": {"texts": "a dog"},
    "texts numbers": {"texts": [1, 2]},
    "no captions": {"texts": []},
    "empty": {},
    "unknown key": {"captions": ["a dog"]},
    "a list": ["a dog"],
}


@pytest.mark.parametrize("inputs", REFUSED.values(), ids=REFUSED.keys())
def test_a_bad_request_to_the_scoring_server_is_a_400_with_gssf_s_message(served: Any, inputs: Any) -> None:
    with pytest.raises(UserInputError) as refused:
        predict(Sums(), inputs)
    status, answer = _serve(served, json.dumps({"inputs": inputs}))
    assert (status, answer["error_code"], answer["message"]) == (400, "INVALID_PARAMETER_VALUE", str(refused.value))


def test_the_scoring_server_answers_a_good_request_as_sent(served: Any) -> None:
    """Either side alone (the signature declares both but MLflow enforces neither), ints among floats."""
    status, answer = _serve(served, json.dumps({"inputs": {"images": [[1, 2.5], [3, 4]], "texts": ["ab", "abc"]}}))
    assert status == 200 and answer["predictions"]["scores"] == [[7.0, 10.5], [14.0, 21.0]]
    status, answer = _serve(served, json.dumps({"inputs": {"texts": ["abcd"]}}))
    assert status == 200 and answer["predictions"] == {"text_embeddings": [[4.0]]}


def test_a_signature_declares_the_layout_and_leaves_the_checks_to_the_model() -> None:
    """Dynamic axes by name become -1; the signature is marked so MLflow passes requests on for gssf to check."""
    graph = {
        "inputs": [{"name": "features", "dtype": "float32", "shape": ["batch", "regions", 32]}],
        "outputs": [{"name": "embeddings", "dtype": "float32", "shape": ["batch", 64]}],
    }
    declared = signature(graph)
    assert [(s.name, s.shape) for s in declared.inputs.inputs] == [("features", (-1, -1, 32))]
    assert [(s.name, s.shape) for s in declared.outputs.inputs] == [("embeddings", (-1, 64))]
    assert declared._is_signature_from_type_hint
    assert io_schema(Sums.layout)["inputs"][0]["shape"] == [-1, 2]
