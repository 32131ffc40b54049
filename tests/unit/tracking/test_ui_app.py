"""The UI page that ``mlflow ui --app-name gssf`` serves: MLflow's own, with the default view set before MLflow's
code runs (the browser walk in the README test shows what a user then sees)."""

from __future__ import annotations

from pathlib import Path

import mlflow.server

from gssf_cli.tracking.ui_app import DEFAULT_VIEW_SCRIPT, with_default_view


def test_the_default_view_is_set_before_mlflows_bundle_and_only_when_unset() -> None:
    shipped = (Path(mlflow.server.__file__).parent / "js/build/index.html").read_text()
    page = with_default_view(shipped)
    assert page.replace(DEFAULT_VIEW_SCRIPT, "", 1) == shipped
    assert page.index(DEFAULT_VIEW_SCRIPT) < page.index("<script defer")
    assert 'localStorage.getItem("mlflow.workflowType_v1")===null' in DEFAULT_VIEW_SCRIPT
    assert '"\\"machine_learning\\""' in DEFAULT_VIEW_SCRIPT
