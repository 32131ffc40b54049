"""Kills at the edges of a train run: between the run's creation and its ``config.json`` (still resumable), and
during its final logging (the final metrics logged once)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import Result

from gssf_cli.tracking.adapter import Tracker
from tests.conftest import tiny_synthetic_args

Gssf = Callable[..., Result]
TRAIN = ["train", "--data", "data/syn", "--epochs", "2", "--embed-dim", "8", "--block-size", "4", "--word-dim", "8"]


def test_a_run_killed_before_its_config_file_resumes_from_epoch_one(
    gssf: Gssf, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gssf_cli.modeling import checkpoint as ckpt

    assert gssf(*tiny_synthetic_args("data/syn")).exit_code == 0
    real = ckpt.write_run_config

    def killed(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # the moment after MLflow created the run, before the file exists

    monkeypatch.setattr(ckpt, "write_run_config", killed)
    assert gssf(*TRAIN).exit_code != 0
    monkeypatch.setattr(ckpt, "write_run_config", real)
    client = Tracker().client
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.`gssf.stage` = 'train'")
    assert not (workdir / "runs" / run.info.run_id / "config.json").exists()
    resumed = gssf("train", "--resume", run.info.run_id, "--json")
    assert resumed.exit_code == 0, resumed.stderr
    out = json.loads(resumed.stdout)
    assert out["run_id"] == run.info.run_id and out["epochs_run"] == 2
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


@pytest.mark.parametrize("kill_in", ["figure", "served model"])
def test_a_kill_during_final_logging_logs_each_final_metric_and_model_once(
    gssf: Gssf, workdir: Path, monkeypatch: pytest.MonkeyPatch, kill_in: str
) -> None:
    """Killed while logging the heatmap (after the final metrics) or the served model, a resumed run logs what is
    missing: every ``final_*`` metric has one value and the run one logged model."""
    from gssf_cli.stages import train as train_stage
    from gssf_cli.tracking.adapter import StageRun

    assert gssf(*tiny_synthetic_args("data/syn")).exit_code == 0
    target, name = (StageRun, "log_figure") if kill_in == "figure" else (train_stage, "log_served_model")
    real = getattr(target, name)

    def killed(*args: object, **kwargs: object) -> None:
        if kill_in == "served model":
            real(*args, **kwargs)  # the model is logged, then the kill: before its id reaches the result
        raise KeyboardInterrupt

    monkeypatch.setattr(target, name, killed)
    assert gssf(*TRAIN, "--metric", "gssf").exit_code != 0
    monkeypatch.setattr(target, name, real)
    client = Tracker().client
    experiments = [e.experiment_id for e in client.search_experiments()]
    [run] = client.search_runs(experiments, "tags.`gssf.stage` = 'train'")
    resumed = gssf("train", "--resume", run.info.run_id, "--json")
    assert resumed.exit_code == 0, resumed.stderr
    finals = [k for k in client.get_run(run.info.run_id).data.metrics if k.startswith("final_")]
    assert finals and all(len(client.get_metric_history(run.info.run_id, k)) == 1 for k in finals)
    models = client.search_logged_models(experiments, filter_string=f"source_run_id = '{run.info.run_id}'")
    assert [str(m.status) for m in models] == ["READY"]
