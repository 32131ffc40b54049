"""``gssf run PIPELINE.toml``: one parent run, cached re-runs, and clear failures."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import Result

from gssf_cli.tracking.adapter import Tracker

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


TINY = """\
[pipeline]
name = "tiny"

[prepare]
dataset = "synthetic"
out = "data/tiny"
train_images = 40
dev_images = 10
test_images = 10
regions = 4
region_dim = 8
concepts = 6
vocab_size = 30

[train]
metric = "gssf"
block_size = 4
embed_dim = 16
word_dim = 8
batch_size = 16
epochs = 1

[evaluate]
protocol = "all"

[export]
out = "exports/tiny"
register = "tiny"
"""


def test_the_pipeline_run_carries_its_file_and_dataset_and_names_its_evaluation(gssf: Gssf, workdir: Path) -> None:
    """What the MLflow UI shows of a pipeline run: its file's settings as params, the dataset as its input, an
    ``evaluate-final-…`` run (the model the pipeline ends with), and the registered bundle as ``@champion``."""
    (workdir / "p.toml").write_text(TINY)
    result = gssf("run", "p.toml", "--json")
    assert result.exit_code == 0, result.stderr
    tracker = Tracker(experiment="tiny")
    parent = tracker.get_run("latest", stage="run")
    assert parent.data.params["prepare.dataset"] == "synthetic" and parent.data.params["train.metric"] == "gssf"
    assert parent.data.params["pipeline.name"] == "tiny" and parent.data.params["export.register"] == "tiny"
    [dataset] = parent.inputs.dataset_inputs
    assert (
        dataset.dataset.name == "tiny"
        and dataset.dataset.digest == parent.data.tags["gssf.dataset.manifest_sha256"][:36]
    )
    assert {t.key: t.value for t in dataset.tags}["mlflow.data.context"] == "pipeline"
    names = {r.data.tags["gssf.stage"]: r.info.run_name for r in tracker.child_runs(parent.info.run_id)}
    assert names["evaluate"] == f"evaluate-final-gssf-d4-test-{names['evaluate'][-6:]}", names
    assert int(tracker.client.get_model_version_by_alias("tiny", "champion").version) == 1


def test_an_interaction_pipeline_exports_and_indexes_and_caches_each_step(gssf: Gssf, workdir: Path) -> None:
    """``[train] interaction`` with ``[export]`` and ``[index]``: the chain exports an interaction bundle and
    indexes the test images as a token index (its ``--eval`` recall in the summary); a second run is all cached;
    a changed ``[index]`` setting re-runs the index step alone, and says why."""
    import json

    text = TINY.replace("[train]\n", '[train]\ninteraction = "maxsim"\n') + "\n[index]\neval = true\n"
    (workdir / "p.toml").write_text(text)
    first = gssf("run", "p.toml", "--json")
    assert first.exit_code == 0, first.stderr
    stages = {s["stage"]: s for s in json.loads(first.stdout)["stages"]}
    assert [s["status"] for s in stages.values()] == ["ran"] * 5
    assert stages["index"]["summary"]["path"] == "indexes/tiny" and stages["index"]["summary"]["count"] == 10
    assert stages["index"]["summary"]["recall_at_10"] == 1.0  # 10 images: the default per_word reaches them all
    manifest = json.loads((workdir / "indexes/tiny/manifest.json").read_text())
    assert manifest["family"] == "interaction" and manifest["regions_per_image"] == 4
    assert json.loads((workdir / "exports/tiny/manifest.json").read_text())["interaction"] == {"kind": "maxsim"}
    again = gssf("run", "p.toml", "--json")
    assert {s["status"] for s in json.loads(again.stdout)["stages"]} == {"cached"}
    (workdir / "p.toml").write_text(text.replace("eval = true", "eval = true\nper_word = 2"))
    changed = gssf("run", "p.toml", "--json")
    assert changed.exit_code == 0, changed.stderr
    statuses = {s["stage"]: s["status"] for s in json.loads(changed.stdout)["stages"]}
    assert statuses == {
        "prepare": "cached",
        "train": "cached",
        "evaluate": "cached",
        "export": "cached",
        "index": "ran",
    }
    assert "index: runs again" in changed.stderr


def test_each_evaluation_says_which_model_it_measures() -> None:
    from gssf_cli.stages import steps

    assert steps.evaluation_run_base("evaluate_baseline", "evaluate-gssf-d8-test-1a2b3c") == (
        "evaluate-baseline-gssf-d8-test"
    )
    assert steps.evaluation_run_base("evaluate", "evaluate-cosine-d64-test-1a2b3c") == "evaluate-final-cosine-d64-test"


def test_pipeline_params_are_its_file_as_written(tmp_path: Path) -> None:
    """The params are the file as written (``tune.retrain`` included, which the stage configs do not keep); the
    dataset is the prepared folder, or the one ``[train]`` names without a ``[prepare]``."""
    from gssf_cli.stages import steps
    from gssf_cli.stages.pipeline import load_pipeline

    (tmp_path / "p.toml").write_text(
        TINY.replace("[evaluate]", '[tune]\nparams = ["block_size=2,4"]\nretrain = true\n[evaluate]')
    )
    pipeline = load_pipeline(tmp_path / "p.toml")
    written = steps.params(pipeline)
    assert written["pipeline"] == {"name": "tiny"} and written["tune"]["retrain"] is True
    assert written["prepare"]["dataset"] == "synthetic"
    assert steps.dataset_folder(pipeline, steps.Links(steps.prepared(pipeline))) == Path("data/tiny")
    (tmp_path / "q.toml").write_text('[train]\ndata = "data/syn"\nepochs = 1\n')
    assert steps.dataset_folder(load_pipeline(tmp_path / "q.toml"), steps.Links(None)) == Path("data/syn")


def test_shipped_pipelines_parse() -> None:
    from gssf_cli.stages.pipeline import check as _check_configs
    from gssf_cli.stages.pipeline import load_pipeline

    for path in sorted((ROOT / "pipelines").glob("*.toml")):
        pipeline = load_pipeline(path)
        assert pipeline.stages[0] == "prepare", path
        _check_configs(pipeline)
