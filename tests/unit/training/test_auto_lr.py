"""``--lr`` left unset: the rule (:func:`gssf_cli.core.limits.auto_lr`) and how a run resolves it once — from its
budget's optimizer steps, an explicit rate winning, recorded in the checkpoint, kept on resume."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gssf_cli.core import limits
from gssf_cli.core.config import from_dict, to_dict
from gssf_cli.core.limits import AUTO_LR, AUTO_LR_PAPER_STEPS, AUTO_LR_SMALL, AUTO_LR_SMALL_STEPS, auto_lr
from gssf_cli.core.stage_configs import TrainConfig
from gssf_cli.data.dataset import Dataset
from gssf_cli.modeling import checkpoint as ckpt
from gssf_cli.training.loop import Trainer, budget_steps, fit, lr_at, resolve_lr
from tests.conftest import tiny_train_config

F30K_STEPS = 25 * 1_133
"""F30K precomp's recipe: 25 epochs of 29,000 images × 5 captions in batches of 128."""


def _unset(data: Path, **overrides: Any) -> TrainConfig:
    """The tiny train config with ``--lr`` left unset."""
    config = tiny_train_config(data, **overrides)
    assert isinstance(config, TrainConfig)
    return TrainConfig(**{**{k: getattr(config, k) for k in to_dict(config)}, "lr": None})


@given(a=st.integers(1, 10**7), b=st.integers(1, 10**7))
def test_the_rate_never_rises_with_the_budget_and_stays_within_its_bounds(a: int, b: int) -> None:
    low, high = sorted((a, b))
    assert AUTO_LR <= auto_lr(high) <= auto_lr(low) <= AUTO_LR_SMALL


def test_the_rule_at_its_anchors_and_between() -> None:
    assert auto_lr(1) == auto_lr(AUTO_LR_SMALL_STEPS) == AUTO_LR_SMALL == 2e-3
    assert auto_lr(AUTO_LR_PAPER_STEPS) == auto_lr(10**8) == AUTO_LR == 5e-4
    assert auto_lr(AUTO_LR_SMALL_STEPS + 1) == pytest.approx(AUTO_LR_SMALL, rel=1e-3), "continuous at the anchor"
    assert auto_lr(AUTO_LR_PAPER_STEPS - 1) == pytest.approx(AUTO_LR, rel=1e-3), "continuous at the anchor"
    middle = round((AUTO_LR_SMALL_STEPS * AUTO_LR_PAPER_STEPS) ** 0.5)  # log-linear: the geometric means meet
    assert auto_lr(middle) == pytest.approx((AUTO_LR_SMALL * AUTO_LR) ** 0.5, rel=1e-3)
    steps = [500, 600, 1_000, 3_000, 10_000, 20_000]
    assert [round(auto_lr(s), 6) for s in steps] == [0.002, 0.001868, 0.001541, 0.00102, 0.000649, 0.0005]
    assert all(a > b for a, b in itertools.pairwise(auto_lr(s) for s in steps))


def test_the_paper_scale_keeps_the_paper_rate_and_what_the_rule_does_not_scale_keeps_it_too() -> None:
    assert limits.optimizer_steps(25, 145_000, 128) == F30K_STEPS == 28_325
    assert auto_lr(F30K_STEPS) == 5e-4
    assert auto_lr(25 * limits.optimizer_steps(1, 566_435, 128)) == 5e-4, "COCO's 113,287 images × 5"
    assert auto_lr(200, paired=False) == auto_lr(200, head_only=True) == 5e-4
    with pytest.raises(ValueError, match="at least one"):
        auto_lr(0)


def test_the_budget_counts_batches_of_train_pairs(tiny_syn: Path) -> None:
    manifest = Dataset(tiny_syn).manifest
    pairs = manifest["splits"]["train"]["captions"]  # 64 images × 5 captions
    assert budget_steps(_unset(tiny_syn, epochs=3, batch_size=16), manifest) == 3 * -(-pairs // 16) == 60
    labels = {"task": "labels", "splits": {"train": {"items": 1_000}}}
    assert budget_steps(_unset(tiny_syn, epochs=2, batch_size=64), labels) == 2 * 16


def test_an_explicit_rate_wins_and_an_unset_one_follows_the_rule(tiny_syn: Path) -> None:
    manifest = Dataset(tiny_syn).manifest
    assert resolve_lr(tiny_train_config(tiny_syn, lr=7e-5), manifest).lr == 7e-5  # type: ignore[arg-type]
    unset = _unset(tiny_syn)
    assert unset.lr is None
    assert resolve_lr(unset, manifest).lr == auto_lr(60) == 2e-3
    long_budget = _unset(tiny_syn, epochs=AUTO_LR_PAPER_STEPS // 20)
    assert resolve_lr(long_budget, manifest).lr == 5e-4
    head_only = _unset(tiny_syn, encoder="identity", metric="diag")
    assert resolve_lr(head_only, manifest).lr == 5e-4


def test_a_config_reads_with_and_without_a_rate() -> None:
    unset = from_dict(TrainConfig, {"data": "d"}, "train")
    assert unset.lr is None and "lr" not in to_dict(unset)
    given_ = from_dict(TrainConfig, {"data": "d", "lr": 0.001}, "train")
    assert given_.lr == 0.001 and from_dict(TrainConfig, to_dict(given_), "train") == given_
    assert from_dict(TrainConfig, to_dict(unset), "train") == unset


def test_the_run_records_the_rate_it_resolved(tiny_syn: Path, tmp_path: Path) -> None:
    lrs: dict[int, float] = {}
    trainer = Trainer(_unset(tiny_syn, epochs=2), Dataset(tiny_syn))
    assert trainer.lr_auto and trainer.config.lr == 2e-3
    trainer.fit(tmp_path, on_epoch_end=lambda epoch, metrics, folder: lrs.update({epoch: metrics["lr"]}))
    assert lrs[1] == 2e-3, "the cosine schedule starts at the resolved rate"
    assert ckpt.saved_state(tmp_path / ckpt.LAST)["config"]["lr"] == 2e-3
    assert json.loads((tmp_path / ckpt.RUN_CONFIG).read_text())["config"]["lr"] == 2e-3
    assert not Trainer(tiny_train_config(tiny_syn), Dataset(tiny_syn)).lr_auto  # type: ignore[arg-type]


class Interrupted(Exception):
    pass


def test_a_resumed_run_keeps_its_rate_even_when_the_rule_changes(
    tiny_syn: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _unset(tiny_syn, epochs=3)

    def stop_after_first(epoch: int, metrics: dict[str, float], folder: Path) -> None:
        raise Interrupted

    with pytest.raises(Interrupted):
        fit(config, Dataset(tiny_syn), tmp_path, on_epoch_end=stop_after_first)
    monkeypatch.setattr(limits, "auto_lr", lambda steps, **kinds: 1e-4)
    resumed = Trainer(config, Dataset(tiny_syn), resume_from=tmp_path / ckpt.LAST)
    assert resumed.config.lr == 2e-3 and resumed.epochs_done == 1
    assert lr_at(resumed.config, 2) == pytest.approx(2e-3 * 0.75), "cosine over 3 epochs, a third of the way"
    assert Trainer(config, Dataset(tiny_syn)).config.lr == 1e-4, "a new run follows the rule of the day"


def test_a_run_killed_before_its_first_checkpoint_resumes_with_its_rate_unset(tiny_syn: Path, tmp_path: Path) -> None:
    """The train stage writes the run's config as given (``lr`` unset) before the trainer resolves it."""
    config = _unset(tiny_syn, epochs=2)
    dataset = Dataset(tiny_syn)
    ckpt.write_run_config(tmp_path, to_dict(config), dataset.digest)
    resumed = Trainer(config, dataset, resume_from=tmp_path / ckpt.LAST)
    assert resumed.config.lr == 2e-3 and resumed.epochs_done == 0
    assert resumed.fit(tmp_path).epochs_run == 2
