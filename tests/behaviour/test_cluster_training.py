"""``gssf train --workers 2`` on Ray Train, as a user runs it: the installed command on a local Ray, against the
same run in one process (``nox -s cluster``).

One flow, because each Ray start costs seconds: a 2-worker run is stopped (SIGTERM) after its first checkpoint,
resumed with ``--resume`` (which keeps its two workers), and must then end exactly where an uninterrupted
single-process run with the same global batch and seed ends; it is one MLflow run, written by the driver, and
exports and evaluates like any other run. The step-level equivalence (weights, losses, every loss) is proven
without Ray in ``tests/unit/modeling/test_distributed.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from tests.conftest import tiny_synthetic_args

pytestmark = pytest.mark.cluster

EPOCHS = 8
TRAIN = ["train", "--data", "data/syn", "--epochs", str(EPOCHS), "--embed-dim", "16", "--block-size", "4",
         "--word-dim", "8", "--batch-size", "16", "--device", "cpu", "--json"]  # fmt: skip
METRIC_RTOL = 1e-4
"""Final loss and validation metrics, 2 workers (interrupted and resumed) vs one process (measured: equal to
the printed digits; the weights differ by at most 3e-7)."""


def _command(*args: str) -> list[str]:
    return [shutil.which("gssf") or str(Path(sys.executable).with_name("gssf")), *args]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return {**env, "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0"}


def _gssf(cwd: Path, *args: str) -> dict[str, object]:
    done = subprocess.run(_command(*args), cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _interrupted_after_first_epoch(cwd: Path) -> str:
    """Start ``gssf train --workers 2`` and stop it with SIGTERM once its first checkpoint is written; its run id."""
    runs = cwd / "runs"
    before = set(runs.iterdir()) if runs.is_dir() else set()
    process = subprocess.Popen(_command(*TRAIN, "--workers", "2"), cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and process.poll() is None:
            states = [p / "checkpoint" / "state.json" for p in set(runs.glob("*")) - before]
            if any(s.is_file() for s in states):
                break
            time.sleep(0.05)
        assert process.poll() is None, f"finished before it could be stopped: {process.communicate()}"
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode != 0, (out, err)
    assert json.loads(out)["kind"] == "interrupted"
    (folder,) = set(runs.glob("*")) - before
    epochs_done = json.loads((folder / "checkpoint" / "state.json").read_text())["epochs_done"]
    assert 1 <= epochs_done < EPOCHS
    return folder.name


def test_two_workers_interrupted_and_resumed_end_where_one_process_ends(tmp_path: Path) -> None:
    subprocess.run(_command(*tiny_synthetic_args()), cwd=tmp_path, env=_env(), check=True, capture_output=True)
    run_id = _interrupted_after_first_epoch(tmp_path)
    workers = _gssf(tmp_path, "train", "--resume", run_id, "--json")
    single = _gssf(tmp_path, *TRAIN)

    assert workers["run_id"] == run_id
    assert workers["best_epoch"] == single["best_epoch"]
    metrics, expected = workers["metrics"], single["metrics"]
    assert isinstance(metrics, dict) and isinstance(expected, dict)
    for key in ("loss", *(k for k in expected if k.startswith("val_"))):
        assert metrics[key] == pytest.approx(expected[key], rel=METRIC_RTOL, abs=1e-9), key

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.workers"] == "2"
    history = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1))  # every epoch logged once, by the driver
    single_history = {m.step: m.value for m in client.get_metric_history(str(single["run_id"]), "loss")}
    for point in history:
        assert point.value == pytest.approx(single_history[point.step], rel=METRIC_RTOL)
    train_runs = client.search_runs(
        [r.experiment_id for r in client.search_experiments()], "tags.`gssf.stage` = 'train'"
    )
    assert sorted(r.info.run_id for r in train_runs) == sorted([run_id, str(single["run_id"])])

    exported = _gssf(tmp_path, "export", "--onnx", "--run", run_id, "--json")
    assert exported["passed"] is True
    evaluated = _gssf(tmp_path, "evaluate", "--run", run_id, "--json")
    reference = _gssf(tmp_path, "evaluate", "--run", str(single["run_id"]), "--json")
    assert evaluated["rsum"] == pytest.approx(reference["rsum"], rel=METRIC_RTOL)
