"""Commands leave nothing in the temporary folder: loading a run whose ``runs/RUN/best`` is gone reads the run's
MLflow copy of its checkpoint, and that copy goes when the model is loaded."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import Result

from tests.conftest import tiny_synthetic_args

Gssf = Callable[..., Result]


def test_a_run_loaded_from_its_mlflow_checkpoint_leaves_no_copy(
    gssf: Gssf, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert gssf(*tiny_synthetic_args("data/syn")).exit_code == 0
    trained = gssf("train", "--data", "data/syn", "--epochs", "1", "--embed-dim", "8", "--block-size", "4", "--json")
    assert trained.exit_code == 0, trained.stderr
    run_id = json.loads(trained.stdout)["run_id"]
    shutil.rmtree(workdir / "runs" / run_id / "best")
    scratch = workdir / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    evaluated = gssf("evaluate", "--run", run_id, "--no-plots", "--json")
    assert evaluated.exit_code == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["rsum"] > 0
    assert list(scratch.iterdir()) == [], "the downloaded checkpoint is removed once loaded"
