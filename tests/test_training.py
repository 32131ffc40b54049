"""The training library without the CLI or MLflow: resume equivalence, callbacks, checks before work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gssf_cli import checkpoint as ckpt
from gssf_cli.data.dataset import Dataset
from gssf_cli.errors import UserInputError
from gssf_cli.training import Trainer, fit
from tests.conftest import tiny_train_config


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
