"""The training library without the CLI or MLflow: resume equivalence, callbacks, checks before work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gssf_cli import checkpoint as ckpt
from gssf_cli import metrics
from gssf_cli.config import PrepareConfig
from gssf_cli.data import writer
from gssf_cli.data.dataset import Dataset
from gssf_cli.data.manifest import write_manifest
from gssf_cli.errors import UserInputError
from gssf_cli.training import Trainer, cannot_choose_best, fit
from tests.conftest import tiny_train_config
from tests.factories import write_split_features


class Interrupted(Exception):
    pass


def test_resumed_fit_ends_where_an_uninterrupted_one_does(tiny_syn: Path, tmp_path: Path) -> None:
    config = tiny_train_config(tiny_syn)
    whole = fit(config, Dataset(tiny_syn), tmp_path / "whole")

    def stop_after_first(epoch: int, metrics: dict[str, float], folder: Path) -> None:
        if epoch == 0:
            raise Interrupted

    with pytest.raises(Interrupted):
        fit(config, Dataset(tiny_syn), tmp_path / "cut", on_epoch_end=stop_after_first)
    assert ckpt.saved_state(tmp_path / "cut" / ckpt.LAST)["epoch"] == 0
    resumed = fit(config, Dataset(tiny_syn), tmp_path / "cut", resume_from=tmp_path / "cut" / ckpt.LAST)
    assert resumed.epochs_run == 2 and resumed.best_epoch == whole.best_epoch
    drop = {"samples_per_s"}
    assert {k: v for k, v in resumed.metrics.items() if k not in drop} == pytest.approx(
        {k: v for k, v in whole.metrics.items() if k not in drop}
    )
    a = ckpt.load(tmp_path / "whole" / ckpt.LAST).model
    b = ckpt.load(tmp_path / "cut" / ckpt.LAST).model
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_every_epoch_reports_metrics_and_a_checkpoint(tiny_syn: Path, tmp_path: Path) -> None:
    seen: list[tuple[int, set[str], bool]] = []
    fit(
        tiny_train_config(tiny_syn, epochs=2),
        Dataset(tiny_syn),
        tmp_path,
        on_epoch_end=lambda epoch, metrics, folder: seen.append((epoch, set(metrics), (folder / ckpt.STATE).is_file())),
    )
    assert [epoch for epoch, _, _ in seen] == [0, 1]
    assert all({"loss", "val_rsum", "best_rsum", "lr"} <= keys and on_disk for _, keys, on_disk in seen)


def test_bad_input_fails_before_any_work(tiny_syn: Path, tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match=r"none\.npz not found"):
        Trainer(tiny_train_config(tiny_syn, distill_weight=1.0, teacher=tmp_path / "none.npz"), Dataset(tiny_syn))
    config = tiny_train_config(tiny_syn, epochs=1)
    fit(config, Dataset(tiny_syn), tmp_path / "run")
    with pytest.raises(UserInputError, match="cannot resume run run with a different config: lr"):
        Trainer(
            tiny_train_config(tiny_syn, epochs=1, lr=0.1), Dataset(tiny_syn), resume_from=tmp_path / "run" / ckpt.LAST
        )


def _older_dataset(folder: Path, labels: dict[str, list[int]]) -> Path:
    """A features dataset written as before the split rule existed (the writer and manifest, no check)."""
    source = write_split_features(folder.parent / f"{folder.name}.npz", labels=labels)
    config = PrepareConfig(dataset="features", out=folder, source=source)
    folder.mkdir()
    fields = writer("features")(config, folder)
    write_manifest(folder, {"name": folder.name, "kind": "features", **fields, "settings": {}})
    return folder


def test_a_validation_split_that_cannot_rank_is_refused_before_training(tmp_path: Path) -> None:
    folder = _older_dataset(
        tmp_path / "old",
        {"train": [0, 0, 1, 1, 2, 2, 0, 1], "dev": [5, 5, 5, 5], "test": [6, 6, 7, 7]},
    )
    config = tiny_train_config(folder, epochs=1)
    with pytest.raises(UserInputError, match=r"the dev split has 1 class \(label-based.*--val-split") as caught:
        Trainer(config, Dataset(folder))
    assert "\n" not in str(caught.value)
    trainer = Trainer(tiny_train_config(folder, epochs=1, val_split="test"), Dataset(folder))
    assert trainer.dataset.has_split("test")


def test_the_constant_at_best_possible_rule() -> None:
    assert cannot_choose_best([1.0, 1.0], 1.0) and cannot_choose_best([1.0, 1.0, 1.0], 1.0)
    assert not cannot_choose_best([1.0], 1.0), "one epoch is no history"
    assert not cannot_choose_best([0.5, 0.5, 0.5], 1.0), "constant but imperfect values may tie by chance"
    assert not cannot_choose_best([0.9, 1.0, 1.0], 1.0), "the first epoch was not perfect: later ones are better"
    assert not cannot_choose_best([1.0, 1.0], None), "no ceiling (the loss)"
    recalls = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "i2t_map"]
    assert cannot_choose_best([600.0, 600.0], metrics.best_possible("rsum", recalls))
    assert not cannot_choose_best([400.0, 400.0], metrics.best_possible("rsum", recalls))
    assert cannot_choose_best([400.0, 400.0], metrics.best_possible("rsum", ["i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"]))


def _constant_validation(value: float) -> dict[str, float]:
    recalls = {f"{d}_r{k}": value / 6 for d in ("i2t", "t2i") for k in (1, 5, 10)}
    return {**recalls, "rsum": value}


def test_fit_stops_when_validation_sits_at_its_best_possible_value(
    tiny_syn: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Trainer, "_validate", lambda self: _constant_validation(600.0))
    config = tiny_train_config(tiny_syn, epochs=3)

    def stop_after_first(epoch: int, metrics: dict[str, float], folder: Path) -> None:
        if epoch == 0:
            raise Interrupted

    with pytest.raises(Interrupted):
        fit(config, Dataset(tiny_syn), tmp_path / "run", on_epoch_end=stop_after_first)
    assert ckpt.saved_state(tmp_path / "run" / ckpt.LAST)["val_history"] == [600.0]
    with pytest.raises(UserInputError, match=r"rsum was 600, its best possible value, at all 2 epochs") as caught:
        fit(config, Dataset(tiny_syn), tmp_path / "run", resume_from=tmp_path / "run" / ckpt.LAST)
    assert "cannot choose a best epoch" in str(caught.value) and "\n" not in str(caught.value)

    monkeypatch.setattr(Trainer, "_validate", lambda self: _constant_validation(300.0))
    result = fit(config, Dataset(tiny_syn), tmp_path / "tied")
    assert result.best_epoch == 0 and result.epochs_run == 3
    assert ckpt.saved_state(tmp_path / "tied" / ckpt.LAST)["val_history"] == [300.0] * 3
