"""Helpers of the tune and trial-run stage tests: a small synthetic dataset, and the epochs a run logged."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from typer.testing import CliRunner

from gssf_cli.cli.app import app

if TYPE_CHECKING:
    from gssf_cli.tracking.adapter import Tracker

ENV = {"COLUMNS": "120", "NO_COLOR": "1"}


def prepare(folder: Path, train_images: int = 300) -> Path:
    result = CliRunner().invoke(
        app,
        ["prepare", "--dataset", "synthetic", "--out", str(folder), "--train-images", str(train_images),
         "--dev-images", "60", "--test-images", "20", "--regions", "6", "--region-dim", "16", "--concepts", "12",
         "--vocab-size", "80"],
        env=ENV,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    return folder


def logged_steps(tracker: Tracker, run: Any) -> list[int]:
    return [m.step for m in tracker.client.get_metric_history(run.info.run_id, "val_rsum")]
