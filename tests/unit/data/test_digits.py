"""scikit-learn's digits as a label-based dataset: class-disjoint train and test, a seeded dev share of train."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gssf_cli.core.stage_configs import PrepareConfig
from gssf_cli.data.digits import TEST_CLASSES, TRAIN_CLASSES, write_digits


def test_the_writer_splits_by_class_and_scales_to_one(tmp_path: Path) -> None:
    fields = write_digits(PrepareConfig(dataset="digits", out=tmp_path, dev_fraction=0.1), tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {
        f"{s}_{x}.npy" for s in ("train", "dev", "test") for x in ("feats", "labels")
    }
    arrays = {
        s: (np.load(tmp_path / f"{s}_feats.npy"), np.load(tmp_path / f"{s}_labels.npy")) for s in fields["splits"]
    }
    for split, (feats, labels) in arrays.items():
        assert feats.shape == (len(labels), 64) and feats.dtype == np.float32
        assert feats.min() >= 0.0 and feats.max() <= 1.0
        assert fields["splits"][split] == {"items": len(labels), "classes": sorted(set(labels.tolist()))}
    assert set(arrays["train"][1].tolist()) == set(arrays["dev"][1].tolist()) == set(TRAIN_CLASSES)
    assert set(arrays["test"][1].tolist()) == set(TEST_CLASSES)
    train_dev = len(arrays["train"][1]) + len(arrays["dev"][1])
    assert len(arrays["dev"][1]) == round(0.1 * train_dev)
    assert fields["task"] == "labels" and fields["modalities"]["features"]["shape"] == [64]


def test_the_dev_share_follows_the_seed(tmp_path: Path) -> None:
    def dev(seed: int) -> np.ndarray:
        folder = tmp_path / f"{seed}-{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        write_digits(PrepareConfig(dataset="digits", out=folder, seed=seed), folder)
        return np.load(folder / "dev_feats.npy")

    assert np.array_equal(dev(1), dev(1)) and not np.array_equal(dev(1), dev(2))
