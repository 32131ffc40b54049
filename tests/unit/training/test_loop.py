"""The training library without the CLI or MLflow: resume equivalence, callbacks and progress (epochs counted
from 1), checks before work."""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gssf_cli.core import metrics
from gssf_cli.core.errors import UserInputError
from gssf_cli.core.stage_configs import PrepareConfig, TrainConfig
from gssf_cli.data import writer
from gssf_cli.data.dataset import Dataset
from gssf_cli.data.manifest import write_manifest
from gssf_cli.modeling import checkpoint as ckpt
from gssf_cli.training.loop import (
    VALIDATION_STEPS,
    EpochSummary,
    Trainer,
    cannot_choose_best,
    fit,
    load_optimizer_state,
    lr_at,
    uses_hardest_negatives,
)
from tests.conftest import tiny_train_config
from tests.factories import write_split_features


class Interrupted(Exception):
    pass


def test_resumed_fit_ends_where_an_uninterrupted_one_does(tiny_syn: Path, tmp_path: Path) -> None:
    config = tiny_train_config(tiny_syn)
    whole = fit(config, Dataset(tiny_syn), tmp_path / "whole")

    def stop_after_first(epoch: int, metrics: dict[str, float], folder: Path) -> None:
        if epoch == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        fit(config, Dataset(tiny_syn), tmp_path / "cut", on_epoch_end=stop_after_first)
    assert ckpt.saved_state(tmp_path / "cut" / ckpt.LAST)["epochs_done"] == 1
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
    assert [epoch for epoch, _, _ in seen] == [1, 2], "epochs count from 1"
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
        if epoch == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        fit(config, Dataset(tiny_syn), tmp_path / "run", on_epoch_end=stop_after_first)
    assert ckpt.saved_state(tmp_path / "run" / ckpt.LAST)["val_history"] == [600.0]
    with pytest.raises(UserInputError, match=r"rsum was 600, its best possible value, at all 2 epochs") as caught:
        fit(config, Dataset(tiny_syn), tmp_path / "run", resume_from=tmp_path / "run" / ckpt.LAST)
    assert "cannot choose a best epoch" in str(caught.value) and "\n" not in str(caught.value)

    monkeypatch.setattr(Trainer, "_validate", lambda self: _constant_validation(300.0))
    result = fit(config, Dataset(tiny_syn), tmp_path / "tied")
    assert result.best_epoch == 1 and result.epochs_run == 3
    assert ckpt.saved_state(tmp_path / "tied" / ckpt.LAST)["val_history"] == [300.0] * 3


class RecordingProgress:
    """A :class:`gssf_cli.training.loop.Progress` that writes down what the trainer tells it, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []
        self.summaries: list[EpochSummary] = []

    @contextlib.contextmanager
    def epoch(self, label: str, batches: int) -> Iterator[Callable[[float, float], None]]:
        self.events.append(("epoch", label))
        yield lambda loss, rate: None

    @contextlib.contextmanager
    def validation(self, label: str, steps: int) -> Iterator[Callable[[str], None]]:
        started: list[str] = []
        yield started.append
        self.events.append(("validation", (label, steps, started)))

    def epoch_done(self, summary: EpochSummary) -> None:
        self.events.append(("done", summary.epoch))
        self.summaries.append(summary)


def test_progress_hears_of_training_validation_and_each_finished_epoch(tiny_syn: Path, tmp_path: Path) -> None:
    progress = RecordingProgress()
    callbacks: list[int] = []
    result = fit(
        tiny_train_config(tiny_syn, epochs=3),
        Dataset(tiny_syn),
        tmp_path,
        progress=progress,
        on_epoch_end=lambda epoch, metrics, folder: callbacks.append(epoch),
    )
    assert [kind for kind, _ in progress.events] == ["epoch", "validation", "done"] * 3
    assert [what for kind, what in progress.events if kind == "epoch"] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    label, steps, started = next(what for kind, what in progress.events if kind == "validation")  # type: ignore[misc]
    assert label == "validate on dev" and len(started) == steps == VALIDATION_STEPS
    assert started == ["encode 16 images, 80 texts", "score"]
    assert [s.epoch for s in progress.summaries] == callbacks == [1, 2, 3]
    assert all(s.epochs == 3 and s.validation_metric == "rsum" and s.seconds > 0 for s in progress.summaries)
    assert all({"loss", "lr", "val_rsum", "best_rsum"} <= set(s.metrics) for s in progress.summaries)
    assert progress.summaries[0].improved, "the first epoch is always the best so far"
    improved = [s.epoch for s in progress.summaries if s.improved]
    assert improved[-1] == result.best_epoch
    best = max(progress.summaries, key=lambda s: (s.metrics["val_rsum"], -s.epoch))
    assert best.epoch == result.best_epoch == ckpt.saved_state(tmp_path / ckpt.BEST)["best_epoch"]


def test_schedule_settings_count_epochs_from_one(tiny_syn: Path, tmp_path: Path) -> None:
    """``lr_decay_epoch`` N: epochs 1..N at ``lr``, decayed from N+1; ``warmup_epochs`` W: epochs 1..W sum over
    all negatives."""
    config = tiny_train_config(
        tiny_syn, epochs=3, lr=0.004, lr_schedule="step", lr_decay_epoch=2, lr_decay=0.5, warmup_epochs=1
    )
    lrs: dict[int, float] = {}
    fit(
        config,
        Dataset(tiny_syn),
        tmp_path,
        on_epoch_end=lambda epoch, metrics, folder: lrs.update({epoch: metrics["lr"]}),
    )
    assert lrs == {1: 0.004, 2: 0.004, 3: 0.002}
    assert [lr_at(config, e) for e in (1, 2, 3)] == [0.004, 0.004, 0.002]
    assert [uses_hardest_negatives(config, e) for e in (1, 2, 3)] == [False, True, True]
    assert lr_at(tiny_train_config(tiny_syn, lr_schedule="step", lr_decay_epoch=0, lr_decay=0.5), 1) == pytest.approx(
        0.0015
    )


@given(epochs=st.integers(1, 500), lr=st.floats(1e-6, 1.0))
def test_the_cosine_schedule_spans_the_budget_whatever_its_length(epochs: int, lr: float) -> None:
    """From ``lr`` at the first step down to 0 at the end of the last epoch, never rising, and halfway at half the
    budget: a longer run decays later (a fixed decay epoch left 45 of 60 epochs at a tenth of the rate)."""
    config = TrainConfig(data=Path("d"), epochs=epochs, lr=lr)
    assert config.lr_schedule == "cosine"
    steps = [lr_at(config, e, done) for e in range(1, epochs + 1) for done in (0.0, 0.5)]
    assert steps[0] == lr and all(b <= a for a, b in itertools.pairwise(steps))
    assert lr_at(config, epochs, 1.0) == pytest.approx(0.0, abs=1e-12 * lr)
    middle = epochs / 2
    assert lr_at(config, int(middle) + 1, middle - int(middle)) == pytest.approx(lr / 2)


def test_the_step_schedule_decays_at_half_the_budget_unless_told(tiny_syn: Path) -> None:
    config = tiny_train_config(tiny_syn, epochs=60, lr=1e-3, lr_schedule="step")
    assert [lr_at(config, e) for e in (30, 31)] == [1e-3, pytest.approx(1e-4)]
    assert lr_at(tiny_train_config(tiny_syn, lr_schedule="constant"), 3, 0.9) == 0.003


def test_a_decay_epoch_without_the_step_schedule_is_refused(tiny_syn: Path) -> None:
    with pytest.raises(UserInputError, match="--lr-schedule step"):
        tiny_train_config(tiny_syn, lr_decay_epoch=3)


def test_a_checkpoint_written_with_0_based_epochs_resumes_identically(tiny_syn: Path, tmp_path: Path) -> None:
    """Checkpoints of older versions say ``epoch`` (0-based index) and a 0-based ``best_epoch``."""
    config = tiny_train_config(tiny_syn)
    whole = fit(config, Dataset(tiny_syn), tmp_path / "whole")

    def stop_after_second(epoch: int, metrics: dict[str, float], folder: Path) -> None:
        if epoch == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        fit(config, Dataset(tiny_syn), tmp_path / "old", on_epoch_end=stop_after_second)
    for name in (ckpt.LAST, ckpt.BEST):
        path = tmp_path / "old" / name / ckpt.STATE
        state = json.loads(path.read_text())
        old = {k: v for k, v in state.items() if k != "epochs_done"} | {"best_epoch": state["best_epoch"] - 1}
        path.write_text(json.dumps(old))
    saved = ckpt.saved_state(tmp_path / "old" / ckpt.LAST)
    assert saved["epochs_done"] == 2 and saved["epoch"] == 1
    resumed = fit(config, Dataset(tiny_syn), tmp_path / "old", resume_from=tmp_path / "old" / ckpt.LAST)
    assert resumed.epochs_run == 1 and resumed.best_epoch == whole.best_epoch
    a = ckpt.load(tmp_path / "whole" / ckpt.LAST).model
    b = ckpt.load(tmp_path / "old" / ckpt.LAST).model
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_uses_the_fused_adamw(tiny_syn: Path) -> None:
    trainer = Trainer(tiny_train_config(tiny_syn), Dataset(tiny_syn))
    assert all(group["fused"] for group in trainer.optimizer.param_groups)


def test_an_optimizer_state_from_the_per_tensor_adamw_resumes_fused() -> None:
    """Checkpoints written before AdamW was fused carry ``fused: None``; a resumed run stays on the fused kernel."""
    model = torch.nn.Linear(3, 2)
    old = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    old.step()
    new = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    load_optimizer_state(new, old.state_dict())
    assert new.param_groups[0]["fused"] is True
    assert torch.equal(new.state[model.weight]["exp_avg"], old.state[model.weight]["exp_avg"])
    new.step()
    assert float(new.state[model.weight]["step"]) == 2
