"""``kill -9`` of the ``gssf tune`` driver at a random moment, then ``gssf tune --resume``: the sweep must end as an
uninterrupted one with the same seeds ends — the same trials, the same metrics for each, the same best
configuration — with no trial run twice to completion and no MLflow child run duplicated.

Under ASHA (which stops trials on what the others reported) and under FIFO (a grid), one trial at a time, so that
the uninterrupted sweep is one answer and not one of several orders. The moment of each kill is drawn uniformly
between the tune run's creation and the uninterrupted sweep's length, from a seed printed on failure; a kill that
lands before the tune run ended is resumed and counts, one after it (while Ray shuts down) is checked from the store
and does not. CI kills each sweep once; ``nox -s faults`` kills it ten times (``GSSF_SWEEP_KILLS``), and prints
where each kill landed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gssf_cli.cluster.durable_asha import REPLAYED
from gssf_cli.tracking.adapter import Tracker
from tests.unit.stages.tune_helpers import prepare

KILLS = int(os.environ.get("GSSF_SWEEP_KILLS", "1"))
SWEEPS = {
    "fifo": ["--param", "block_size=4,8", "--scheduler", "fifo"],
    "asha": ["--param", "lr=0.003,0.00001,0.01", "--scheduler", "asha", "--grace-period", "1",
             "--reduction-factor", "2", "--base", "block_size=8"],
}  # fmt: skip
BASE = ["--epochs", "3", "--max-concurrent", "1", "--seed", "5", "--base", "embed_dim=32", "--base", "word_dim=16",
        "--base", "batch_size=32", "--base", "metric=gssf"]  # fmt: skip


@dataclass(frozen=True)
class Sweep:
    """What a finished sweep shows: per trial (keyed by its values), status, epochs and final metric; the best."""

    trials: dict[str, tuple[str, int, float | None]]
    best: str | None
    seconds: float


def _key(values: dict[str, Any]) -> str:
    """A trial by its values, as text (the store holds them as MLflow params, which are text)."""
    return json.dumps({name: str(value) for name, value in values.items()}, sort_keys=True)


def _sweep(result: dict[str, Any]) -> Sweep:
    trials = {_key(t["values"]): (t["status"], t["epochs"], t["metric"]) for t in result["trials"]}
    best = _key(result["best"]["values"]) if result["best"] else None
    return Sweep(trials, best, result["seconds"])


def _env(folder: Path) -> dict[str, str]:
    return {**os.environ, "COLUMNS": "120", "NO_COLOR": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{folder}/mlflow.db"}


def _tune(folder: Path, data: Path, scheduler: str) -> list[str]:
    return [sys.executable, "-m", "gssf_cli", "tune", "--data", str(data), *SWEEPS[scheduler], *BASE,
            "--storage", str(folder / "ray"), "--json"]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare(tmp_path_factory.mktemp("sweep") / "syn", train_images=300)


@pytest.fixture(scope="module")
def uninterrupted(data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Sweep]:
    found = {}
    for scheduler in SWEEPS:
        folder = tmp_path_factory.mktemp(f"uninterrupted-{scheduler}")
        done = subprocess.run(_tune(folder, data, scheduler), cwd=folder, env=_env(folder), capture_output=True,
                              text=True, timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stderr
        found[scheduler] = _sweep(json.loads(done.stdout))
        tracker = Tracker(tracking_uri=_env(folder)["MLFLOW_TRACKING_URI"])
        (tune_run,) = _tune_runs(tracker)
        assert _from_store(tracker, tune_run, found[scheduler]).trials == found[scheduler].trials, "as the store has it"
    return found


def _tune_runs(tracker: Tracker) -> list[Any]:
    return tracker.client.search_runs([tracker.experiment_id], "tags.`gssf.stage` = 'tune'")


def _kill_at(proc: subprocess.Popen[str], tracker: Tracker, delay: float) -> str:
    """SIGKILL the driver ``delay`` seconds after its tune run appeared; what it had reached by then."""
    deadline = time.monotonic() + 300
    while not _tune_runs(tracker) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(delay)
    if proc.poll() is not None:
        return "finished before the kill"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    return f"killed {delay:.1f} s in"


def _trial_epochs(path: Path) -> list[int]:
    """The epochs a trial trained and reported, in order, across every attempt (Ray appends on restore); not the
    epoch a restored trial reports again from its checkpoint (:data:`REPLAYED`)."""
    results = path / "result.json"
    if not results.is_file():
        return []
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    return [int(row["epoch"]) for row in rows if not row.get(REPLAYED)]


def _from_store(tracker: Tracker, tune_run: Any, reference: Sweep) -> Sweep:
    """A sweep whose driver was killed after its tune run ended FINISHED (while it shut Ray down, before it printed):
    the trials as the store holds them, each one's tuned values from its ``train.*`` params."""
    names = json.loads(next(iter(reference.trials)))
    trials = {}
    for child in tracker.child_runs(tune_run.info.run_id):
        values = {name: child.data.params[f"train.{name}"] for name in names}
        history = [m.value for m in tracker.client.get_metric_history(child.info.run_id, "val_rsum")]
        trials[_key(values)] = (child.info.status, len(history), max(history) if history else None)
    return Sweep(trials, None, 0.0)


def _run_once(scheduler: str, data: Path, folder: Path, delay: float) -> tuple[str, dict[str, Any] | None, Tracker]:
    """One sweep, its driver SIGKILLed ``delay`` s after its tune run appeared, then ``gssf tune --resume`` if the run
    was left unfinished: what happened, the result (None when the kill came after the run had finished), the store."""
    env, tracker = _env(folder), Tracker(tracking_uri=_env(folder)["MLFLOW_TRACKING_URI"])
    proc = subprocess.Popen(_tune(folder, data, scheduler), cwd=folder, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        what = _kill_at(proc, tracker, delay)
    finally:
        if proc.poll() is None:
            proc.kill()
    (tune_run,) = _tune_runs(tracker)
    if what.startswith("finished"):
        return what, json.loads(proc.stdout.read() if proc.stdout else "{}"), tracker
    if tune_run.info.status == "FINISHED":
        return f"{what}, after the tune run had finished", None, tracker
    resumed = subprocess.run([sys.executable, "-m", "gssf_cli", "tune", "--resume", tune_run.info.run_id, "--json"],
                             cwd=folder, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, f"{what}: {resumed.stderr[-2000:]}"
    return f"{what}, resumed", json.loads(resumed.stdout), tracker


@pytest.mark.parametrize("scheduler", list(SWEEPS))
def test_a_killed_sweep_resumes_to_the_uninterrupted_one(
    scheduler: str, data: Path, uninterrupted: dict[str, Sweep], tmp_path_factory: pytest.TempPathFactory
) -> None:
    reference = uninterrupted[scheduler]
    seed = random.randrange(10**6)
    draw = random.Random(seed)
    kills = attempts = 0
    while kills < KILLS and attempts < 4 * KILLS:
        attempts += 1
        folder = tmp_path_factory.mktemp(f"killed-{scheduler}")
        what, result, tracker = _run_once(scheduler, data, folder, draw.uniform(0.0, reference.seconds))
        kills += what.endswith("resumed")
        where = f"{scheduler}, attempt {attempts}, kill {kills} of {KILLS} (seed {seed}): {what}"
        (tune_run,) = _tune_runs(tracker)
        assert tune_run.info.status == "FINISHED", where
        children = tracker.child_runs(tune_run.info.run_id)
        assert len(children) == len(reference.trials), f"{where}: a trial run duplicated or missing"
        if result is None:
            assert _from_store(tracker, tune_run, reference).trials == reference.trials, where
            print(f"{where}: {len(children)} of {len(reference.trials)} trials accounted for, as uninterrupted")
            continue
        assert _sweep(result).trials == reference.trials, where
        assert _sweep(result).best == reference.best, where
        assert {c.info.run_id for c in children} == {t["run_id"] for t in result["trials"]}, where
        for trial, child in zip(sorted(result["trials"], key=lambda t: t["run_id"]),
                                sorted(children, key=lambda c: c.info.run_id), strict=True):  # fmt: skip
            assert child.info.status == trial["status"], where
            steps = [m.step for m in tracker.client.get_metric_history(child.info.run_id, "val_rsum")]
            assert steps == sorted(set(steps)) and len(steps) == trial["epochs"], f"{where}: epochs logged {steps}"
            epochs = _trial_epochs(Path(trial["path"]))
            assert epochs.count(trial["epochs"]) <= 1 or trial["epochs"] == 0, f"{where}: ran to the end twice"
        print(f"{where}: {len(children)} of {len(reference.trials)} trials accounted for, as uninterrupted")
    assert kills == KILLS, f"only {kills} of {attempts} kills landed while the sweep ran (seed {seed})"
    print(f"{scheduler}: {kills} kills mid-sweep resumed as uninterrupted, in {attempts} attempts")
