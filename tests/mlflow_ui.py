"""The MLflow UI as its users see it: start ``mlflow ui`` on 127.0.0.1 over a folder's store and read back,
through the same REST API the UI's pages call, what a gssf pipeline left there.

Used by the README test after the quickstart: the experiment is classic ML (not GenAI), run names are
distinct and say what ran, every stage is nested under the pipeline run and every trial under the tune run,
the trained PyTorch model is a logged model that ``mlflow.pyfunc.load_model`` loads through the server, and
the export is a registered model whose version links its export run. ``GSSF_UI_SCREENSHOTS=FOLDER`` also saves
screenshots of the runs, models and registry pages there (headless Chromium, when installed).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CLASSIC_ML = "custom_model_development"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def mlflow_ui(
    folder: Path, timeout_s: float = 90.0, command_name: str = "ui", store: str = "mlflow.db", *extra: str
) -> Iterator[str]:
    """``mlflow ui`` (or ``mlflow server``: ``command_name``) on 127.0.0.1 over ``folder/store``; yields its base
    URL once ``/health`` answers, stops it afterwards."""
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    command = [sys.executable, "-m", "mlflow", command_name, "--backend-store-uri", f"sqlite:///{folder / store}"]
    command += ["--host", "127.0.0.1", "--port", str(port), *extra]
    server = subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"mlflow ui did not start: {server.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


def rest(url: str, path: str, body: dict[str, Any] | None = None, **query: str) -> dict[str, Any]:
    """One call of MLflow's REST API (GET with ``query``, or POST with a JSON ``body``)."""
    address = f"{url}/api/2.0/mlflow/{path}"
    if query:
        address += "?" + urllib.parse.urlencode(query)
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(address, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return dict(json.loads(answer.read() or b"{}"))


def tags_of(entity: dict[str, Any]) -> dict[str, str]:
    return {t["key"]: t.get("value", "") for t in entity.get("tags", [])}


def check_quickstart(url: str, experiment: str = "quickstart", registered: str = "quickstart") -> dict[str, Any]:
    """Assert what a user should see of a quickstart in the UI; returns what was read (for messages)."""
    found = rest(url, "experiments/get-by-name", experiment_name=experiment)["experiment"]
    assert tags_of(found).get("mlflow.experimentKind") == CLASSIC_ML, tags_of(found)
    experiment_id = found["experiment_id"]
    runs = rest(url, "runs/search", {"experiment_ids": [experiment_id], "max_results": 1000})["runs"]
    names = [r["info"]["run_name"] for r in runs]
    assert len(names) == len(set(names)), f"run names repeat: {sorted(names)}"
    by_id = {r["info"]["run_id"]: tags_of(r["data"]) for r in runs}
    assert all(tags.get("mlflow.user") for tags in by_id.values()), "a run has no mlflow.user"
    stages = {run_id: tags.get("gssf.stage") for run_id, tags in by_id.items()}
    pipelines = [run_id for run_id, stage in stages.items() if stage == "run"]
    assert len(pipelines) == 1, f"expected one pipeline run, got {len(pipelines)}"
    for run_id, tags in by_id.items():
        parent = tags.get("mlflow.parentRunId")
        if stages[run_id] == "run":
            assert parent is None
        elif stages[run_id] == "tune_trial":
            assert parent is not None and stages[parent] == "tune", f"trial {run_id} is not inside a tune run"
        elif parent is not None or stages[run_id] in {"prepare", "train", "tune", "export"}:
            assert parent in pipelines, f"{stages[run_id]} run {run_id} is not nested in the pipeline run"
    models = rest(url, "logged-models/search", {"experiment_ids": [experiment_id]})["models"]
    train_models = [m["info"] for m in models if tags_of(m["info"]).get("gssf.stage") == "train"]
    export_models = [m["info"] for m in models if tags_of(m["info"]).get("gssf.stage") == "export"]
    assert train_models and export_models, [m["info"]["name"] for m in models]
    versions = rest(url, "model-versions/search", filter=f"name='{registered}'")["model_versions"]
    assert versions, f"no registered model {registered!r}"
    export_runs = {run_id for run_id, stage in stages.items() if stage == "export"}
    assert all(v["run_id"] in export_runs for v in versions), versions
    return {"experiment_id": experiment_id, "runs": names, "train_models": train_models, "versions": versions}


def load_through_server(url: str, model_id: str, folder: Path) -> dict[str, Any]:
    """``mlflow.pyfunc.load_model`` of a logged model with the server as tracking URI, then one prediction on
    the quickstart's test images and two captions; returns the output shapes."""
    code = (
        "import json, sys, mlflow, numpy as np\n"
        f"mlflow.set_tracking_uri({url!r})\n"
        f"model = mlflow.pyfunc.load_model('models:/{model_id}')\n"
        "images = np.load('data/quickstart/test_ims.npy')[:3]\n"
        "out = model.predict({'images': images, 'texts': ['a small red thing', 'two dogs']})\n"
        "print(json.dumps({k: list(v.shape) for k, v in out.items()}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=folder, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


PAGES = {"runs": "experiments/{id}/runs", "models": "experiments/{id}/models", "registry": "models/{registered}"}
"""The UI pages :func:`screenshots` saves, as ``mlflow-ui-<page>.png``."""


def screenshots(url: str, experiment_id: str, folder: Path, registered: str = "quickstart") -> list[Path]:
    """The experiment's runs and models pages and the registered model's page as PNGs in the UI's "Model
    training" mode, by headless Chromium; none when no Chromium is installed."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    saved = []
    for name, page in PAGES.items():
        path = folder / f"mlflow-ui-{name}.png"
        address = f"{url}/#/{page.format(id=experiment_id, registered=registered)}?workflowType=machine_learning"
        command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
        command += ["--window-size=1600,1000", "--virtual-time-budget=15000", f"--screenshot={path}", address]
        subprocess.run(command, capture_output=True, timeout=120)
        if path.is_file():
            saved.append(path)
    return saved
