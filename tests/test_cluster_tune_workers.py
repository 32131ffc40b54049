"""``gssf tune --workers-per-trial 2``: each trial drives a data-parallel Ray Train run of its own, on a local Ray
(``nox -s cluster``; a file of its own so that it runs beside the other cluster tests)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import tiny_synthetic_args
from tests.test_cluster_training import _command, _env, _gssf

pytestmark = pytest.mark.cluster


def test_tune_trials_train_on_workers_of_their_own(tmp_path: Path) -> None:
    """``--workers-per-trial 2``: each trial drives a 2-worker Ray Train run; its checkpoints say so."""
    subprocess.run(_command(*tiny_synthetic_args()), cwd=tmp_path, env=_env(), check=True, capture_output=True)
    tuned = _gssf(tmp_path, "tune", "--data", "data/syn", "--param", "block_size=4", "--base", "embed_dim=16",
                  "--base", "word_dim=8", "--base", "batch_size=16", "--epochs", "2", "--workers-per-trial", "2",
                  "--storage", "ray-results", "--json")  # fmt: skip
    trials = tuned["trials"]
    assert isinstance(trials, list) and [(t["status"], t["epochs"]) for t in trials] == [("FINISHED", 2)]
    (state,) = (tmp_path / "ray-results").rglob("checkpoint/state.json")
    assert json.loads(state.read_text())["config"]["workers"] == 2
