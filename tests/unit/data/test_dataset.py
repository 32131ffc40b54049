"""Dataset kinds: one writer per kind, and no split that cannot rank (the manifest itself: test_manifest.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import Result

from gssf_cli.core import limits
from gssf_cli.core.errors import UserInputError
from gssf_cli.core.stage_configs import PrepareConfig
from gssf_cli.data import WRITERS, writer
from gssf_cli.data.rankable import labels_problem
from gssf_cli.stages import prepare
from tests.factories import write_feature_npz, write_precomp, write_split_features


def test_every_dataset_kind_has_a_writer() -> None:
    assert tuple(WRITERS) == limits.DATASET_KINDS
    assert all(callable(writer(kind)) for kind in WRITERS)


TINY_SYNTHETIC: dict[str, Any] = {
    "dataset": "synthetic", "train_images": 8, "dev_images": 4, "test_images": 4, "regions": 2, "region_dim": 4,
    "concepts": 4, "vocab_size": 16,
}  # fmt: skip
DEGENERATE: dict[str, tuple[Callable[[Path], dict[str, Any]], str]] = {
    "synthetic dev": (
        lambda w: {**TINY_SYNTHETIC, "dev_images": 1},
        "the dev split has 1 image (cross-modal retrieval needs at least 2 images to rank); raise --dev-images",
    ),
    "synthetic test": (lambda w: {**TINY_SYNTHETIC, "test_images": 1}, "the test split has 1 image"),
    "digits dev": (lambda w: {"dataset": "digits", "dev_fraction": 0.0005}, "the dev split has 1 class"),
    "precomp dev": (
        lambda w: {"dataset": "precomp", "source": write_precomp(w / "src", n={"train": 8, "dev": 1, "test": 4})},
        "the dev split has 1 image",
    ),
    "features labels, one-class dev": (
        lambda w: {
            "dataset": "features",
            "source": write_split_features(
                w / "s.npz", labels={"train": [0, 0, 1, 1], "dev": [2, 2, 2], "test": [3, 3, 4, 4]}
            ),
        },
        "the dev split has 1 class (label-based retrieval needs at least 2 classes",
    ),
    "features labels, singleton test classes": (
        lambda w: {
            "dataset": "features",
            "source": write_split_features(w / "s.npz", labels={"train": [0, 0, 1], "test": [3, 4, 5]}),
        },
        "the test split has 3 classes but none with 2 items",
    ),
    "features labels, unsplit singletons": (
        lambda w: {"dataset": "features", "source": write_feature_npz(w / "s.npz", paired=False, n=12, classes=12)},
        "the dev split has 2 classes but none with 2 items (label-based retrieval needs at least 2 classes and a "
        "class with at least 2 items, so that queries have positives to find among negatives); raise --dev-fraction "
        "or give a split dev set",
    ),
    "features pairs, one test image": (
        lambda w: {
            "dataset": "features",
            "source": write_split_features(w / "s.npz", images={"train": 6, "dev": 3, "test": 1}),
        },
        "the test split has 1 image",
    ),
}


@pytest.mark.parametrize("case", sorted(DEGENERATE))
def test_prepare_refuses_a_split_that_cannot_rank(tmp_path: Path, case: str) -> None:
    settings, expected = DEGENERATE[case]
    out = tmp_path / "data" / "d"
    with pytest.raises(UserInputError) as caught:
        prepare.run(PrepareConfig(out=out, **settings(tmp_path)))
    message = str(caught.value)
    assert message.startswith("prepare: ") and expected in message and "\n" not in message, message
    assert not out.exists() and not any((tmp_path / "data").glob("*")), "nothing is left behind"


def test_prepare_cli_exits_2_on_a_one_class_dev_split(gssf: Callable[..., Result], workdir: Path) -> None:
    write_split_features(workdir / "x.npz", labels={"train": [0, 0, 1, 1], "dev": [2, 2], "test": [3, 3, 4]})
    result = gssf("prepare", "--dataset", "features", "--source", "x.npz", "--out", "data/x")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.stderr
    assert (
        lines[0].startswith("gssf: error: prepare: the dev split has 1 class")
        and "give the source's dev split more classes" in lines[0]
    )
    assert not (workdir / "data" / "x").exists()
    assert not any((workdir / "data").glob(".x.partial*"))


def test_twelve_unsplit_classes_get_a_dev_split_that_can_rank(tmp_path: Path) -> None:
    """The reported case: 12 classes split by the default fractions used to leave dev with 1 class."""
    out = tmp_path / "d"
    result = prepare.run(
        PrepareConfig(
            dataset="features", out=out, source=write_feature_npz(tmp_path / "x.npz", paired=False, n=120, classes=12)
        )
    )
    assert result.splits["dev"]["classes"] == limits.MIN_SPLIT_CLASSES
    for split in ("dev", "test"):
        labels = np.load(out / f"{split}_labels.npy")
        assert len(set(labels.tolist())) >= 2 and labels_problem(np.unique(labels, return_counts=True)[1]) is None
    assert json.loads((out / "manifest.json").read_text())["splits"]["train"]["classes"] == 8


def test_a_two_class_split_passes(tmp_path: Path) -> None:
    source = write_split_features(
        tmp_path / "x.npz", labels={"train": [0, 0, 1, 1], "dev": [2, 2, 3], "test": [4, 5, 5]}
    )
    result = prepare.run(PrepareConfig(dataset="features", out=tmp_path / "d", source=source))
    assert result.splits["dev"] == {"items": 3, "classes": 2} and (tmp_path / "d" / "manifest.json").is_file()
