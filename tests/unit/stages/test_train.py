"""``gssf train``: learning, determinism, kill-and-resume, MLflow contents, and one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import Result

from gssf_cli.tracking.adapter import Tracker

Gssf = Callable[..., Result]
SMALL = ["--embed-dim", "32", "--word-dim", "16", "--batch-size", "32", "--lr", "0.002"]


@pytest.fixture
def syn(gssf: Gssf, workdir: Path) -> Path:
    result = gssf(
        "prepare", "--dataset", "synthetic", "--out", "data/syn", "--train-images", "300", "--dev-images", "60",
        "--test-images", "60", "--regions", "6", "--region-dim", "16", "--concepts", "12", "--vocab-size", "80",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    return workdir / "data" / "syn"


def _quality(metrics: dict[str, float]) -> dict[str, float]:
    """Everything but the throughput, which depends on the machine's load."""
    return {k: v for k, v in metrics.items() if k != "samples_per_s"}


def _train(gssf: Gssf, *args: str) -> dict:
    result = gssf("train", *args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_short_run_beats_chance_by_far(gssf: Gssf, syn: Path) -> None:
    out = _train(gssf, "--data", str(syn), "--metric", "bdiag", "--block-size", "8", "--epochs", "4", *SMALL)
    # Chance rSum on 60 images x 300 captions (5 per image) is about 52; demand more than twice that.
    assert out["metrics"]["val_rsum"] > 110, out["metrics"]
    assert out["validation_metric"] == "rsum"


def test_training_is_deterministic_on_cpu(gssf: Gssf, syn: Path) -> None:
    args = ["--data", str(syn), "--metric", "gssf", "--block-size", "8", "--epochs", "2", *SMALL]
    first, second = _train(gssf, *args), _train(gssf, *args)
    assert _quality(first["metrics"]) == _quality(second["metrics"])


def test_run_is_fully_tracked(gssf: Gssf, syn: Path) -> None:
    out = _train(gssf, "--data", str(syn), "--metric", "bdiag", "--block-size", "8", "--epochs", "2", *SMALL)
    client = Tracker().client
    run = client.get_run(out["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.metric"] == "bdiag" and run.data.params["train.block_size"] == "8"
    assert int(run.data.params["params_metric_head"]) == 32 * 8
    for name in ("loss", "val_rsum", "lr", "samples_per_s"):
        assert [m.step for m in client.get_metric_history(out["run_id"], name)] == [1, 2], "epochs count from 1"
    assert run.data.metrics["best_epoch"] == out["best_epoch"] in (1, 2)
    artifacts = {a.path for a in client.list_artifacts(out["run_id"])}
    assert {"checkpoint", "config", "plots"} <= artifacts
    assert {a.path for a in client.list_artifacts(out["run_id"], "plots")} == {"plots/metric_heatmap.png"}
    assert run.data.tags["gssf.dataset.manifest_sha256"]
    evaluation = json.loads(gssf("evaluate", "--run", "latest", "--json").stdout)
    assert 0 <= evaluation["rsum"] <= 600 and evaluation["sizes"]["images"] == 60


def test_digits_trains_a_single_tower(gssf: Gssf, workdir: Path) -> None:
    assert gssf("prepare", "--dataset", "digits", "--out", "data/digits").exit_code == 0
    out = _train(
        gssf, "--data", "data/digits", "--metric", "diag", "--epochs", "2", "--embed-dim", "32", "--batch-size", "64"
    )
    assert out["validation_metric"] == "map_at_r" and out["metrics"]["val_map_at_r"] > 0.3
    evaluation = json.loads(gssf("evaluate", "--run", out["run_id"], "--json").stdout)
    assert evaluation["task"] == "labels" and evaluation["precision_at_1"] > 0.5
    assert evaluation["dataset_info"]["classes"] == "unseen", "digits' test classes are not trained on, and it says so"
    shown = gssf("evaluate", "--run", out["run_id"]).stdout
    assert "test split of classes unseen in training" in " ".join(shown.split())


def test_distillation_runs(gssf: Gssf, syn: Path) -> None:
    out = _train(
        gssf,
        "--data",
        str(syn),
        "--metric",
        "gssf",
        "--block-size",
        "8",
        "--epochs",
        "1",
        "--distill-weight",
        "1",
        *SMALL,
    )
    assert out["metrics"]["loss"] > 0


def test_kill_mid_epoch_then_resume_matches_an_uninterrupted_run(gssf: Gssf, syn: Path, workdir: Path) -> None:
    args = ["--data", str(syn), "--metric", "bdiag", "--block-size", "8", "--epochs", "4", *SMALL, "--seed", "5"]
    reference = _train(gssf, *args)

    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "COLUMNS": "120"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gssf_cli", "train", *args, "--json"],
        cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    state_files: list[Path] = []
    while time.monotonic() < deadline and proc.poll() is None:
        state_files = [
            p for p in (workdir / "runs").glob("*/checkpoint/state.json") if p.parent.parent.name != reference["run_id"]
        ]
        if state_files and json.loads(state_files[0].read_text())["epochs_done"] >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = json.loads(state_files[0].read_text())["epochs_done"]
    assert 2 <= done < 4
    run_id = state_files[0].parent.parent.name
    resumed = _train(gssf, "--resume", run_id)
    assert resumed["run_id"] == run_id
    assert resumed["epochs_run"] == 4 - done
    assert _quality(resumed["metrics"]) == _quality(reference["metrics"])
    assert Tracker().client.get_run(run_id).info.status == "FINISHED"


def _snapshot_error(result: Result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("gssf: error: "), lines
    return lines[0]


def test_bad_training_input(gssf: Gssf, syn: Path) -> None:
    base = ["train", "--data", str(syn), *SMALL, "--epochs", "1"]
    assert "dataset folder nowhere not found" in _snapshot_error(gssf("train", "--data", "nowhere"))
    msg = _snapshot_error(gssf(*base, "--metric", "bdiag", "--block-size", "5"))
    assert "block size 5 does not divide the embedding size 32; valid block sizes: 1, 2, 4, 8, 16, 32" in msg
    assert "train.metric: 'cos' is not one of" in _snapshot_error(gssf(*base, "--metric", "cos"))
    if not __import__("torch").cuda.is_available():
        assert "no CUDA device" in _snapshot_error(gssf(*base, "--metric", "cosine", "--device", "cuda"))
    first = _train(gssf, *base[1:], "--metric", "cosine")
    msg = _snapshot_error(gssf("train", "--resume", first["run_id"], "--epochs", "3"))
    assert "cannot resume run" in msg and "epochs was 1, now 3" in msg
    assert "FINISHED: there is nothing to resume" in _snapshot_error(gssf("train", "--resume", first["run_id"]))
    regenerated = gssf("prepare", "--dataset", "synthetic", "--out", str(syn), "--force", "--seed", "9",
                       "--train-images", "40", "--dev-images", "10", "--test-images", "10")  # fmt: skip
    assert regenerated.exit_code == 0
    assert "on a different dataset" in _snapshot_error(gssf("train", "--resume", first["run_id"]))
    caps = syn / "dev_caps.txt"
    caps.write_text(caps.read_text().replace("w", "x", 1))
    assert "checksum mismatch" in _snapshot_error(gssf(*base, "--metric", "cosine"))


def test_seeds_train_one_run_each_under_a_seeds_run_with_mean_and_std(gssf: Gssf, syn: Path) -> None:
    args = ["--data", str(syn), "--metric", "diag", "--epochs", "1", *SMALL]
    out = _train(gssf, *args, "--seeds", "0,1,2")
    assert out["seeds"] == [0, 1, 2] and len(out["runs"]) == 3
    values = [run["metrics"]["val_rsum"] for run in out["runs"]]
    assert len(set(values)) > 1, "different seeds, different runs"
    summary = out["summary"]["val_rsum"]
    assert summary["n"] == 3 and summary["mean"] == pytest.approx(sum(values) / 3)
    client = Tracker().client
    parent = client.get_run(out["run_id"])
    assert parent.data.tags["gssf.stage"] == "seeds" and parent.data.tags["gssf.seeds"] == "0,1,2"
    assert parent.data.metrics["mean_val_rsum"] == pytest.approx(summary["mean"])
    assert parent.data.metrics["n_seeds"] == 3
    for seed, run in zip((0, 1, 2), out["runs"], strict=True):
        child = client.get_run(run["run_id"])
        assert child.data.tags["mlflow.parentRunId"] == out["run_id"]
        assert child.data.params["train.seed"] == str(seed)
    table = gssf("train", *args, "--seeds", "3,4")
    assert table.exit_code == 0 and "mean ± std" in table.stdout and "seed 4" in table.stdout
    other = client.search_runs([parent.info.experiment_id], filter_string="tags.`gssf.seeds` = '3,4'")[0]
    compared = gssf("compare", out["run_id"], other.info.run_id, "--bootstrap", "200", "--json")
    assert compared.exit_code == 0, compared.stderr
    payload = json.loads(compared.stdout)
    groups = [system["runs"] for system in (payload["baseline"], *payload["compared"])]
    assert [len(g) for g in groups] == [3, 2], "a seeds run compares as the group of its train runs"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--seeds", "0,0"], "listed twice"),
        (["--seeds", "0,x"], "comma-separated integers"),
        (["--seeds", "0,1", "--seed", "2"], "not both"),
        (["--seeds", "0,1", "--resume", "latest"], "--resume"),
    ],
)
def test_bad_seeds_leave_no_run(gssf: Gssf, syn: Path, extra: list[str], message: str) -> None:
    result = gssf("train", "--data", str(syn), "--metric", "diag", "--epochs", "1", *SMALL, *extra)
    assert result.exit_code == 2 and message in result.stderr
    assert Tracker().client.search_runs([Tracker().experiment_id], filter_string="tags.`gssf.stage` != 'prepare'") == []


def test_ids_gssf_prints_come_back_and_a_finished_run_is_not_resumed(gssf: Gssf, syn: Path) -> None:
    """A train run is found again by the 12 characters the tables print and by its name; ``--resume`` of a run
    that FINISHED is refused in one line (exit 2) and leaves the run as it was: no reopening, no second model."""
    out = _train(gssf, "--data", str(syn), "--metric", "diag", "--epochs", "1", *SMALL)
    run_id = out["run_id"]
    client = Tracker().client
    run = client.get_run(run_id)
    evaluated = gssf("evaluate", "--run", run_id[:12], "--json")
    assert evaluated.exit_code == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["model_info"]["train_run_id"] == run_id
    models_before = client.search_logged_models([run.info.experiment_id])
    for reference in (run_id, run.info.run_name, "latest"):
        refused = gssf("train", "--resume", reference, "--json")
        assert refused.exit_code == 2, (reference, refused.stderr)
        assert refused.stderr.strip().splitlines() == [
            f"gssf: error: run {run_id} ({run.info.run_name}) FINISHED: there is nothing to resume; "
            "evaluate or export it, or train a new run"
        ], reference
    after = client.get_run(run_id)
    assert (after.info.status, after.info.end_time) == ("FINISHED", run.info.end_time)
    assert len(client.search_logged_models([run.info.experiment_id])) == len(models_before)
