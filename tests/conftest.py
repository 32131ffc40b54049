"""Shared fixtures: every test runs in its own working directory with its own SQLite tracking store."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from gssf_cli.cli.app import app

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh working directory; the default tracking store (``./mlflow.db``) lands here."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    yield tmp_path


@pytest.fixture
def gssf(workdir: Path) -> Callable[..., Result]:
    """Invoke the CLI in-process: ``gssf("prepare", "--dataset", ...)``."""
    runner = CliRunner()

    def invoke(*args: str) -> Result:
        return runner.invoke(app, list(args), env={"COLUMNS": "120", "NO_COLOR": "1"})

    return invoke


def tiny_synthetic_args(out: str = "data/syn") -> list[str]:
    return [
        "prepare", "--dataset", "synthetic", "--out", out,
        "--train-images", "40", "--dev-images", "10", "--test-images", "10",
        "--regions", "4", "--region-dim", "8", "--concepts", "6", "--vocab-size", "30",
    ]  # fmt: skip


@pytest.fixture(scope="session")
def tiny_syn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic dataset made with the library (no CLI, no tracking store), shared by library tests."""
    from gssf_cli.core.stage_configs import PrepareConfig
    from gssf_cli.stages import prepare

    out = tmp_path_factory.mktemp("datasets") / "syn"
    config = PrepareConfig(
        dataset="synthetic", out=out, train_images=64, dev_images=16, test_images=16,
        regions=4, region_dim=8, concepts=6, vocab_size=30,
    )  # fmt: skip
    prepare.run(config)
    return out


def tiny_train_config(data: Path, **overrides: object) -> object:
    """A train config small enough for a few epochs in about a second."""
    from gssf_cli.core.config import from_dict
    from gssf_cli.core.stage_configs import TrainConfig

    values = {"data": data, "metric": "gssf", "block_size": 4, "embed_dim": 16, "word_dim": 8, "batch_size": 16,
              "epochs": 3, "lr": 0.003, "device": "cpu", **overrides}  # fmt: skip
    return from_dict(TrainConfig, values, "train")


LONGEST_FILES = (
    "tests/behaviour/test_readme.py",
    "tests/behaviour/test_cluster.py",
    "tests/behaviour/test_cluster_training.py",
    "tests/behaviour/test_cluster_faults.py",
    "tests/unit/stages/test_tune.py",
    "tests/behaviour/faults/test_sweep_kills.py",
    "tests/unit/stages/test_evaluate_coco.py",
    "tests/behaviour/faults/test_concurrency.py",
    "tests/behaviour/faults/test_pipeline_cache.py",
    "tests/behaviour/faults/test_kills.py",
    "tests/behaviour/faults/test_full_disk.py",
)
"""Test files that take a minute or more on 2 cores, longest first (measured with ``--durations``). ``nox`` hands
whole files to its workers in collection order (``--dist loadfile --no-loadscope-reorder``), so these go first and
the many short files fill the gaps: the run ends when its longest file does, not one long file after the rest."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: index for index, name in enumerate(LONGEST_FILES)}
    root = Path(__file__).resolve().parent.parent

    def order(item: pytest.Item) -> int:
        with contextlib.suppress(ValueError):
            return rank.get(str(item.path.relative_to(root)), len(rank))
        return len(rank)

    items.sort(key=order)  # stable: the order within a file, and of the other files, is kept
