"""scikit-learn's bundled handwritten digits as a label-based retrieval dataset (no download).

1,797 grey 8x8 images of the digits 0-9, flattened to 64 features scaled to [0, 1]. The field's convention
is class-disjoint train and test: classes 0-5 train, classes 6-9 test. ``dev`` holds a seeded
``dev_fraction`` of the train-class images (same classes as train, other images): it is for model
selection, while the test split measures retrieval of classes never seen in training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gssf_cli.core.stage_configs import PrepareConfig

TRAIN_CLASSES = (0, 1, 2, 3, 4, 5)
TEST_CLASSES = (6, 7, 8, 9)


def write_digits(config: PrepareConfig, folder: Path) -> dict[str, Any]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    feats = (np.asarray(bunch.data, dtype=np.float32) / 16.0).astype(np.float32)
    labels = np.asarray(bunch.target, dtype=np.int64)
    rng = np.random.default_rng(config.seed)

    train_pool = np.flatnonzero(np.isin(labels, TRAIN_CLASSES))
    shuffled = rng.permutation(train_pool)
    n_dev = round(config.dev_fraction * len(shuffled))
    indices = {
        "train": np.sort(shuffled[n_dev:]),
        "dev": np.sort(shuffled[:n_dev]),
        "test": np.flatnonzero(np.isin(labels, TEST_CLASSES)),
    }
    splits: dict[str, Any] = {}
    for split, idx in indices.items():
        np.save(folder / f"{split}_feats.npy", feats[idx])
        np.save(folder / f"{split}_labels.npy", labels[idx])
        splits[split] = {"items": len(idx), "classes": sorted(int(c) for c in np.unique(labels[idx]))}
    return {
        "task": "labels",
        "modalities": {"features": {"type": "features", "shape": [feats.shape[1]], "dtype": "float32"}},
        "splits": splits,
        "source": "sklearn.datasets.load_digits",
        "seed": config.seed,
    }
