"""The tracking adapter against real stores: a local SQLite file and a real ``mlflow server``."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import Result

from gssf_cli.tracking import adapter as tracking
from gssf_cli.tracking.adapter import PARENT_TAG, Tracker, flatten_params
from gssf_cli.tracking.store import default_tracking_uri
from tests.conftest import tiny_synthetic_args
from tests.mlflow_ui import mlflow_ui


def test_flatten_params() -> None:
    assert flatten_params({"a": {"b": 1, "c": [1, 2]}, "d": True, "e": "x"}) == {
        "a.b": "1",
        "a.c": "[1, 2]",
        "d": "true",
        "e": "x",
    }


def _exercise(tracker: Tracker, tmp_path: Path) -> tuple[str, str]:
    """Parent with one child: config, metrics with steps, an artifact, a dataset input."""
    (tmp_path / "note.txt").write_text("hello")
    dataset = tmp_path / "ds"
    dataset.mkdir()
    with tracker.start_run("run") as parent, tracker.start_run("train", parent_run_id=parent.run_id) as child:
        child.log_config("train", {"lr": 0.001, "metric": "bdiag", "nested": {"block_size": 16}})
        for step in range(3):
            child.log_metrics({"loss": 1.0 / (step + 1), "rsum": 10.0 * step}, step=step)
        child.log_artifact(tmp_path / "note.txt", "notes")
        child.log_dataset("ds", dataset, "ab" * 32, context="training")
    return parent.run_id, child.run_id


def _check(tracker: Tracker, parent_id: str, child_id: str, tmp_path: Path) -> None:
    client = tracker.client
    child = client.get_run(child_id)
    assert child.info.status == "FINISHED"
    assert child.data.tags[PARENT_TAG] == parent_id
    assert child.data.tags["gssf.stage"] == "train"
    assert child.data.params == {
        "train.lr": "0.001",
        "train.metric": "bdiag",
        "train.nested.block_size": "16",
    }
    history = client.get_metric_history(child_id, "rsum")
    assert [(m.step, m.value) for m in history] == [(0, 0.0), (1, 10.0), (2, 20.0)]
    artifacts = {a.path for a in client.list_artifacts(child_id, "notes")}
    assert artifacts == {"notes/note.txt"}
    assert {a.path for a in client.list_artifacts(child_id, "config")} == {"config/train.toml"}
    local = client.download_artifacts(child_id, "notes/note.txt", str(tmp_path / "dl"))
    assert Path(local).read_text() == "hello"
    assert [d.dataset.name for d in child.inputs.dataset_inputs] == ["ds"]
    assert child.data.tags["gssf.dataset.manifest_sha256"] == "ab" * 32
    assert [r.info.run_id for r in tracker.child_runs(parent_id)] == [child_id]
    assert tracker.get_run("latest", stage="train").info.run_id == child_id


def test_sqlite_store(workdir: Path) -> None:
    tracker = Tracker(experiment="exp-a")
    parent_id, child_id = _exercise(tracker, workdir)
    assert (workdir / "mlflow.db").is_file()
    _check(tracker, parent_id, child_id, workdir)


def test_git_commit_is_tagged_inside_a_repository(workdir: Path) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}  # fmt: skip
    subprocess.run(["git", "init", "-q"], check=True, env=env)
    subprocess.run(["git", "commit", "-q", "--allow-empty", "-m", "x"], check=True, env=env)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    tracker = Tracker()
    with tracker.start_run("prepare") as run:
        pass
    assert tracker.client.get_run(run.run_id).data.tags["mlflow.source.git.commit"] == head


def test_failed_stage_marks_the_run_failed(workdir: Path) -> None:
    tracker = Tracker()
    with pytest.raises(RuntimeError), tracker.start_run("train") as run:
        raise RuntimeError("boom")
    assert tracker.client.get_run(run.run_id).info.status == "FAILED"


def test_an_interrupt_inside_a_store_write_still_ends_the_run_killed(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM landing inside one of the store's own transactions: that connection keeps SQLite's write lock
    for as long as the interrupted frames (kept by the traceback) hold it. Ending the run must let go of it."""
    tracker = Tracker()
    engine = tracker.client._tracking_client.store.engine

    def interrupted_write() -> None:
        connection = engine.connect()
        connection.exec_driver_sql("BEGIN IMMEDIATE")
        raise KeyboardInterrupt

    def locked(*args: object, **kwargs: object) -> None:
        raise sqlite3.OperationalError("database is locked")

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt), tracker.start_run("train") as run:
        monkeypatch.setattr(tracker.client, "set_terminated", locked)
        interrupted_write()
    assert tracking.MlflowClient(tracking_uri=tracker.tracking_uri).get_run(run.run_id).info.status == "KILLED"
    assert time.monotonic() - started < 15, "the fresh client waited on the abandoned write lock"


def test_unknown_run_is_a_user_error(workdir: Path) -> None:
    from gssf_cli.core.errors import UserInputError

    tracker = Tracker()
    with pytest.raises(UserInputError, match="unknown run 'abc'"):
        tracker.get_run("abc")
    with pytest.raises(UserInputError, match="no train run"):
        tracker.get_run("latest", stage="train")


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    """A real ``mlflow server`` on 127.0.0.1 with its own SQLite store; stopped after the test."""
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    with mlflow_ui(server_dir, 90.0, "server", "server.db", "--workers", "1") as url:
        yield url


@pytest.mark.server
def test_real_mlflow_server(mlflow_server: str, workdir: Path, gssf: Callable[..., Result]) -> None:
    tracker = Tracker(mlflow_server, experiment="remote")
    parent_id, child_id = _exercise(tracker, workdir)
    _check(tracker, parent_id, child_id, workdir)
    result = gssf("--tracking-uri", mlflow_server, "--experiment", "remote", *tiny_synthetic_args(), "--json")
    assert result.exit_code == 0, result.stderr
    assert tracker.get_run("latest", stage="prepare").data.tags["gssf.dataset.name"] == "syn"
    assert not (workdir / "mlflow.db").exists()


def test_runs_look_native_in_the_mlflow_ui(workdir: Path) -> None:
    """The experiment is marked classic ML (the view MLflow 3.17 opens is the browser's choice: see
    :data:`gssf_cli.tracking.tags.CLASSIC_ML`), every run says who ran it, and run names never repeat:
    ``<name>-<first characters of the run id>``, also when a run is renamed once its caller knows more."""
    tracker = Tracker(experiment="native")
    with (
        tracker.start_run("train", run_name="train-gssf-d64") as first,
        tracker.start_run("train", run_name="train-gssf-d64") as second,
    ):
        pass
    experiment = tracker.client.get_experiment(tracker.experiment_id)
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    runs = [tracker.client.get_run(r.run_id) for r in (first, second)]
    assert [r.info.run_name for r in runs] == [f"train-gssf-d64-{r.info.run_id[:6]}" for r in runs]
    assert runs[0].info.run_name != runs[1].info.run_name
    assert all(r.data.tags["mlflow.user"] == tracking.current_user() for r in runs)
    trial = tracker.open_run("tune_trial", run_name="trial-block_size=8", parent_run_id=first.run_id)
    assert tracker.client.get_run(trial.run_id).info.status == "RUNNING"
    tracker.end_run(trial.run_id, "KILLED")
    ended = tracker.client.get_run(trial.run_id)
    assert ended.info.status == "KILLED" and ended.data.tags[PARENT_TAG] == first.run_id
    renamed = f"evaluate-final-gssf-d64-{second.run_id[:6]}"
    assert tracker.rename_run(second.run_id, "evaluate-final-gssf-d64") == renamed
    assert tracker.get_run(renamed).info.run_id == second.run_id


def test_an_experiment_made_before_gets_its_kind(workdir: Path) -> None:
    """An experiment created by an older gssf (or by hand) is marked classic ML on first use, not re-created."""
    from mlflow.tracking import MlflowClient

    old_id = MlflowClient(default_tracking_uri()).create_experiment("older")
    tracker = Tracker(experiment="older")
    assert tracker.experiment_id == old_id
    assert tracker.client.get_experiment(old_id).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_a_run_is_found_by_what_gssf_prints_of_it(workdir: Path) -> None:
    """Its id, any unique prefix of at least 8 characters (the tables print 12), or its name; an ambiguous
    reference lists its matches, and a prefix too short to be unique is not guessed."""
    from gssf_cli.core.errors import UserInputError

    tracker = Tracker()
    with tracker.start_run("train", run_name="train-gssf-d8") as first, tracker.start_run("train") as second:
        pass
    run = tracker.client.get_run(first.run_id)
    for reference in (first.run_id, first.run_id[:12], first.run_id[:8], run.info.run_name):
        assert tracker.get_run(reference).info.run_id == first.run_id, reference
    with pytest.raises(UserInputError, match="unknown run"):
        tracker.get_run(first.run_id[:7])
    twins = [tracker.open_run("evaluate", run_name="same") for _ in range(2)]
    for twin in twins:
        tracker.client.update_run(twin.run_id, name="evaluate-same")
    with pytest.raises(UserInputError, match="'evaluate-same' is ambiguous") as caught:
        tracker.get_run("evaluate-same")
    assert all(twin.run_id in str(caught.value) for twin in twins), caught.value
    assert tracker.get_run(second.run_id[:10]).info.run_id == second.run_id


def test_a_pipeline_or_seeds_run_stands_for_its_final_train_run(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gssf_cli.tracking.tags import FINAL_RUN_TAG, PIPELINE_STAGE, SEEDS_STAGE

    tracker = Tracker()
    with tracker.start_run(PIPELINE_STAGE) as pipeline:
        with tracker.start_run("train", parent_run_id=pipeline.run_id) as baseline:
            pass
        with tracker.start_run("train", parent_run_id=pipeline.run_id) as final:
            pass
        pipeline.set_tags({FINAL_RUN_TAG: final.run_id})
    with tracker.start_run(SEEDS_STAGE) as seeds:
        with tracker.start_run("train", parent_run_id=seeds.run_id):
            pass
        time.sleep(0.01)
        with tracker.start_run("train", parent_run_id=seeds.run_id) as last_seed:
            pass
    assert baseline.run_id != final.run_id
    assert tracker.get_train_run(pipeline.run_id).info.run_id == final.run_id
    said = capsys.readouterr().err.strip().splitlines()
    assert said == [f"gssf: run {pipeline.run_id} is a run run: using its final train run {final.run_id} "
                    f"({tracker.client.get_run(final.run_id).info.run_name})"]  # fmt: skip
    assert tracker.get_train_run(seeds.run_id).info.run_id == last_seed.run_id
    assert tracker.get_run(pipeline.run_id, stage="train").info.run_id == pipeline.run_id, "get_run: the run itself"


def test_a_finished_run_is_not_resumed_and_nothing_is_logged(workdir: Path) -> None:
    from gssf_cli.core.errors import UserInputError

    tracker = Tracker()
    with tracker.start_run("train") as run:
        run.log_metrics({"loss": 1.0}, step=1)
    before = tracker.client.get_run(run.run_id)
    finished = rf"run {run.run_id} \(.*\) FINISHED: there is nothing to resume"
    with pytest.raises(UserInputError, match=finished), tracker.start_run("train", resume_run_id=run.run_id):
        pass
    after = tracker.client.get_run(run.run_id)
    assert (after.info.status, after.info.end_time, after.data.metrics) == (
        "FINISHED",
        before.info.end_time,
        {"loss": 1.0},
    )


def test_an_interrupted_run_says_which_run_and_how_to_continue_it(workdir: Path) -> None:
    from gssf_cli.core.errors import RunInterrupted

    tracker = Tracker()
    with (
        pytest.raises(RunInterrupted) as caught,
        tracker.start_run("run") as parent,
        tracker.start_run("train", parent_run_id=parent.run_id) as run,
    ):
        raise KeyboardInterrupt
    assert caught.value.run_id == run.run_id, "the innermost run is the one to continue"
    assert (
        str(caught.value)
        == f"interrupted: run {run.run_id} ended KILLED; continue it with: gssf train --resume {run.run_id}"
    )
    assert {tracker.client.get_run(i).info.status for i in (parent.run_id, run.run_id)} == {"KILLED"}
    with pytest.raises(RunInterrupted) as caught, tracker.start_run("evaluate") as evaluated:
        raise KeyboardInterrupt
    assert str(caught.value) == f"interrupted: run {evaluated.run_id} ended KILLED"


def _schema(path: Path) -> list[tuple[str, list[str]]]:
    """Every table and index with its definition's clauses as a sorted list: MLflow's own migrations recreate
    some tables with their constraints in an order that varies from one creation to the next."""
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL").fetchall()
    return sorted((name, sorted(line.strip().rstrip(",") for line in sql.splitlines())) for name, sql in rows)


def test_a_store_seeded_from_the_template_is_the_store_mlflow_makes(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh store is a copy of the schema template (no migrations run), and holds exactly what MLflow's own
    creation gives: the same tables, indexes and revision, and experiment 0 made by MLflow for this store."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv(tracking.CACHE_DIR_ENV, str(workdir / "cache"))
    mlflow_made = workdir / "theirs" / "mlflow.db"
    mlflow_made.parent.mkdir()
    MlflowClient(f"sqlite:///{mlflow_made}").search_experiments()

    seeded = workdir / "ours" / "mlflow.db"
    seeded.parent.mkdir()
    Tracker(f"sqlite:///{seeded}").client.search_experiments()
    template = workdir / "cache" / f"mlflow-{tracking.mlflow.__version__}-schema.db"
    assert template.is_file() and _schema(template) == _schema(mlflow_made) == _schema(seeded)
    with sqlite3.connect(template) as db:
        assert db.execute("SELECT COUNT(*) FROM experiments").fetchone() == (0,)
    rows = "SELECT version_num, name, artifact_location FROM alembic_version, experiments"
    with sqlite3.connect(mlflow_made) as theirs, sqlite3.connect(seeded) as ours:
        assert ours.execute(rows).fetchall() == theirs.execute(rows).fetchall()
        assert ours.execute(rows).fetchall()[0][1:] == ("Default", str(workdir / "mlruns" / "0"))
    assert sorted(p.name for p in seeded.parent.iterdir()) == ["mlflow.db", "mlflow.db.lock"]


def test_a_cache_that_cannot_be_written_leaves_the_store_to_mlflow(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (workdir / "cache").write_text("a file where the cache folder would go")
    monkeypatch.setenv(tracking.CACHE_DIR_ENV, str(workdir / "cache"))
    tracker = Tracker()
    with tracker.start_run("run") as run:
        run.log_metrics({"x": 1.0})
    assert (workdir / "mlflow.db").is_file()
    assert sorted(p.name for p in workdir.iterdir()) == ["cache", "mlflow.db", "mlflow.db.lock"]
