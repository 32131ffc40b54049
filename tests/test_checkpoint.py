"""Checkpoints: atomic safetensors + JSON, nothing unpickled, readable errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gssf_cli import checkpoint as ckpt
from gssf_cli.errors import UserInputError


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
