"""``gssf tune``: checks before Ray, and real Ray Tune runs on tiny data logged to MLflow (the search-space
syntax itself: ``tests/unit/training/test_tune_plan.py``).

The Ray tests start a real local Ray (2 CPUs here) and train real models for 2-4 epochs; each tune is run
once per module and several tests read its outcome.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner, Result

from gssf_cli.cli.app import app
from gssf_cli.cluster.durable_asha import REPLAYED
from gssf_cli.core.config import resolve
from gssf_cli.core.errors import UserInputError
from gssf_cli.core.stage_configs import TrainConfig, TuneConfig
from gssf_cli.tracking.adapter import Tracker
from gssf_cli.training.tune_plan import make_plan
from tests.unit.stages.tune_helpers import ENV, logged_steps, prepare

SMALL_BASE = ["--base", "embed_dim=32", "--base", "word_dim=16", "--base", "batch_size=32", "--base", "lr=0.003"]


def _cli(*args: str) -> Result:
    return CliRunner().invoke(app, list(args), env=ENV)


def test_plan_checks_every_grid_combination(moduledir: Path) -> None:
    def plan(*params: str, **kwargs: Any) -> Any:
        return make_plan(TuneConfig(params=params, data=Path("data/syn"), **kwargs), cpu_count=2)

    found = plan("embed_dim=16,32", "block_size=8,16", base=("metric=bdiag",))
    assert found.num_trials == 4 and found.metric == "rsum" and found.mode == "max"
    with pytest.raises(UserInputError, match=r"--param embed_dim=16, block_size=32: block size 32 does not divide"):
        plan("embed_dim=16,32", "block_size=8,32", base=("metric=bdiag",))
    random = plan("lr=1e-4:1e-2:log", "block_size=4,8", base=("embed_dim=32",))
    assert random.num_samples == 8 and random.num_trials == 16
    assert plan("lr=0.1,0.2", metric="i2t_medr").mode == "min"
    assert plan("lr=0.1,0.2", metric="val_rsum", mode="min").metric_key == "val_rsum"


# ---------------------------------------------------------------------------------------------------------
# Bad input: exit 2 with one line, before Ray is even imported


BAD_INVOCATIONS: list[tuple[list[str], str]] = [
    (["--param", "blocksize=4"], "--param blocksize: unknown parameter; tunable: adapter, aggregate, amp, batch_size, block_size"),
    (["--param", "block_size", "--values", "4,5,8"], "--param block_size=5: block size 5 does not divide the "
     "embedding size 32; valid block sizes: 1, 2, 4, 8, 16, 32"),
    (["--param", "block_size=divisors:64:128"], "no divisor of the embedding size 32 in [64, 128]"),
    (["--param", "epochs=1,2"], "not tunable"),
    (["--param", "lr=fast"], "'fast' is not a number"),
    (["--param", "block_size=4", "--metric", "recall"], "--metric recall: not a validation metric of cross-modal data"),
    (["--param", "block_size=4", "--base", "metric=cosine"], "the metric 'cosine' has no blocks"),
    (["--param", "teacher=missing.npz", "--base", "block_size=8"], "teacher file missing.npz not found"),
    (["--param", "lr", "--param", "margin", "--values", "1,2"], "--values goes with exactly one --param"),
    (["--param", "block_size=4", "--base", "block_size=8"], "--param block_size is tuned, so --base block_size"),
    (["--param", "block_size=4", "--base", "lr"], "--base 'lr': expected KEY=VALUE"),
    (["--param", "block_size=4", "--base", "lrate=0.1"], "base.lrate: unknown key"),
    (["--param", "block_size=4", "--cpus-per-trial", "4096"], "--cpus-per-trial 4096: this machine has"),
    (["--param", "block_size=4", "--scheduler", "pbt"], "tune.scheduler: 'pbt' is not one of auto, fifo, asha"),
    ([], "give at least one --param NAME"),
]  # fmt: skip


def test_bad_parameters_exit_2_before_ray_starts(moduledir: Path) -> None:
    """Every bad invocation answers with one line and exit 2, quickly, without importing Ray at all."""
    cases = [["tune", "--data", "data/syn", "--base", "embed_dim=32", *args] for args, _ in BAD_INVOCATIONS]
    cases.append(["tune", "--data", "nowhere", "--param", "block_size=4"])
    code = (
        "import json, sys\n"
        "from typer.testing import CliRunner\n"
        "from gssf_cli.cli.app import app\n"
        f"results = [CliRunner().invoke(app, args) for args in {cases!r}]\n"
        "print(json.dumps({'results': [[r.exit_code, r.stderr] for r in results], 'ray': 'ray' in sys.modules}))\n"
    )
    env = {**os.environ, "COLUMNS": "120", "NO_COLOR": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    expected = [message for _, message in BAD_INVOCATIONS] + ["dataset folder nowhere not found"]
    for (exit_code, stderr), message in zip(report["results"], expected, strict=True):
        lines = stderr.strip().splitlines()
        assert exit_code == 2, stderr
        assert len(lines) == 1 and lines[0].startswith("gssf: error: "), lines
        assert message in lines[0], (message, lines[0])
    assert report["ray"] is False, "Ray was imported for a tune that could not start"
    assert not (moduledir / ".gssf" / "ray").exists()


# ---------------------------------------------------------------------------------------------------------
# Real tunes


@pytest.fixture(scope="module")
def block_tune(moduledir: Path) -> dict[str, Any]:
    """The CLI, as a user runs it: three block sizes, 2 epochs each; a pure grid, so the default scheduler is
    FIFO (every trial runs to the end)."""
    result = _cli(
        "tune", "--data", "data/syn", "--param", "block_size", "--values", "4,8,16", *SMALL_BASE,
        "--base", "metric=bdiag", "--epochs", "2", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    return dict(json.loads(result.stdout))


def test_block_size_tune_logs_one_child_per_trial(block_tune: dict[str, Any]) -> None:
    client = Tracker().client
    tune_run = client.get_run(block_tune["run_id"])
    assert tune_run.info.status == "FINISHED" and tune_run.data.tags["gssf.stage"] == "tune"
    assert tune_run.info.run_name == f"tune-block_size-{block_tune['run_id'][:6]}"
    assert block_tune["scheduler"] == "fifo" == tune_run.data.tags["gssf.tune.scheduler"]
    children = Tracker().child_runs(block_tune["run_id"])
    assert len(children) == 3 == len(block_tune["trials"])
    assert {c.info.status for c in children} == {"FINISHED"}
    assert sorted(int(c.data.params["train.block_size"]) for c in children) == [4, 8, 16]
    for child in children:
        assert child.data.tags["gssf.stage"] == "tune_trial"
        assert child.data.params["train.metric"] == "bdiag" and child.data.params["train.embed_dim"] == "32"
        history = client.get_metric_history(child.info.run_id, "val_rsum")
        assert [m.step for m in history] == _reported_epochs(child) and len(history) == 2
        assert child.info.run_name.startswith(f"trial-block_size={child.data.params['train.block_size']}-")
        assert child.info.end_time >= child.info.start_time
    by_run = {t["run_id"]: t for t in block_tune["trials"]}
    assert set(by_run) == {c.info.run_id for c in children}
    for child in children:
        trial = by_run[child.info.run_id]
        best = max(m.value for m in client.get_metric_history(child.info.run_id, "val_rsum"))
        assert math.isclose(trial["metric"], best)
        assert trial["head_params"] == 32 * trial["values"]["block_size"]


def test_block_size_tune_output_and_artifacts(block_tune: dict[str, Any], moduledir: Path) -> None:
    trials = block_tune["trials"]
    assert [t["metric"] for t in trials] == sorted((t["metric"] for t in trials), reverse=True)
    assert block_tune["best"] == trials[0] and block_tune["metric"] == "rsum" and block_tune["tuned"] == ["block_size"]
    assert all(t["status"] == "FINISHED" and t["epochs"] == 2 and t["error"] is None for t in trials)
    client = Tracker().client
    run_id = block_tune["run_id"]
    artifacts = {a.path for a in client.list_artifacts(run_id)} | {
        a.path for a in client.list_artifacts(run_id, "plots")
    }
    assert {"trials.csv", "config", "plots/block_size.png"} <= artifacts
    rows = list(csv.DictReader(io.StringIO(Path(block_tune["out_dir"], "trials.csv").read_text())))
    assert [int(r["block_size"]) for r in rows] == [t["values"]["block_size"] for t in trials]
    assert _tune_params_logged(client.get_run(run_id).data.params)


def test_a_seed_axis_summarises_each_configuration_across_seeds(
    moduledir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--param seed=0,1`` beside the block size: each block size is one configuration with n = 2, the summary
    gives its mean ± std, the best trial comes from the configuration with the best mean, the table says so."""

    from gssf_cli.cli import tables

    result = _cli(
        "tune", "--data", "data/syn", "--param", "block_size=4,8", "--param", "seed=0,1", *SMALL_BASE,
        "--base", "metric=bdiag", "--epochs", "1", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    tuned = json.loads(result.stdout)
    by_size: dict[int, list[float]] = {}
    for trial in tuned["trials"]:
        by_size.setdefault(trial["values"]["block_size"], []).append(trial["metric"])
    assert sorted(by_size) == [4, 8] and all(len(v) == 2 for v in by_size.values())
    found = tuned["configurations"]
    assert [c["values"] for c in found] == sorted(
        ({"block_size": size} for size in by_size), key=lambda v: -sum(by_size[v["block_size"]])
    )
    for configuration in found:
        values = by_size[configuration["values"]["block_size"]]
        assert configuration["metric"]["n"] == 2
        assert configuration["metric"]["mean"] == pytest.approx(sum(values) / 2)
    assert tuned["best"]["values"]["block_size"] == found[0]["values"]["block_size"]
    tables.print_tune(tuned, as_json=False)
    assert "2 configurations across seeds" in capsys.readouterr().out
    rows = list(csv.DictReader(io.StringIO(Path(tuned["out_dir"], "configurations.csv").read_text())))
    assert [int(r["block_size"]) for r in rows] == [c["values"]["block_size"] for c in found]
    assert [int(r["n"]) for r in rows] == [2, 2]
    logged = {a.path for a in Tracker().client.list_artifacts(tuned["run_id"])}
    assert {"trials.csv", "configurations.csv"} <= logged


def _progress_epochs(trial_path: Path) -> list[int]:
    """The epoch numbers a trial trained and reported to Ray, in order (its ``result.json``), however training
    counts them; not the epoch a restored trial reports again from its checkpoint (:data:`REPLAYED`)."""
    table = trial_path / "result.json"  # every key of every result (progress.csv keeps the first one's columns)
    if not table.exists():  # a trial that failed before its first epoch
        return []
    rows = [json.loads(line) for line in table.read_text().splitlines() if line.strip()]
    return [int(row["epoch"]) for row in rows if not row.get(REPLAYED)]


def _reported_epochs(child: Any) -> list[int]:
    """What a trial's MLflow steps must be: the epochs it reported, each once."""
    return sorted(set(_progress_epochs(Path(child.data.tags["gssf.tune.trial_path"]))))


def _tune_params_logged(params: dict[str, str]) -> bool:
    return params["base.metric"] == "bdiag" and params["tune.scheduler"] == "fifo" and "best.block_size" in params


def test_best_config_trains_as_is(block_tune: dict[str, Any], moduledir: Path) -> None:
    best_file = Path(block_tune["best_config"])
    values = tomllib.loads(best_file.read_text())
    assert values["block_size"] == block_tune["best"]["values"]["block_size"]
    assert resolve(TrainConfig, "train", values).block_size == values["block_size"]
    downloaded = Tracker().client.download_artifacts(block_tune["run_id"], "config/best_train.toml", str(moduledir))
    assert Path(downloaded).read_text() == best_file.read_text()
    trained = _cli("train", "--config", str(best_file), "--epochs", "1", "--threads", "1", "--json")
    assert trained.exit_code == 0, trained.stderr
    run = Tracker().client.get_run(json.loads(trained.stdout)["run_id"])
    assert run.data.params["train.block_size"] == str(values["block_size"])


@pytest.fixture(scope="module")
def teachers(moduledir: Path) -> tuple[Path, Path]:
    """A teacher file for this train split, and one made for another dataset (wrong number of rows): it
    passes the checks before Ray (the file exists) and fails inside its trial, as a real mix-up would."""
    rng = np.random.default_rng(0)
    good, wrong = moduledir / "teacher.npz", moduledir / "teacher_other.npz"
    np.savez(good, images=rng.normal(size=(300, 8)).astype(np.float32), texts=rng.normal(size=(1500, 8)))
    np.savez(wrong, images=rng.normal(size=(40, 8)).astype(np.float32), texts=rng.normal(size=(200, 8)))
    return good, wrong


@pytest.fixture(scope="module")
def asha_tune(moduledir: Path, teachers: tuple[Path, Path]) -> dict[str, Any]:
    """The stage under a parent run: ASHA, one trial at a time (so ASHA's decisions are deterministic),
    teachers x learning rates. Trial order (Ray's grid: the first parameter varies fastest): good/3e-3
    finishes, wrong/3e-3 fails, good/1e-7 is far behind at epoch 1 and is stopped, wrong/1e-7 fails."""
    from gssf_cli.stages import tune as stage

    good, wrong = teachers
    config = TuneConfig(
        params=(f"teacher={good.name},{wrong.name}", "lr=0.003,0.0000001"),
        data=Path("data/syn"),
        base=("embed_dim=32", "word_dim=16", "batch_size=32", "metric=gssf", "block_size=8", "distill_weight=0.5"),
        epochs=2,
        scheduler="asha",
        max_concurrent=1,
        max_failures=0,
    )
    tracker = Tracker()
    with tracker.start_run("pipeline") as parent:
        result = stage.run(config, tracker, parent_run_id=parent.run_id, progress=False)
    return {"parent": parent.run_id, **result.to_json()}


def test_asha_stops_weak_trials_and_failed_trials_do_not_stop_the_tune(asha_tune: dict[str, Any]) -> None:
    tracker = Tracker()
    tune_run = tracker.client.get_run(asha_tune["run_id"])
    assert tune_run.data.tags["mlflow.parentRunId"] == asha_tune["parent"]
    assert tune_run.info.status == "FINISHED"
    children = {c.info.run_id: c for c in tracker.child_runs(asha_tune["run_id"])}
    assert len(children) == 4
    statuses = {}
    for trial in asha_tune["trials"]:
        child = children[trial["run_id"]]
        assert child.info.status == trial["status"]
        statuses[(trial["values"]["teacher"], trial["values"]["lr"])] = trial["status"]
        steps = [m.step for m in tracker.client.get_metric_history(child.info.run_id, "loss")]
        assert steps == _reported_epochs(child) and len(steps) == trial["epochs"]
        if trial["status"] == "FAILED":
            assert "train split has 300 images / 1500 texts" in trial["error"]
            assert "train split has" in child.data.tags["gssf.error"] and trial["epochs"] == 0
    assert statuses == {
        ("teacher.npz", 0.003): "FINISHED",
        ("teacher_other.npz", 0.003): "FAILED",
        ("teacher.npz", 1e-7): "KILLED",
        ("teacher_other.npz", 1e-7): "FAILED",
    }
    assert asha_tune["best"]["values"] == {"teacher": "teacher.npz", "lr": 0.003}
    assert asha_tune["scheduler"] == "asha", "an explicit --scheduler is honoured on a pure grid"
    assert asha_tune["trials"][-1]["metric"] is None
    metrics = tune_run.data.metrics
    assert (metrics["trials_finished"], metrics["trials_killed"], metrics["trials_failed"]) == (1, 1, 2)


def test_table_output(asha_tune: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:

    from gssf_cli.cli import tables

    tables.print_tune(asha_tune, as_json=False)
    out = capsys.readouterr().out
    assert "4 trials, by rsum (max), scheduler asha" in out
    assert "KILLED" in out and "FAILED" in out and "FINISHED" in out
    assert "best: trial" in out and "teacher=teacher.npz, lr=0.003" in out


# ---------------------------------------------------------------------------------------------------------
# A trial whose process dies is retried from its last checkpoint


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _trial_workers(pid: int) -> list[int]:
    workers = []
    for child in _descendants(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "ImplicitFunc" in cmdline:
            workers.append(child)
    return workers


@pytest.fixture(scope="module")
def bigger(moduledir: Path) -> Path:
    """Epochs long enough (~1 s) to interrupt a trial between two of them."""
    return prepare(moduledir / "data" / "bigger", train_images=800)


def _start_tune(moduledir: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "COLUMNS": "120", "NO_COLOR": "1"}
    command = [sys.executable, "-m", "gssf_cli", "tune", *args, *SMALL_BASE, "--base", "metric=bdiag", "--json"]
    return subprocess.Popen(command, cwd=moduledir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_every_trial_failing_is_exit_1(moduledir: Path, teachers: tuple[Path, Path]) -> None:
    result = _cli(
        "tune", "--data", "data/syn", "--param", f"teacher={teachers[1].name}", *SMALL_BASE, "--base", "metric=gssf",
        "--base", "block_size=8", "--base", "distill_weight=1", "--epochs", "1", "--max-failures", "0",
    )  # fmt: skip
    assert result.exit_code == 1, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("gssf: check failed: no trial reported rsum (1 trials); first error")
    assert "train split has 300 images" in line
    failed = Tracker().client.search_runs(
        [Tracker().experiment_id], "tags.`gssf.stage` = 'tune'", order_by=["attributes.start_time DESC"]
    )[0]
    assert failed.info.status == "FAILED"
    assert [c.info.status for c in Tracker().child_runs(failed.info.run_id)] == ["FAILED"]


def _driver_recorded_a_result(storage: Path) -> bool:
    """The driver has processed epoch 0 (checkpoint registered, progress row written): killing the trial
    now must lead to a restore, not a restart. The checkpoint folder alone appears before that bookkeeping."""
    if not list(storage.glob("*/*/checkpoint_000000")):
        return False
    return any(len(p.read_text().splitlines()) >= 2 for p in storage.glob("*/*/progress.csv"))


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the trial's process through /proc")
def test_a_crashed_trial_resumes_from_its_checkpoint(moduledir: Path, bigger: Path, tmp_path: Path) -> None:
    data = bigger
    storage = tmp_path / "ray"
    proc = _start_tune(
        moduledir, "--data", str(data), "--param", "block_size=8", "--epochs", "4", "--max-failures", "1",
        "--storage", str(storage),
    )  # fmt: skip
    killed = None
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None and killed is None:
            if _driver_recorded_a_result(storage):
                time.sleep(0.3)
                workers = _trial_workers(proc.pid)
                if workers:
                    killed = workers[0]
                    os.kill(killed, signal.SIGKILL)
            time.sleep(0.02)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed is not None, "the trial finished before it could be killed"
    assert proc.returncode == 0, err
    trial = json.loads(out)["trials"][0]
    assert trial["status"] == "FINISHED" and trial["epochs"] == 4
    epochs = _progress_epochs(next(storage.glob("*/*/progress.csv")).parent)
    assert epochs.count(epochs[0]) == 1, f"the retry started over instead of resuming: epochs reported {epochs}"
    assert len(set(epochs)) == 4
    history = Tracker().client.get_metric_history(trial["run_id"], "loss")
    assert [m.step for m in history] == sorted(set(epochs))
    assert Tracker().client.get_run(trial["run_id"]).info.status == "FINISHED"


def test_ctrl_c_logs_what_ran_and_ends_the_tune_run_killed(moduledir: Path, bigger: Path, tmp_path: Path) -> None:
    storage = tmp_path / "ray"
    proc = _start_tune(
        moduledir, "--data", str(bigger), "--param", "block_size=4,8", "--epochs", "6", "--storage", str(storage)
    )
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if list(storage.glob("*/*/checkpoint_000000")):
                proc.send_signal(signal.SIGINT)
                break
            time.sleep(0.02)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert out == "" or json.loads(out)["exit_code"] == 130, "--json: stdout is JSON or nothing"
    tracker = Tracker()
    name = next(storage.iterdir()).name
    tune_run = tracker.client.get_run(name.removeprefix("tune-"))
    run_id = tune_run.info.run_id
    assert err.strip().splitlines()[-1] == (
        f"gssf: interrupted: run {run_id} ended KILLED; continue it with: gssf tune --resume {run_id}"
    ), "the interrupt names the run and how to continue it"
    assert tune_run.info.status == "KILLED"
    children = tracker.child_runs(tune_run.info.run_id)
    assert len(children) == 2 and {c.info.status for c in children} == {"KILLED"}
    assert not any("gssf.tune.stopped" in c.data.tags for c in children), "interrupted, not stopped by ASHA"

    from gssf_cli.stages import tune as stage

    shutil.rmtree(storage / name)
    with pytest.raises(UserInputError, match=r"its Ray results folder .* is gone .* cannot be resumed"):
        stage.resume(tune_run.info.run_id, tracker, progress=False)
    assert tracker.client.get_run(tune_run.info.run_id).info.status == "KILLED", "a refused resume wrote nothing"


def test_the_scheduler_is_fifo_for_a_grid_and_asha_for_sampling(moduledir: Path) -> None:
    def scheduler(*params: str, **kwargs: Any) -> str:
        config = TuneConfig(params=params, data=Path("data/syn"), **kwargs)
        return make_plan(config, cpu_count=2).scheduler

    assert TuneConfig(params=("lr=0.1,0.2",)).scheduler == "auto"
    assert scheduler("block_size=4,8,16") == "fifo"
    assert scheduler("block_size=4,8", "lr=0.1,0.2") == "fifo"
    assert scheduler("block_size=4,8", "lr=1e-4:1e-2:log") == "asha"
    assert scheduler("margin=0.1:0.3") == "asha"
    assert scheduler("block_size=4,8", scheduler="asha") == "asha"
    assert scheduler("margin=0.1:0.3", scheduler="fifo") == "fifo"


def test_resume_refuses_what_it_cannot_continue(block_tune: dict[str, Any]) -> None:
    """A finished tune, a trial run, another stage's run: one line each, and nothing written."""
    from gssf_cli.stages import tune as stage

    tracker = Tracker()
    tune_id = block_tune["run_id"]
    trial_id = block_tune["trials"][0]["run_id"]
    prepare_id = tracker.get_run("latest", stage="prepare").info.run_id
    before = len(tracker.client.search_runs([tracker.experiment_id]))
    cases = {
        tune_id: f"tune run {tune_id} already finished: there is nothing to resume",
        trial_id: f"run {trial_id} is one trial of tune run {tune_id}: resume that run instead",
        prepare_id: f"run {prepare_id} is not a tune run (a prepare run)",
        "0" * 32: "unknown run",
    }
    for ref, message in cases.items():
        with pytest.raises(UserInputError) as caught:
            stage.resume(ref, tracker, progress=False)
        assert message in str(caught.value) and "\n" not in str(caught.value)
    assert len(tracker.client.search_runs([tracker.experiment_id])) == before
    assert tracker.client.get_run(tune_id).info.status == "FINISHED"


def _store_state(tracker: Tracker) -> tuple[Any, list[Any]]:
    """The tune run in ``tracker``'s store (the only one there) and its trial runs, as the UI would show them now."""
    found = tracker.client.search_runs([tracker.experiment_id], "tags.`gssf.stage` = 'tune'")
    if not found:
        return None, []
    return found[0], tracker.child_runs(found[0].info.run_id)


@pytest.mark.skipif(not hasattr(signal, "SIGTERM"), reason="stops the tune with SIGTERM")
def test_trial_runs_are_live_and_a_killed_tune_resumes(
    moduledir: Path, bigger: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """One tune, three block sizes one at a time, watched from another process through its own store: each trial's
    run is there, RUNNING, with its epochs, while the tune runs. SIGTERM once the first trial finished and the second
    has an epoch; the tune resumes (from another working directory, with no flags): the same runs carry on, no
    trial or epoch is logged twice, the finished trial is not run again, and the tune run ends FINISHED."""
    from gssf_cli.stages import tune as stage

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "COLUMNS": "120", "NO_COLOR": "1", "MLFLOW_TRACKING_URI": uri}
    command = [
        sys.executable, "-m", "gssf_cli", "tune", "--data", str(bigger), "--param", "block_size=4,8,16",
        "--epochs", "3", "--max-concurrent", "1", "--storage", "ray", *SMALL_BASE, "--base", "metric=bdiag", "--json",
    ]  # fmt: skip
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tracker = Tracker(tracking_uri=uri)
    seen_live: list[tuple[str, list[int]]] = []
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            tune_run, children = _store_state(tracker)
            if tune_run is not None and tune_run.info.status == "RUNNING":
                running = [c for c in children if c.info.status == "RUNNING" and logged_steps(tracker, c)]
                seen_live += [(c.info.run_id, logged_steps(tracker, c)) for c in running]
                if running and any(c.info.status == "FINISHED" for c in children):
                    proc.send_signal(signal.SIGTERM)
                    break
            time.sleep(0.1)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert seen_live, f"no trial run was seen RUNNING with an epoch logged while the tune ran: {err}"
    assert proc.returncode == 130, err
    tune_run, children = _store_state(tracker)
    tune_id = tune_run.info.run_id
    assert tune_run.info.status == "KILLED" and tune_run.data.tags["gssf.tune.scheduler"] == "fifo"
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert finished and len(finished) < 3, [c.info.status for c in children]
    assert {c.info.status for c in children} <= {"FINISHED", "KILLED"}
    before = {
        c.info.run_id: (c.info.end_time, _progress_epochs(Path(c.data.tags["gssf.tune.trial_path"]))) for c in finished
    }

    capfd.readouterr()
    result = stage.resume(tune_id, tracker, progress=True)
    out, err = capfd.readouterr()
    assert out == "", "progress goes to stderr only"
    assert "started" in err and "FINISHED after 3 epochs" in err

    tune_run, children = _store_state(tracker)
    assert result.run_id == tune_id and tune_run.info.status == "FINISHED"
    assert result.scheduler == "fifo" and len(result.trials) == 3
    assert len(children) == 3, "a trial run was duplicated (or one is missing)"
    assert sorted(int(c.data.params["train.block_size"]) for c in children) == [4, 8, 16]
    assert {c.info.run_id for c in children} == {t["run_id"] for t in result.trials}
    assert len({c.data.tags["gssf.tune.trial_id"] for c in children}) == 3
    for child in children:
        assert child.info.status == "FINISHED"
        steps = logged_steps(tracker, child)
        assert steps == _reported_epochs(child) and len(steps) == 3, (child.info.run_name, steps)
    for child in children:
        if child.info.run_id in before:
            now = (child.info.end_time, _progress_epochs(Path(child.data.tags["gssf.tune.trial_path"])))
            assert now == before[child.info.run_id], "a trial that had finished ran again"
    with pytest.raises(UserInputError, match="already finished"):
        stage.resume("latest", tracker, progress=False)


def test_tune_help_lists_the_options() -> None:
    result = _cli("tune", "--help")
    assert result.exit_code == 0
    for option in ("--param", "--values", "--metric", "--mode", "--trials", "--scheduler", "--cpus-per-trial",
                   "--max-concurrent", "--address", "--storage", "--config", "--base", "--json"):  # fmt: skip
        assert option in result.stdout
