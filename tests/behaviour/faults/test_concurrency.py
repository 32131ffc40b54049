"""Several ``gssf`` commands started at once on a folder with no tracking store yet (issue 11).

Without the store lock, mlflow creates and migrates the SQLite schema from every process at once: 3 or 4 of
4 commands failed (``table latest_metrics already exists``, ``duplicate column name: step``) and a store could
be left half-migrated for good. Each repeat starts 4 real processes (``python -m gssf_cli``) in a fresh
folder, then checks that all exit 0, that all 4 runs are FINISHED in one experiment, and that the store still
takes a new run.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from gssf_cli.tracking.adapter import STAGE_TAG, Tracker

WRITERS = 4
PREPARE_REPEATS = 3
TINY_PREPARE = [
    "--dataset", "synthetic", "--train-images", "40", "--dev-images", "10", "--test-images", "10",
    "--regions", "4", "--region-dim", "8", "--concepts", "6", "--vocab-size", "30",
]  # fmt: skip
TINY_TRAIN = [
    "--metric", "bdiag", "--block-size", "8", "--embed-dim", "32", "--word-dim", "16", "--batch-size", "32",
    "--epochs", "1", "--device", "cpu",
]  # fmt: skip


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME",
                                                            "MLFLOW_EXPERIMENT_ID")}  # fmt: skip
    return {**env, "MLFLOW_DISABLE_TELEMETRY": "true", "COLUMNS": "120", "NO_COLOR": "1"}


def _at_once(folder: Path, commands: list[list[str]]) -> None:
    """Start every command before waiting for any; all must exit 0."""
    folder.mkdir(parents=True)
    procs = []
    for i, command in enumerate(commands):
        with open(folder / f"out{i}.txt", "w") as out, open(folder / f"err{i}.txt", "w") as err:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "gssf_cli", *command], cwd=folder, env=_env(), stdout=out, stderr=err
                )
            )
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=240))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes.append(proc.wait())
    errors = {i: (folder / f"err{i}.txt").read_text()[-600:] for i, code in enumerate(codes) if code != 0}
    assert codes == [0] * len(commands), errors


def _check_store(folder: Path, stage: str) -> None:
    """All runs FINISHED in one experiment, no half-migrated leftovers, and the store takes one more run."""
    db = folder / "mlflow.db"
    with sqlite3.connect(db) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert not {t for t in tables if t.startswith("_alembic_tmp_")}, tables
    tracker = Tracker(f"sqlite:///{db}")
    runs = tracker.client.search_runs([e.experiment_id for e in tracker.client.search_experiments()])
    assert [r.data.tags[STAGE_TAG] for r in runs] == [stage] * WRITERS
    assert [r.info.status for r in runs] == ["FINISHED"] * WRITERS
    assert {r.info.experiment_id for r in runs} == {tracker.experiment_id}
    with tracker.start_run(stage, run_name="afterwards") as run:
        run.log_metrics({"x": 1.0}, step=1)
    assert tracker.run_status(run.run_id) == "FINISHED"
    assert (folder / "mlflow.db.lock").is_file()


@pytest.mark.parametrize("repeat", range(PREPARE_REPEATS))
def test_concurrent_prepares_on_a_fresh_store_all_finish(tmp_path: Path, repeat: int) -> None:
    folder = tmp_path / f"repeat{repeat}"
    _at_once(folder, [["prepare", *TINY_PREPARE, "--out", f"data/s{i}"] for i in range(WRITERS)])
    _check_store(folder, "prepare")
    assert all((folder / "data" / f"s{i}" / "manifest.json").is_file() for i in range(WRITERS))


def test_concurrent_trainings_on_a_fresh_store_all_finish(tmp_path: Path) -> None:
    from gssf_cli.core.stage_configs import PrepareConfig
    from gssf_cli.stages import prepare

    data = tmp_path / "syn"
    prepare.run(
        PrepareConfig(dataset="synthetic", out=data, train_images=40, dev_images=10, test_images=10, regions=4,
                      region_dim=8, concepts=6, vocab_size=30)
    )  # fmt: skip
    folder = tmp_path / "train"
    _at_once(folder, [["train", "--data", str(data), *TINY_TRAIN] for _ in range(WRITERS)])
    _check_store(folder, "train")
