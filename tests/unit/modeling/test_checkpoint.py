"""Checkpoints: atomic safetensors + JSON, nothing unpickled, readable errors, and recovery from a kill mid-save."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

from gssf_cli.core.errors import UserInputError
from gssf_cli.modeling import checkpoint as ckpt


def test_round_trip_with_optimizer_and_rng(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    ckpt.save(tmp_path / ckpt.LAST, model, {"epoch": 2, "config": {"lr": 0.1}}, optimizer)
    saved = ckpt.load(tmp_path / ckpt.LAST)
    assert saved.state["epoch"] == 2 and ckpt.saved_state(tmp_path / ckpt.LAST)["config"] == {"lr": 0.1}
    assert all(torch.equal(saved.model[k], v) for k, v in model.state_dict().items())
    fresh = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    assert saved.optimizer is not None
    fresh.load_state_dict(saved.optimizer)
    assert fresh.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]
    assert "torch_cpu" in saved.rng


def test_save_replaces_only_when_complete(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    ckpt.save(tmp_path / "c", model, {"epoch": 0})
    ckpt.save(tmp_path / "c", model, {"epoch": 1})
    assert ckpt.saved_state(tmp_path / "c")["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_saved_config_reads_the_last_checkpoint(tmp_path: Path) -> None:
    ckpt.save(tmp_path / "runs" / "r1" / ckpt.LAST, torch.nn.Linear(1, 1), {"config": {"epochs": 3}})
    assert ckpt.saved_config("r1", tmp_path / "runs") == {"epochs": 3}
    with pytest.raises(UserInputError, match="has no local checkpoint"):
        ckpt.saved_config("r2", tmp_path / "runs")


def test_unreadable_checkpoints_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="no checkpoint here"):
        ckpt.load(tmp_path)
    ckpt.save(tmp_path / "c", torch.nn.Linear(1, 1), {})
    (tmp_path / "c" / ckpt.MODEL).write_bytes(b"not safetensors")
    with pytest.raises(UserInputError, match="unreadable checkpoint"):
        ckpt.load(tmp_path / "c")


# ---------------------------------------------------------------------------------------------------------
# Recovery: what a kill in the middle of a save leaves behind


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def _leftover(parent: Path, kind: str, epoch: int, pid: int | None, *, tag: str = "0badc0de") -> Path:
    """A checkpoint folder of ``epoch`` named as a save of process ``pid`` leaves it (without a pid: older versions)."""
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    ckpt.save(parent / "src", model, {"epoch": epoch, "kind": kind}, optimizer)
    name = f".{ckpt.LAST}.{kind}-{tag}" if pid is None else f".{ckpt.LAST}.{kind}-{pid}-{tag}"
    return (parent / "src").rename(parent / name)


def _names(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def test_a_kill_between_the_renames_leaves_a_checkpoint_that_loads(tmp_path: Path) -> None:
    dead = _dead_pid()
    _leftover(tmp_path, "old", 1, dead)
    _leftover(tmp_path, "tmp", 2, dead, tag="1234abcd")
    saved = ckpt.load(tmp_path / ckpt.LAST)
    assert saved.state["epoch"] == 2 and saved.optimizer is not None
    assert _names(tmp_path) == [ckpt.LAST]


@pytest.mark.parametrize("damage", ["no state", "cut weights", "no optimizer", "bad state"])
def test_an_incomplete_new_checkpoint_gives_way_to_the_old_one(tmp_path: Path, damage: str) -> None:
    dead = _dead_pid()
    _leftover(tmp_path, "old", 1, dead)
    new = _leftover(tmp_path, "tmp", 2, dead, tag="1234abcd")
    if damage == "no state":
        (new / ckpt.STATE).unlink()
    elif damage == "cut weights":
        (new / ckpt.MODEL).write_bytes((new / ckpt.MODEL).read_bytes()[:-8])
    elif damage == "no optimizer":
        (new / ckpt.OPTIMIZER).unlink()
    else:
        (new / ckpt.STATE).write_text('{"epoch": 2, ')
    assert ckpt.saved_state(tmp_path / ckpt.LAST)["epoch"] == 1
    assert _names(tmp_path) == [ckpt.LAST]


def test_the_new_checkpoint_wins_a_tie(tmp_path: Path) -> None:
    _leftover(tmp_path, "old", 3, os.getpid())  # this process's own leftovers come from an interrupted save
    _leftover(tmp_path, "tmp", 3, os.getpid(), tag="1234abcd")
    assert ckpt.recover(tmp_path / ckpt.LAST)
    assert ckpt.saved_state(tmp_path / ckpt.LAST)["kind"] == "tmp" and _names(tmp_path) == [ckpt.LAST]


def test_leftovers_of_a_live_process_are_left_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ckpt, "WAIT_FOR_WRITER_S", 0.1)
    live = subprocess.Popen(["sleep", "60"])
    try:
        writing = _leftover(tmp_path, "tmp", 2, live.pid)
        assert not ckpt.recover(tmp_path / ckpt.LAST) and writing.is_dir()  # it may be between its renames
        with pytest.raises(UserInputError, match="no checkpoint here"):
            ckpt.load(tmp_path / ckpt.LAST)
        ckpt.save(tmp_path / ckpt.LAST, torch.nn.Linear(2, 2), {"epoch": 0})
        assert _names(tmp_path) == sorted([ckpt.LAST, writing.name])
    finally:
        live.kill()
        live.wait()


def test_leftovers_named_without_a_process_id_go_once_an_hour_old(tmp_path: Path) -> None:
    """Older versions named leftovers without a process id: a complete one is put back, the rest is removed only
    when it is over an hour old (its writer cannot be asked whether it still runs)."""
    _leftover(tmp_path, "tmp", 1, None)
    recent = _leftover(tmp_path, "old", 0, None, tag="1234abcd")
    assert ckpt.saved_state(tmp_path / ckpt.LAST)["epoch"] == 1
    assert _names(tmp_path) == sorted([ckpt.LAST, recent.name])
    an_hour_ago = time.time() - ckpt.STALE_AFTER_S - 60
    os.utime(recent, (an_hour_ago, an_hour_ago))
    ckpt.save(tmp_path / ckpt.LAST, torch.nn.Linear(2, 2), {"epoch": 2})
    assert _names(tmp_path) == [ckpt.LAST]


def test_a_save_clears_what_dead_saves_left(tmp_path: Path) -> None:
    ckpt.save(tmp_path / ckpt.LAST, torch.nn.Linear(2, 2), {"epoch": 0})
    partial = _leftover(tmp_path, "tmp", 1, _dead_pid())
    (partial / ckpt.STATE).unlink()
    ckpt.save(tmp_path / ckpt.LAST, torch.nn.Linear(2, 2), {"epoch": 1})
    assert _names(tmp_path) == [ckpt.LAST] and ckpt.saved_state(tmp_path / ckpt.LAST)["epoch"] == 1


def test_a_run_without_a_checkpoint_resumes_from_its_start_config(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "r1"
    assert ckpt.read_run_config(run_dir) is None
    ckpt.write_run_config(run_dir, {"epochs": 3}, "abc")
    assert _names(run_dir) == [ckpt.RUN_CONFIG]
    assert ckpt.read_run_config(run_dir) == {"config": {"epochs": 3}, "dataset_sha256": "abc"}
    assert ckpt.saved_config("r1", tmp_path / "runs") == {"epochs": 3}
    ckpt.save(run_dir / ckpt.LAST, torch.nn.Linear(1, 1), {"config": {"epochs": 4}})
    assert ckpt.saved_config("r1", tmp_path / "runs") == {"epochs": 4}  # the checkpoint, once there is one
    (run_dir / ckpt.RUN_CONFIG).write_text("[1]")
    with pytest.raises(UserInputError, match="not a run config"):
        ckpt.read_run_config(run_dir)


def test_states_of_older_versions_read_in_the_one_numbering(tmp_path: Path) -> None:
    """Older states say ``epoch`` (0-based index of the saved epoch) and a 0-based ``best_epoch``; readers get
    ``epochs_done`` and a ``best_epoch`` counted from 1, and new states keep ``epoch`` for older readers."""
    base = {"config": {}, "dataset_sha256": "x", "best_value": 1.0, "last_metrics": {}}
    ckpt.save(tmp_path / "old", torch.nn.Linear(1, 1), {**base, "epoch": 2, "best_epoch": 1})
    for state in (ckpt.saved_state(tmp_path / "old"), ckpt.load(tmp_path / "old").state):
        assert (state["epochs_done"], state["best_epoch"], state["epoch"]) == (3, 2, 2)
        ckpt.check_state(state, tmp_path / "old")
    new = {**base, **ckpt.epoch_fields(3), "best_epoch": 2}
    assert new["epoch"] == 2 and ckpt.normalise_state(new) == new
    ckpt.save(tmp_path / "new", torch.nn.Linear(1, 1), new)
    assert ckpt.saved_state(tmp_path / "new")["best_epoch"] == 2, "a current state is read as it is"
    with pytest.raises(UserInputError, match="epochs_done: expected int, got missing"):
        ckpt.check_state({k: v for k, v in new.items() if k not in ("epoch", "epochs_done")}, tmp_path)
