"""A pipeline cache edited by hand or damaged never passes another model off as the cached one, and is never
followed outside the project: the step runs again and says why, or the command is refused in one line."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import Result

from tests.unit.stages.test_cache import CHAIN

Gssf = Callable[..., Result]


def _run(gssf: Gssf) -> tuple[dict[str, dict[str, Any]], str]:
    result = gssf("run", "chain.toml", "--json")
    assert result.exit_code == 0, result.stderr
    return {s["stage"]: s for s in json.loads(result.stdout)["stages"]}, result.stderr


def _export_source(bundle: Path) -> str:
    return str(json.loads((bundle / "manifest.json").read_text())["source_run_id"])


def test_an_edited_run_id_never_stands_in_for_the_cached_run(gssf: Gssf, workdir: Path) -> None:
    """With ``train.run_id`` set to null or to another run's id and a newer cosine run in the store, the train
    step runs again (it used to show "cached", evaluate the cosine run and deploy its bundle, with exit 0);
    the deployed bundle is the one the pipeline's own config trained."""
    from tests.factories import write_feature_npz

    write_feature_npz(workdir / "src.npz", paired=True, n=40, k=2)
    (workdir / "chain.toml").write_text(CHAIN)
    first, _ = _run(gssf)
    cosine = gssf("train", "--data", "data/chain", "--metric", "cosine", "--embed-dim", "8", "--epochs", "1", "--json")
    assert cosine.exit_code == 0, cosine.stderr
    other = json.loads(cosine.stdout)["run_id"]
    path = workdir / ".gssf/pipelines/chain.json"
    for edited, why in ((None, "its cache entry names no run"),
                        (other, f"its run {other} was not made by this step with these settings")):  # fmt: skip
        cache = json.loads(path.read_text())
        cache["train"]["run_id"] = edited
        path.write_text(json.dumps(cache))
        stages, said = _run(gssf)
        assert stages["train"]["status"] == "ran" and stages["train"]["why"] == why, stages["train"]
        assert f"train: runs again: {why}" in said
        assert stages["train"]["run_id"] not in (other, first["train"]["run_id"])
        bundle = Path(stages["export"]["summary"]["path"])
        assert _export_source(bundle) == stages["train"]["run_id"]
        assert json.loads((bundle / "manifest.json").read_text())["metric"]["name"] == "diag"


def test_a_damaged_cache_is_named_treated_as_absent_and_never_followed_outside(gssf: Gssf, workdir: Path) -> None:
    from tests.factories import write_feature_npz

    write_feature_npz(workdir / "src.npz", paired=True, n=40, k=2)
    (workdir / "chain.toml").write_text(CHAIN)
    _run(gssf)
    path = workdir / ".gssf/pipelines/chain.json"
    good = json.loads(path.read_text())
    path.write_bytes(b"\xff\xfe not utf-8")
    stages, _ = _run(gssf)
    assert all(s["status"] == "ran" for s in stages.values())
    assert "chain.json is not readable JSON" in stages["prepare"]["why"]

    good = json.loads(path.read_text())
    good["export"]["roots"] = "/proc/1/cwd"
    good["evaluate"]["outputs"] = {"/proc/1/cwd/etc/hostname": "00"}
    path.write_text(json.dumps(good))
    stages, _ = _run(gssf)
    assert {name: s["status"] for name, s in stages.items()} == {
        "prepare": "cached", "train": "cached", "evaluate": "ran", "export": "ran"
    }  # fmt: skip
    assert "outside the folders the pipeline writes to" in stages["evaluate"]["why"]
    assert "its 'roots' is a str" in stages["export"]["why"]

    path.unlink()
    path.mkdir()
    refused = gssf("run", "chain.toml")
    assert refused.exit_code == 2 and refused.stderr.strip().splitlines() == [
        "gssf: error: .gssf/pipelines/chain.json is not a file: the pipeline cache cannot be written there; remove it"
    ]


def test_a_second_run_of_a_pipeline_in_its_folder_is_refused_while_the_first_holds_it(
    gssf: Gssf, workdir: Path
) -> None:
    """Two ``gssf run`` of one pipeline in one folder used to both succeed, the second recording a bundle the
    first wrote. While one runs (its lock held, here by this process), another is refused in one line and
    opens no run; a dry run, which writes nothing, still answers."""
    from gssf_cli.stages.cache import pipeline_lock
    from gssf_cli.tracking.adapter import Tracker

    (workdir / "chain.toml").write_text(CHAIN)
    with pipeline_lock("chain"):
        refused = gssf("run", "chain.toml")
        assert refused.exit_code == 2
        assert refused.stderr.strip().splitlines() == [
            "gssf: error: pipeline chain is already running in this folder (another process holds "
            ".gssf/pipelines/chain.lock): wait for it to end, then run it again"
        ]
        assert gssf("run", "chain.toml", "--dry-run").exit_code == 0
    assert not Tracker().store_exists()


def test_a_pipeline_killed_in_training_resumes_that_run_from_its_checkpoint(
    gssf: Gssf, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``gssf run`` killed in its train step's second epoch used to train again from scratch; run again, it
    resumes the killed run (the same run id) from its first epoch's checkpoint and finishes it."""
    from gssf_cli.tracking.adapter import Tracker
    from gssf_cli.training.loop import Trainer
    from tests.factories import write_feature_npz

    write_feature_npz(workdir / "src.npz", paired=True, n=40, k=2)
    (workdir / "chain.toml").write_text(CHAIN.replace("epochs = 1", "epochs = 3"))
    real = Trainer._train_epoch
    epochs: list[int] = []

    def train_epoch(self: Trainer, epoch: int) -> dict[str, float]:
        epochs.append(epoch)
        if epochs == [1, 2]:
            raise KeyboardInterrupt
        return real(self, epoch)

    monkeypatch.setattr(Trainer, "_train_epoch", train_epoch)
    assert gssf("run", "chain.toml").exit_code != 0
    client = Tracker().client
    [killed] = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.`gssf.stage` = 'train'")
    assert killed.info.status == "KILLED"
    result = gssf("run", "chain.toml", "--json")
    assert result.exit_code == 0, result.stderr
    stages = {s["stage"]: s for s in json.loads(result.stdout)["stages"]}
    assert stages["train"]["run_id"] == killed.info.run_id and stages["train"]["status"] == "ran"
    assert f"train: resumes its interrupted run {killed.info.run_id} from its checkpoint" in result.stderr
    assert epochs == [1, 2, 2, 3], "epoch 1 was not trained again"
    assert client.get_run(killed.info.run_id).info.status == "FINISHED"
