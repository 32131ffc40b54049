"""``gssf run PIPELINE.toml``: one parent run, cached re-runs, and clear failures."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import Result

from gssf_cli.tracking.adapter import PARENT_TAG, Tracker

Gssf = Callable[..., Result]
ROOT = Path(__file__).resolve().parents[3]


def _one_line(result: Result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("gssf: error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[prepare]\ndataset = "digits"\nout = "d"\n[deploy]\nx = 1\n', "unknown stage [deploy]"),
        ('[prepare]\ndataset = "digits"\nout = "d"\nsplit_seed = 1\n', "prepare.split_seed: unknown key"),
        ('[pipeline]\nowner = "me"\n[prepare]\ndataset = "digits"\nout = "d"\n', "pipeline.owner: unknown key"),
        ('[train]\nmetric = "bdiag"\nblock_size = 5\nembed_dim = 32\ndata = "d"\n', "block size 5 does not divide"),
        ("[prepare\n", "not valid TOML"),
    ],
)
def test_bad_pipeline_files(gssf: Gssf, workdir: Path, text: str, expected: str) -> None:
    (workdir / "p.toml").write_text(text)
    assert expected in _one_line(gssf("run", "p.toml"))
    assert not (workdir / "d").exists()


def test_missing_pipeline_file(gssf: Gssf, workdir: Path) -> None:
    assert "pipeline file nope.toml not found" in _one_line(gssf("run", "nope.toml"))


def test_failing_stage_stops_the_chain_and_fails_the_parent(gssf: Gssf, workdir: Path) -> None:
    (workdir / "p.toml").write_text(
        '[pipeline]\nname = "broken"\n[prepare]\ndataset = "precomp"\nsource = "missing"\nout = "d"\n'
        "[train]\nepochs = 1\n"
    )
    message = _one_line(gssf("run", "p.toml"))
    assert "stage prepare failed: source missing not found" in message
    tracker = Tracker(experiment="broken")
    parent = tracker.get_run("latest", stage="run")
    assert parent.info.status == "FAILED" and parent.data.tags["gssf.failed_stage"] == "prepare"
    assert [r.data.tags["gssf.stage"] for r in tracker.child_runs(parent.info.run_id)] == []


def test_shipped_pipelines_parse() -> None:
    from gssf_cli.stages.pipeline import check as _check_configs
    from gssf_cli.stages.pipeline import load_pipeline

    for path in sorted((ROOT / "pipelines").glob("*.toml")):
        pipeline = load_pipeline(path)
        assert pipeline.stages[0] == "prepare", path
        _check_configs(pipeline)


@pytest.mark.e2e
def test_quickstart_end_to_end_with_cache(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "pipelines", tmp_path / "pipelines")
    exe = shutil.which("gssf") or str(Path(sys.executable).with_name("gssf"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {"MLFLOW_DISABLE_TELEMETRY": "true"}

    def run(*extra: str) -> dict:
        out = subprocess.run(
            [exe, "run", "pipelines/quickstart.toml", "--json", *extra],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout)

    first = run()
    steps = ["prepare", "train", "evaluate_baseline", "tune", "train_best", "evaluate", "export"]
    assert [s["stage"] for s in first["stages"]] == steps
    assert {s["status"] for s in first["stages"]} == {"ran"}
    assert first["stages"][-1]["summary"]["passed"] is True
    final = {k.removeprefix("final_"): v for k, v in first["metrics"].items() if k.startswith("final_")}
    onnx = {k.removeprefix("onnx_"): v for k, v in first["metrics"].items() if k.startswith("onnx_")}
    assert {"rsum", "i2t_r1", "t2i_r10", "i2t_map"} <= set(onnx)
    for name, value in onnx.items():
        assert value == pytest.approx(final[name], abs=1e-6), name
    assert any(k.startswith("baseline_") for k in first["metrics"])
    retrained = first["stages"][4]
    bundle = json.loads((tmp_path / first["stages"][-1]["summary"]["path"] / "manifest.json").read_text())
    assert bundle["source_run_id"] == retrained["run_id"], "the bundle is made from the final model"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("quickstart")
    runs = client.search_runs([experiment.experiment_id])
    by_id = {r.info.run_id: r for r in runs}
    parent = by_id[first["parent_run_id"]]
    assert parent.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get(PARENT_TAG) == parent.info.run_id]
    stages = sorted(r.data.tags["gssf.stage"] for r in children)
    assert stages == ["evaluate", "evaluate", "export", "prepare", "train", "train", "tune"]
    assert parent.data.metrics["final_rsum"] == parent.data.metrics["onnx_rsum"]
    final_train = by_id[retrained["run_id"]]
    trained_epochs = int(final_train.data.params["train.epochs"])
    assert trained_epochs == 4, "the final model is trained with the [train] budget, not the tune's per-trial one"
    tune_run = next(r for r in children if r.data.tags["gssf.stage"] == "tune")
    trials = [r for r in runs if r.data.tags.get(PARENT_TAG) == tune_run.info.run_id]
    assert len(trials) == 3 and {r.info.status for r in trials} == {"FINISHED"}

    again = run()
    assert {s["status"] for s in again["stages"]} == {"cached"}
