"""``mlflow models serve`` on a gssf model, over real HTTP: start one server on 127.0.0.1, post JSON to
``/invocations``, and check what a client gets — scores equal to the ONNX bundle's, a 400 with gssf's one-line
message for every kind of bad request, and correct answers under a bounded concurrent load.

Used by the README test after the quickstart (``test_the_served_models_answer_over_http``) for the registered
ONNX version and the bundle's source train run's PyTorch model. The expected answers come from the bundle in
this process (:class:`gssf_cli.deploy.bundle.BundleModel`: the graphs on ONNX Runtime), and the expected messages
from :func:`gssf_cli.deploy.serving.predict` on the same ``inputs``, so a served refusal must be word for word
what the library says.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tests.mlflow_ui import free_port

SCORE_ATOL = 1e-5


@contextlib.contextmanager
def model_server(folder: Path, model_uri: str, timeout_s: float = 120.0) -> Iterator[str]:
    """``mlflow models serve -m model_uri --env-manager local`` on 127.0.0.1 with ``folder``'s store; yields its
    base URL once ``/ping`` answers, and stops it (its whole process group: it runs uvicorn as a child)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env |= {"MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # it execs `uvicorn` by name
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local"]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    with tempfile.TemporaryFile() as log:  # a pipe nobody reads would fill with access lines and stall the server
        server = subprocess.Popen(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout_s
            while not alive(url):
                if server.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise AssertionError(
                        f"mlflow models serve {model_uri} did not start:\n{log.read().decode()[-3000:]}"
                    )
                time.sleep(0.5)
            yield url
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


def alive(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/ping", timeout=2) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def invoke(url: str, body: bytes | dict[str, Any], timeout_s: float = 30.0) -> tuple[int, dict[str, Any]]:
    """POST ``body`` (a dict is sent as JSON, NaN and Infinity as JSON's extension literals, which Python's and
    MLflow's parsers read) to ``/invocations``: the status and the JSON answer."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}/invocations", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as answer:
            return int(answer.status), dict(json.loads(answer.read()))
    except urllib.error.HTTPError as error:
        return int(error.code), dict(json.loads(error.read() or b"{}"))


@dataclass
class Quickstart:
    """The quickstart's test images and captions with the bundle's answers for them, computed in this process."""

    images: np.ndarray
    captions: list[str]
    image_embeddings: np.ndarray
    text_embeddings: np.ndarray
    scores: np.ndarray
    bundle: Any

    @classmethod
    def load(cls, folder: Path) -> Quickstart:
        from gssf_cli.deploy.bundle import BundleModel

        bundle = BundleModel.load(folder / "exports/quickstart")
        images = np.load(folder / "data/quickstart/test_ims.npy")
        captions = (folder / "data/quickstart/test_caps.txt").read_text().splitlines()
        image_embeddings, text_embeddings = bundle.encode_images(images), bundle.encode_texts(captions)
        scores = bundle.scores(image_embeddings, text_embeddings)
        return cls(images, captions, image_embeddings, text_embeddings, scores, bundle)

    def request(self, rows: list[int], texts: list[int]) -> dict[str, Any]:
        return {"inputs": {"images": self.images[rows].tolist(), "texts": [self.captions[i] for i in texts]}}

    def message(self, inputs: Any) -> str:
        """What :func:`gssf_cli.deploy.serving.predict` refuses ``inputs`` with, in this process."""
        from gssf_cli.core.errors import UserInputError
        from gssf_cli.deploy.serving import predict

        try:
            predict(self.bundle, inputs)
        except UserInputError as exc:
            return str(exc)
        raise AssertionError(f"predict accepted {str(inputs)[:200]}")


def check_answer(quick: Quickstart, answer: dict[str, Any], rows: list[int], texts: list[int]) -> None:
    """A 200's predictions equal the bundle's for those rows and captions (scores and embeddings, 1e-5)."""
    got = answer["predictions"]
    assert set(got) == {"image_embeddings", "text_embeddings", "scores"}, sorted(got)
    np.testing.assert_allclose(got["scores"], quick.scores[np.ix_(rows, texts)], atol=SCORE_ATOL, rtol=0)
    np.testing.assert_allclose(got["image_embeddings"], quick.image_embeddings[rows], atol=SCORE_ATOL, rtol=0)
    np.testing.assert_allclose(got["text_embeddings"], quick.text_embeddings[texts], atol=SCORE_ATOL, rtol=0)


def bad_requests(quick: Quickstart) -> dict[str, tuple[dict[str, Any], str]]:
    """Every kind of bad request whose ``inputs`` reach the model: ``{kind: (body, a phrase its message holds)}``."""
    images = quick.images[:2]
    item = list(images.shape[1:])
    nan, inf = images.copy(), images.copy()
    nan[1, 2, 3] = np.nan
    inf[0, 0, 0] = -np.inf
    strings = [[[str(x) for x in region] for region in image] for image in images.tolist()]
    two = quick.captions[:2]
    inputs: dict[str, tuple[Any, str]] = {
        "NaN": ({"images": nan.tolist(), "texts": two}, "NaN, infinite"),
        "Inf": ({"images": inf.tolist()}, "NaN, infinite"),
        "wrong rank": ({"images": images[:, 0].tolist(), "texts": two}, "3 dimensions"),
        "wrong feature dim": ({"images": images[..., :-1].tolist()}, f"(each item {item}), got shape [2, {item[0]},"),
        "wrong region count": (
            {"images": images[:, :-1].tolist()},
            f"(each item {item}), got shape [2, {item[0] - 1},",
        ),
        "ragged rows": ({"images": [images[0].tolist(), images[1, :-1].tolist()]}, "rows of different lengths"),
        "string numbers": ({"images": strings, "texts": two}, "expected numbers"),
        "null numbers": ({"images": [[[None] * images.shape[2]] * images.shape[1]]}, "expected numbers"),
        "texts a string": ({"texts": quick.captions[0]}, "expected a list of captions"),
        "texts numbers": ({"texts": [1, 2]}, "not a caption"),
        "texts nested": ({"texts": [two]}, "not a caption"),
        "no images": ({"images": [], "texts": two}, "images: no items"),
        "no captions": ({"texts": []}, "no captions"),
        "empty inputs": ({}, "give at least one of images, texts"),
        "unknown key": ({"captions": two}, "unknown input keys ['captions']"),
        "not a mapping": (two, "expected a mapping"),
    }
    return {kind: ({"inputs": value}, phrase) for kind, (value, phrase) in inputs.items()}


NOT_PARSED = {
    "empty body": b"",
    "not JSON": b"{images: 1}",
    "no inputs key": b"{}",
    "a dataframe": b'{"dataframe_split": {}}',
}
"""Bodies MLflow's scoring server refuses before the model sees them (a 400 in MLflow's words)."""


def check_refusals(url: str, quick: Quickstart) -> dict[str, str]:
    """Every bad request answers 400 with gssf's message (word for word the library's) or, for the bodies in
    :data:`NOT_PARSED`, with MLflow's; returns ``{kind: message}``."""
    seen: dict[str, str] = {}
    for kind, (body, phrase) in bad_requests(quick).items():
        status, answer = invoke(url, body)
        expected = quick.message(body["inputs"])
        assert (status, answer.get("error_code")) == (400, "INVALID_PARAMETER_VALUE"), (kind, status, answer)
        assert answer["message"] == expected and phrase in expected, (kind, answer["message"], expected)
        seen[kind] = answer["message"]
    for kind, raw in NOT_PARSED.items():
        status, answer = invoke(url, raw)
        assert status == 400 and answer.get("message"), (kind, status, answer)
        seen[kind] = answer["message"].splitlines()[0]
    return seen


def load(url: str, quick: Quickstart, requests: int = 300, threads: int = 8, bound_s: float = 60.0) -> dict[str, Any]:
    """``requests`` requests over ``threads`` threads, every tenth one a NaN to refuse: each answer is checked (the
    good ones against the bundle, the bad ones for their 400), within ``bound_s``; the server answers after."""
    rng = np.random.default_rng(0)
    plans = [
        (sorted(rng.choice(len(quick.images), int(rng.integers(1, 5)), replace=False).tolist()),
         sorted(rng.choice(len(quick.captions), int(rng.integers(1, 4)), replace=False).tolist()))
        for _ in range(requests)
    ]  # fmt: skip
    nan_body = bad_requests(quick)["NaN"][0]

    def one(i: int) -> int:
        if i % 10 == 9:
            status, answer = invoke(url, nan_body)
            assert status == 400 and "NaN" in answer["message"], (status, answer)
            return status
        rows, texts = plans[i]
        status, answer = invoke(url, quick.request(rows, texts))
        assert status == 200, (status, answer)
        check_answer(quick, answer, rows, texts)
        return status

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        statuses = list(pool.map(one, range(requests)))
    seconds = time.perf_counter() - started
    assert seconds < bound_s, f"{requests} requests over {threads} threads took {seconds:.1f} s (bound {bound_s} s)"
    assert alive(url), "the server stopped answering /ping after the load"
    return {"requests": requests, "threads": threads, "seconds": round(seconds, 2), "refused": statuses.count(400)}


def serve_and_check(folder: Path, model_uri: str, quick: Quickstart) -> dict[str, Any]:
    """One server on ``model_uri``: good requests (both sides, each side alone), every refusal, then the load."""
    started = time.perf_counter()
    with model_server(folder, model_uri) as url:
        start_s = time.perf_counter() - started
        rows, texts = [0, 5, 7], [0, 1]
        status, answer = invoke(url, quick.request(rows, texts))
        assert status == 200, answer
        check_answer(quick, answer, rows, texts)
        status, answer = invoke(url, {"inputs": {"texts": quick.captions[:3]}})
        assert status == 200 and set(answer["predictions"]) == {"text_embeddings"}, answer
        np.testing.assert_allclose(answer["predictions"]["text_embeddings"], quick.text_embeddings[:3], atol=SCORE_ATOL)
        status, answer = invoke(url, {"inputs": {"images": quick.images[:2].tolist()}})
        assert status == 200 and set(answer["predictions"]) == {"image_embeddings"}, answer
        refusals = check_refusals(url, quick)
        figures = load(url, quick)
    return {"start_s": round(start_s, 2), "load": figures, "refusals": refusals,
            "total_s": round(time.perf_counter() - started, 2)}  # fmt: skip


def train_model_uri(folder: Path, run_id: str) -> str:
    """``models:/<id>`` of the model train run ``run_id`` logged."""
    from mlflow.tracking import MlflowClient

    run = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").get_run(run_id)
    (output,) = run.outputs.model_outputs
    return f"models:/{output.model_id}"


def declared(folder: Path, model_uri: str) -> dict[str, Any]:
    """The signature a logged (``models:/<id>``) or registered (``models:/NAME/VERSION``) model carries, in the
    terms of :func:`gssf_cli.deploy.serving.io_schema`, and whether MLflow leaves the checks to the model."""
    from mlflow.models import Model
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    model_id = model_uri.removeprefix("models:/")
    if "/" in model_id:  # a registered version's source is its logged model, models:/<id>
        model_id = client.get_model_version(*model_id.split("/")).source.removeprefix("models:/")
    signature = Model.load(Path(client.get_logged_model(model_id).artifact_location) / "MLmodel").signature
    assert signature is not None, f"{model_uri} has no signature"

    def side(schema: Any) -> list[dict[str, Any]]:
        return [{"name": s.name, "dtype": "str" if s.type.kind == "U" else s.type.name, "shape": list(s.shape)}
                for s in schema.inputs]  # fmt: skip

    return {"inputs": side(signature.inputs), "outputs": side(signature.outputs),
            "checked_by_model": signature._is_signature_from_type_hint}  # fmt: skip
