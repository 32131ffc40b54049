"""``gssf train --workers 2`` on Ray Train, as a user runs it: the installed command on a local Ray, against the
same run in one process (``nox -s cluster``).

One flow, because each Ray start costs seconds: a worker of a 2-worker run is killed after the first checkpoint,
once with ``--max-failures 1`` (the group restarts and finishes) and once without (the run ends FAILED, and
``--resume`` finishes it); each must then end exactly where an uninterrupted single-process run with the same
global batch and seed ends; each is one MLflow run, written by the driver, and exports and evaluates like any
other run. The step-level equivalence (weights, losses, every loss) is proven
without Ray in ``tests/unit/modeling/test_distributed.py``.
"""

from __future__ import annotations

import contextlib
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


def _workers_of(pid: int) -> list[int]:
    """The Ray Train worker processes started under driver ``pid`` (its local Ray's raylet starts them)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, IndexError, ValueError):
            if entry.name.isdigit():
                children.setdefault(int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]), []).append(
                    int(entry.name)
                )
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            todo.append(child)
            with contextlib.suppress(OSError):
                if Path(f"/proc/{child}/cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                    found.append(child)
    return found


def _worker_killed_after_first_epoch(cwd: Path, *extra: str) -> tuple[str, subprocess.CompletedProcess[str]]:
    """Start ``gssf train --workers 2`` and SIGKILL one of its workers once the first checkpoint is written (so,
    in the middle of a later epoch); the run id and how the command ended."""
    runs = cwd / "runs"
    before = set(runs.iterdir()) if runs.is_dir() else set()
    process = subprocess.Popen(_command(*TRAIN, "--workers", "2", *extra), cwd=cwd, env=_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline, killed = time.monotonic() + 240, None
    try:
        while time.monotonic() < deadline and process.poll() is None and killed is None:
            states = [p / "checkpoint" / "state.json" for p in set(runs.glob("*")) - before]
            workers = _workers_of(process.pid) if any(s.is_file() for s in states) else []
            if len(workers) == 2:
                killed = workers[-1]
                os.kill(killed, signal.SIGKILL)
            time.sleep(0.05)
        out, err = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
    assert killed is not None, f"no worker to kill before the run ended: {err}"
    (folder,) = set(runs.glob("*")) - before
    return folder.name, subprocess.CompletedProcess(process.args, process.returncode, out, err)


def _same_as(workers: dict[str, object], single: dict[str, object]) -> None:
    assert workers["best_epoch"] == single["best_epoch"]
    metrics, expected = workers["metrics"], single["metrics"]
    assert isinstance(metrics, dict) and isinstance(expected, dict)
    for key in ("loss", *(k for k in expected if k.startswith("val_"))):
        assert metrics[key] == pytest.approx(expected[key], rel=METRIC_RTOL, abs=1e-9), key


def _logged_once(client: mlflow.MlflowClient, run_id: str, single: dict[str, float]) -> None:
    history = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1))  # every epoch logged once, by the driver
    for point in history:
        assert point.value == pytest.approx(single[point.step], rel=METRIC_RTOL)


def test_two_workers_survive_a_lost_worker_and_end_where_one_process_ends(tmp_path: Path) -> None:
    """A worker SIGKILLed mid-epoch: with ``--max-failures 1`` Ray Train restarts the group from the run's last
    checkpoint and the run finishes; without, the run ends FAILED with one line that says how to continue it, and
    ``--resume`` (here on one worker) finishes it. Both end exactly where an uninterrupted single-process run with
    the same global batch and seed ends: one MLflow run each, every epoch logged once, by the driver."""
    subprocess.run(_command(*tiny_synthetic_args()), cwd=tmp_path, env=_env(), check=True, capture_output=True)
    single = _gssf(tmp_path, *TRAIN)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    single_history = {m.step: m.value for m in client.get_metric_history(str(single["run_id"]), "loss")}

    restarted_id, restarted = _worker_killed_after_first_epoch(tmp_path, "--max-failures", "1")
    assert restarted.returncode == 0, restarted.stderr
    _same_as(json.loads(restarted.stdout), single)
    _logged_once(client, restarted_id, single_history)

    run_id, lost = _worker_killed_after_first_epoch(tmp_path)
    assert lost.returncode == 1, lost.stderr
    line = lost.stderr.strip().splitlines()[-1]
    assert line.startswith("gssf: check failed: a training worker was lost"), line
    assert line.endswith(f"ended FAILED at its last checkpoint; continue it with: gssf train --resume {run_id}"), line
    assert client.get_run(run_id).info.status == "FAILED"
    workers = _gssf(tmp_path, "train", "--resume", run_id, "--workers", "1", "--json")
    assert workers["run_id"] == run_id
    _same_as(workers, single)

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    _logged_once(client, run_id, single_history)
    train_runs = client.search_runs(
        [r.experiment_id for r in client.search_experiments()], "tags.`gssf.stage` = 'train'"
    )
    assert sorted(r.info.run_id for r in train_runs) == sorted([run_id, restarted_id, str(single["run_id"])])

    exported = _gssf(tmp_path, "export", "--onnx", "--run", run_id, "--json")
    assert exported["passed"] is True
    evaluated = _gssf(tmp_path, "evaluate", "--run", run_id, "--json")
    reference = _gssf(tmp_path, "evaluate", "--run", str(single["run_id"]), "--json")
    assert evaluated["rsum"] == pytest.approx(reference["rsum"], rel=METRIC_RTOL)
