"""The MLflow UI as its users see it: start ``mlflow ui`` on 127.0.0.1 over a folder's store, read back through
the REST API the UI's pages call what a gssf pipeline left there, and look at the pages in a real browser.

Used by the README test after the quickstart. Through the API (:func:`check_quickstart`): the experiment is marked
classic ML, run names are distinct and say what ran (the baseline's and the final model's evaluations apart),
every stage is nested under the pipeline run, which holds the pipeline file as params and the dataset as input,
and every trial under the tune run; the trained PyTorch model is a logged model that ``mlflow.pyfunc.load_model``
loads through the server, and the export is a registered model whose newest version links its export run and
holds the alias ``champion``. In headless Chromium (:func:`browse_quickstart`, :mod:`tests.browser`): the same,
as the pages show it, in the "Model training" view the README leads to; ``GSSF_UI_SCREENSHOTS=FOLDER`` saves
those pages there.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gssf_cli.tracking.tags import CHAMPION_ALIAS as CHAMPION
from gssf_cli.tracking.tags import CLASSIC_ML, EXPERIMENT_KIND_TAG, MODEL_TRAINING_VIEW, PARENT_TAG
from tests.browser import Page, browser


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


CONTAINERS = {"run": set(), "tune_trial": {"tune"}, "train": {"run", "seeds"}}
"""The stages a run of each stage may be nested in (the pipeline run, ``run``, unless said here); the docs that
continue the README add ``gssf train --seeds`` runs, which hold their own train runs."""


def tags_of(entity: dict[str, Any]) -> dict[str, str]:
    return {t["key"]: t.get("value", "") for t in entity.get("tags", [])}


def check_quickstart(url: str, experiment: str = "quickstart", registered: str = "quickstart") -> dict[str, Any]:
    """Assert what a user should see of a quickstart in the UI; returns what was read (for messages)."""
    found = rest(url, "experiments/get-by-name", experiment_name=experiment)["experiment"]
    assert tags_of(found).get(EXPERIMENT_KIND_TAG) == CLASSIC_ML, tags_of(found)
    experiment_id = found["experiment_id"]
    runs = rest(url, "runs/search", {"experiment_ids": [experiment_id], "max_results": 1000})["runs"]
    names = [r["info"]["run_name"] for r in runs]
    assert len(names) == len(set(names)), f"run names repeat: {sorted(names)}"
    by_id = {r["info"]["run_id"]: tags_of(r["data"]) for r in runs}
    assert all(tags.get("mlflow.user") for tags in by_id.values()), "a run has no mlflow.user"
    stages = {run_id: tags.get("gssf.stage") for run_id, tags in by_id.items()}
    pipelines = [run_id for run_id, stage in stages.items() if stage == "run"]
    assert len(pipelines) == 1, f"expected one pipeline run, got {len(pipelines)}"
    pipeline = next(r for r in runs if r["info"]["run_id"] == pipelines[0])
    assert {"pipeline.name", "prepare.dataset", "train.metric"} <= {p["key"] for p in pipeline["data"]["params"]}
    assert [d["dataset"]["name"] for d in pipeline.get("inputs", {}).get("dataset_inputs", [])] == [experiment]
    inside = [r["info"]["run_name"] for r in runs if by_id[r["info"]["run_id"]].get(PARENT_TAG) == pipelines[0]]
    evaluations = sorted(name.split("-")[1] for name in inside if name.startswith("evaluate-"))
    assert evaluations == ["baseline", "final"], f"the pipeline's evaluations are not told apart: {inside}"
    for run_id, tags in by_id.items():
        parent, stage = tags.get(PARENT_TAG), stages[run_id]
        if parent is not None:
            assert stages.get(parent) in CONTAINERS.get(stage, {"run"}), f"{stage} run {run_id} is inside {parent}"
        else:
            assert stage not in {"prepare", "train", "tune", "export"}, f"{stage} run {run_id} is not nested"
    models = rest(url, "logged-models/search", {"experiment_ids": [experiment_id]})["models"]
    train_models = [m["info"] for m in models if tags_of(m["info"]).get("gssf.stage") == "train"]
    export_models = [m["info"] for m in models if tags_of(m["info"]).get("gssf.stage") == "export"]
    assert train_models and export_models, [m["info"]["name"] for m in models]
    versions = rest(url, "model-versions/search", filter=f"name='{registered}'")["model_versions"]
    assert versions, f"no registered model {registered!r}"
    export_runs = {run_id for run_id, stage in stages.items() if stage == "export"}
    assert all(v["run_id"] in export_runs for v in versions), versions
    model = rest(url, "registered-models/get", name=registered)["registered_model"]
    newest = str(max(int(v["version"]) for v in versions))
    assert {a["alias"]: a["version"] for a in model.get("aliases", [])} == {CHAMPION: newest}, model
    return {
        "experiment_id": experiment_id,
        "pipeline_run_id": pipelines[0],
        "runs": names,
        "stages": inside,
        "train_models": train_models,
        "export_models": export_models,
        "versions": versions,
    }


def load_through_server(url: str, model_uri: str, folder: Path) -> dict[str, Any]:
    """``mlflow.pyfunc.load_model(model_uri)`` with the server as tracking URI, then one prediction on the
    quickstart's test images and two captions; returns the output shapes."""
    code = (
        "import json, sys, mlflow, numpy as np\n"
        f"mlflow.set_tracking_uri({url!r})\n"
        f"model = mlflow.pyfunc.load_model({model_uri!r})\n"
        "images = np.load('data/quickstart/test_ims.npy')[:3]\n"
        "out = model.predict({'images': images, 'texts': ['a small red thing', 'two dogs']})\n"
        "print(json.dumps({k: list(v.shape) for k, v in out.items()}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=folder, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


MACHINE_LEARNING = f"workflowType={MODEL_TRAINING_VIEW}"
"""The URL query of an experiment's page in MLflow 3.17's "Model training" view."""
GENAI_ONLY = ("Token Usage", "Detect Issues", "Evaluation runs")
"""What only the GenAI view of an experiment shows."""
LIST_LINK = "a[data-testid=experiment-list-item-link]"


def browse_quickstart(
    url: str,
    seen: dict[str, Any],
    shots: Path | None = None,
    registered: str = "quickstart",
    chromium: str | None = None,
) -> None:
    """Walk the quickstart in a real headless Chromium (80 % zoom) as the README tells a user to, clicking as a
    user does and asserting what each page shows; with ``shots``, save the pages the README shows there as
    ``mlflow-ui-{runs,run,models,registry,version}.png``. ``seen`` is what :func:`check_quickstart` read; ``url``
    is ``mlflow ui --app-name gssf`` (:mod:`gssf_cli.tracking.ui_app`).

    In a fresh browser, as on a first visit: the experiments list's link opens the runs table ("Model training",
    where MLflow's own server opens GenAI); a user who then picks GenAI with MLflow's switch keeps it across page
    loads, and picking "Model training" again brings the runs table back, where the pipeline run holds every stage
    (``evaluate-baseline-…`` and ``evaluate-final-…`` told apart); the pipeline run's page shows its params and
    dataset; the Models tab the logged models; the registry version 1 with its alias and its signature.
    """
    experiment = f"#/experiments/{seen['experiment_id']}"
    with browser(chromium) as opened:
        page = opened.new_page()
        page.open(f"{url}/#/experiments")
        href = page.click(LIST_LINK, "quickstart")
        assert href == experiment, f"the experiments list links quickstart to {href}"
        _shows_runs_table(page, experiment, seen)
        page.click("button[aria-label=Close]")  # the assistant panel MLflow opens on a first visit

        page.open(f"{url}/#/experiments")
        page.wait_for_route("#/experiments")
        page.click("[role=button]", "GenAI")
        page.reload()
        page.click(LIST_LINK, "quickstart")
        page.wait_for_route(f"{experiment}/")
        text = page.wait_for_text("Token Usage")
        assert "workflowType=genai" in page.url(), f"a user's pick of GenAI was not kept: {page.url()}\n{text[:1000]}"

        page.open(f"{url}/#/experiments")
        page.wait_for_route("#/experiments")
        page.click("[role=button]", "Model training")
        page.click(LIST_LINK, "quickstart")
        _shows_runs_table(page, experiment, seen)
        _shows_every_stage(page, seen)
        _save(page, shots, "runs")

        _shows_pipeline_run(page, experiment, seen)
        _save(page, shots, "run")

        page.click("a", "Models")
        page.wait_for_route(f"{experiment}/models")
        _not_genai(page, page.wait_for_text(*(m["name"] for m in seen["train_models"] + seen["export_models"])))
        _save(page, shots, "models")

        page.click("a", "Model registry")
        page.wait_for_route("#/models")
        page.click("[role=dialog] button", "Try it now")  # MLflow's one-time offer of the registry UI it shows
        page.click(f"a[href='#/models/{registered}']", registered)
        page.wait_for_route(f"#/models/{registered}")
        page.wait_for_text("Version 1", CHAMPION)
        _save(page, shots, "registry")

        page.click("a", "Version 1")
        page.wait_for_route(f"#/models/{registered}/versions/1")
        text = page.wait_for_text("Source Run", "Schema", "Inputs (")
        aliases = text.split("Aliases", 1)[1].split("Stage", 1)[0]
        assert CHAMPION in aliases, f"version 1 has no alias {CHAMPION!r}: {aliases!r}"
        inputs, outputs = (int(n) for n in re.findall(r"(?:Inputs|Outputs) \((\d+)\)", text)[:2])
        for part in (f"Inputs ({inputs})", f"Outputs ({outputs})") if inputs and outputs else ():
            page.click("*", part)
        _save(page, shots, "version")
        assert inputs and outputs, f"the registered version shows no signature: Inputs ({inputs}), Outputs ({outputs})"


def _pipeline_name(seen: dict[str, Any]) -> str:
    return next(name for name in seen["runs"] if name.startswith("pipeline-quickstart-"))


def _shows_runs_table(page: Page, experiment: str, seen: dict[str, Any]) -> None:
    page.wait_for_route(f"{experiment}/runs")
    text = page.wait_for_text("Run Name", _pipeline_name(seen))
    assert MACHINE_LEARNING in page.url(), page.url()
    _not_genai(page, text)


def _shows_every_stage(page: Page, seen: dict[str, Any]) -> None:
    """Open the pipeline run's row: every stage's run shows inside it (the tune's trials stay folded in the
    tune's row), and its Run Name column is widened until the names can be read."""
    pipeline = _pipeline_name(seen)
    page.click_element(
        f"document.querySelector('a[href$=\"/runs/{seen['pipeline_run_id']}\"]').closest('.ag-cell')"
        ".querySelector('button')",
        f"the expander of {pipeline}",
    )
    text = page.wait_for_text(*seen["stages"])
    for evaluation in ("baseline", "final"):
        assert re.search(f"^evaluate-{evaluation}-", text, re.M), f"no evaluate-{evaluation}-… run shown: {text}"
    page.drag(
        "[...document.querySelectorAll('.ag-header-cell')].find(c => c.innerText.trim() === 'Run Name')"
        ".querySelector('.ag-header-cell-resize')",
        "the Run Name column's edge",
        160,
    )


def _shows_pipeline_run(page: Page, experiment: str, seen: dict[str, Any]) -> None:
    """The pipeline run's page, as its row's link opens it: its pipeline file as params, its dataset, and the
    breadcrumb of "Model training" (GenAI's says "Evaluations")."""
    pipeline = _pipeline_name(seen)
    page.click("a", pipeline)
    page.wait_for_route(f"{experiment}/runs/{seen['pipeline_run_id']}")
    text = page.wait_for_text("Parameters (", "prepare.dataset", "train.metric")
    shown = re.search(r"Parameters \((\d+)\)", text)
    assert shown is not None and int(shown.group(1)) >= 10, f"the pipeline run shows {shown and shown.group(0)}"
    datasets = text.split("\nDatasets\n", 1)[1].split("\nTags\n", 1)[0]
    assert "quickstart" in datasets, f"the pipeline run shows no dataset: {datasets!r}"
    breadcrumb = text.split(pipeline, 1)[0].rsplit("Settings", 1)[-1]
    assert "Runs" in breadcrumb and "Evaluations" not in breadcrumb, f"breadcrumb: {breadcrumb!r}"


def _not_genai(page: Page, text: str) -> None:
    shown = [words for words in GENAI_ONLY if words in text]
    assert not shown, f"{page.url()} shows the GenAI view ({shown})"


def _save(page: Page, shots: Path | None, name: str) -> None:
    if shots is not None:
        page.settle()
        page.screenshot(shots / f"mlflow-ui-{name}.png")
