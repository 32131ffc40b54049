"""Shared by the stage tests of tune and its trial runs: a working directory, per test module, holding its own
tracking store and a small synthetic dataset (``data/syn``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.stages.tune_helpers import prepare


@pytest.fixture(scope="module")
def moduledir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One working directory (tracking store, dataset, Ray results) for the module's tunes."""
    folder = tmp_path_factory.mktemp("tune")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
            patch.delenv(name, raising=False)
        prepare(folder / "data" / "syn")
        yield folder
