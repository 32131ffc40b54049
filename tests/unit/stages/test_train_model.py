"""A train run logs its best model as an MLflow model: loadable with ``mlflow.pyfunc.load_model``, no pickle."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from typer.testing import Result

from gssf_cli.tracking.adapter import Tracker
from tests.conftest import tiny_synthetic_args

Gssf = Callable[..., Result]


def test_the_trained_model_is_a_logged_mlflow_model(gssf: Gssf, workdir: Path) -> None:
    assert gssf(*tiny_synthetic_args()).exit_code == 0
    result = gssf("train", "--data", "data/syn", "--block-size", "4", "--embed-dim", "16", "--word-dim", "8",
                  "--epochs", "1", "--json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    run_id = json.loads(result.stdout)["run_id"]
    import mlflow

    tracker = Tracker()
    run = tracker.client.get_run(run_id)
    assert run.info.run_name == f"train-gssf-d4-{run_id[:6]}"
    (output,) = run.outputs.model_outputs
    logged = tracker.client.get_logged_model(output.model_id)
    assert logged.name == f"gssf-d4-{run_id[:6]}" and logged.experiment_id == run.info.experiment_id
    assert logged.status == "READY" and logged.tags["gssf.stage"] == "train"
    files = {p.name for p in (Path(logged.artifact_location) / "artifacts" / "model").iterdir()}
    assert files == {"model.safetensors", "state.json", "manifest.json", "vocab.json"}
    assert not list(Path(logged.artifact_location).rglob("*.pkl")), "nothing is pickled"
    mlflow.set_tracking_uri(tracker.tracking_uri)
    served = mlflow.pyfunc.load_model(f"models:/{output.model_id}")
    out = served.predict({"images": np.load(workdir / "data/syn/test_ims.npy")[:2], "texts": ["a red dog", "x"]})
    assert out["scores"].shape == (2, 2) and np.isfinite(out["scores"]).all()
