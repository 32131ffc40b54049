"""End to end: the installed ``gssf`` command, run as a user runs it, in a fresh directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def _gssf(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("gssf") or str(Path(sys.executable).with_name("gssf"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    return subprocess.run([exe, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_prepare_synthetic_and_digits_then_find_the_runs(tmp_path: Path) -> None:
    syn = _gssf(tmp_path, "prepare", "--dataset", "synthetic", "--out", "data/syn", "--train-images", "200", "--json")
    assert syn.returncode == 0, syn.stderr
    digits = _gssf(tmp_path, "prepare", "--dataset", "digits", "--out", "data/digits")
    assert digits.returncode == 0, digits.stderr
    assert "dataset digits" in digits.stdout and "MLflow run" in digits.stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("gssf")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["gssf.dataset.name"] for r in runs) == ["digits", "syn"]
    syn_run = client.get_run(json.loads(syn.stdout)["run_id"])
    assert syn_run.data.params["prepare.dataset"] == "synthetic"
    assert syn_run.data.metrics["train_images"] == 200
    assert {a.path for a in client.list_artifacts(syn_run.info.run_id)} == {"config", "dataset"}


def test_bad_input_from_the_shell(tmp_path: Path) -> None:
    result = _gssf(tmp_path, "prepare", "--dataset", "precomp", "--source", "missing", "--out", "data/x")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "gssf: error: source missing not found: point --source at a SCAN/VSE precomp folder"
    ]
    assert not (tmp_path / "data").exists()


def test_prepare_train_evaluate_chain(tmp_path: Path) -> None:
    """The README's main chain at a tiny size: every stage exits 0 and the runs are in the store."""
    prep = _gssf(tmp_path, "prepare", "--dataset", "synthetic", "--out", "data/syn", "--train-images", "120",
                 "--dev-images", "30", "--test-images", "30", "--regions", "4", "--region-dim", "16")  # fmt: skip
    assert prep.returncode == 0, prep.stderr
    trained = _gssf(tmp_path, "train", "--data", "data/syn", "--metric", "bdiag", "--block-size", "8",
                    "--embed-dim", "32", "--word-dim", "16", "--epochs", "2", "--batch-size", "32", "--json")  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    run_id = json.loads(trained.stdout)["run_id"]
    assert (tmp_path / "runs" / run_id / "best" / "model.safetensors").is_file()
    evaluated = _gssf(tmp_path, "evaluate", "--run", "latest")
    assert evaluated.returncode == 0, evaluated.stderr
    assert "rSum" in evaluated.stdout and "image→text" in evaluated.stdout
