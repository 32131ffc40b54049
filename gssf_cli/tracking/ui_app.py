"""The MLflow UI that opens gssf's experiments in "Model training": ``mlflow ui --app-name gssf``.

Why a server app: MLflow 3.17's UI picks an experiment's view in the browser only — the URL's
``?workflowType=`` or else ``localStorage["mlflow.workflowType_v1"]``, GenAI when a browser never picked one —
and ignores the experiment's kind tag, so a click in the experiments list lands a new user in GenAI's empty trace
pages. This app is MLflow's own server with one change: the page it serves sets that browser value to "Model
training" when it is unset, before MLflow's code reads it. A choice the user makes with the switch is kept; no
other route changes. Registered as the ``gssf`` entry of MLflow's ``mlflow.app`` plugin group (pyproject).
"""

from __future__ import annotations

import json
import os
from typing import Any

from gssf_cli.tracking.tags import MLFLOW_VIEW_KEY, MODEL_TRAINING_VIEW

_KEY, _VALUE = json.dumps(MLFLOW_VIEW_KEY), json.dumps(json.dumps(MODEL_TRAINING_VIEW))
DEFAULT_VIEW_SCRIPT = f"<script>try{{if(localStorage.getItem({_KEY})===null){{localStorage.setItem({_KEY},{_VALUE})}}}}catch(e){{}}</script>"
"""Runs in the page's ``<head>``, before MLflow's deferred bundle; MLflow stores the value as JSON text."""


def with_default_view(index_html: str) -> str:
    """MLflow's ``index.html`` with :data:`DEFAULT_VIEW_SCRIPT` first in its head (unchanged without a head)."""
    return index_html.replace("<head>", "<head>" + DEFAULT_VIEW_SCRIPT, 1)


def create_app() -> Any:
    """MLflow's tracking server (Flask, wrapped in FastAPI under uvicorn as ``mlflow server`` runs it) whose UI
    page opens in "Model training" for a browser that never picked a view."""
    from flask import Response
    from mlflow.server import app as flask_app

    static_folder = flask_app.static_folder
    index = os.path.join(static_folder, "index.html") if static_folder else ""
    mlflow_serve = flask_app.view_functions["serve"]

    def serve() -> Any:
        if not os.path.exists(index):
            return mlflow_serve()
        with open(index, encoding="utf-8") as page:
            return Response(with_default_view(page.read()), mimetype="text/html")

    flask_app.view_functions["serve"] = serve
    if os.environ.get("_MLFLOW_SGI_NAME") == "uvicorn":
        from mlflow.server.fastapi_app import create_fastapi_app

        return create_fastapi_app(flask_app)
    return flask_app
