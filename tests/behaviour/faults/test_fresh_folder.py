"""A refused command, or a dry run, in a folder that has no tracking store yet creates none: no ``mlflow.db``,
no lock, nothing else."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import Result

from gssf_cli.core.stage_configs import PrepareConfig

Gssf = Callable[..., Result]

PIPELINE = '[pipeline]\nname = "p"\n\n[train]\ndata = "data/syn"\nepochs = 1\n\n[evaluate]\n'
REFUSED = {
    "prepare: a share out of range": ["prepare", "--dataset", "synthetic", "--out", "x", "--caption-noise", "1.5"],
    "train: a block size that does not divide": ["train", "--data", "data/syn", "--block-size", "7"],
    "train: resume an unknown run": ["train", "--data", "data/syn", "--resume", "abc"],
    "tune: storage in /proc": ["tune", "--data", "data/syn", "--param", "block_size=4,8", "--storage", "/proc/x"],
    "evaluate: a missing embeddings file": ["evaluate", "--embeddings", "nope.npz"],
    "evaluate: an unknown run": ["evaluate", "--run", "abc"],
    "compare: unknown runs": ["compare", "abc", "def"],
    "export: an unknown run": ["export", "--onnx", "--run", "abc"],
    "run: a missing pipeline": ["run", "nope.toml"],
}


@pytest.fixture
def fresh(workdir: Path) -> Path:
    from gssf_cli.stages import prepare

    prepare.run(PrepareConfig(dataset="synthetic", out=Path("data/syn"), train_images=16, dev_images=4,
                              test_images=4, regions=2, region_dim=4, concepts=3, vocab_size=20))  # fmt: skip
    (workdir / "p.toml").write_text(PIPELINE)
    return workdir


def _everything(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_refused_command_creates_no_store(gssf: Gssf, fresh: Path, case: str) -> None:
    before = _everything(fresh)
    result = gssf(*REFUSED[case])
    assert result.exit_code == 2, result.stderr
    assert _everything(fresh) == before, "a refused command leaves nothing behind, a store least of all"


def test_a_dry_run_creates_no_store(gssf: Gssf, fresh: Path) -> None:
    before = _everything(fresh)
    result = gssf("run", "p.toml", "--dry-run")
    assert result.exit_code == 0, result.stderr
    assert "would run" in result.stdout
    assert _everything(fresh) == before
