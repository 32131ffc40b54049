"""Small user-style sources written by tests: precomp folders and feature files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

WORDS = ["a", "dog", "runs", "on", "the", "grass", "cat", "sits", "mat", "red", "ball"]


def captions(n_images: int, k: int = 5, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 8))).capitalize() + "." for _ in range(n_images * k)]


def write_precomp(
    folder: Path,
    n: dict[str, int] | None = None,
    item_shape: tuple[int, ...] = (3, 6),
    repeat: bool = False,
    vocab: bool = False,
) -> Path:
    """A SCAN/VSE-style folder: {split}_ims.npy + {split}_caps.txt (5 per image)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for split, count in (n or {"train": 8, "dev": 3, "test": 4}).items():
        ims = rng.normal(size=(count, *item_shape)).astype(np.float32)
        if repeat:
            ims = np.repeat(ims, 5, axis=0)
        np.save(folder / f"{split}_ims.npy", ims)
        (folder / f"{split}_caps.txt").write_text("\n".join(captions(count, seed=count)) + "\n", encoding="utf-8")
    if vocab:
        words = ["<pad>", "<start>", "<end>", "<unk>", *WORDS]
        scan = {
            "word2idx": {w: i for i, w in enumerate(words)},
            "idx2word": {str(i): w for i, w in enumerate(words)},
        }
        (folder / "vocab.json").write_text(json.dumps(scan))
    return folder


def write_feature_folder(folder: Path, paired: bool = True, k: int = 1) -> Path:
    """Split-prefixed .npy files: train/dev/test x images+texts (or features+labels)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    for split, count in {"train": 12, "dev": 4, "test": 6}.items():
        if paired:
            np.save(folder / f"{split}_images.npy", rng.normal(size=(count, 5)).astype(np.float32))
            np.save(folder / f"{split}_texts.npy", rng.normal(size=(count * k, 7)).astype(np.float32))
        else:
            np.save(folder / f"{split}_features.npy", rng.normal(size=(count, 5)).astype(np.float32))
            np.save(folder / f"{split}_labels.npy", rng.integers(0, 3, size=count))
    return folder


def write_feature_npz(path: Path, paired: bool = True, n: int = 40, k: int = 2, classes: int = 10) -> Path:
    """One unsplit .npz: images+texts (k texts per image) or features+labels."""
    rng = np.random.default_rng(3)
    if paired:
        np.savez(
            path,
            images=rng.normal(size=(n, 4)).astype(np.float32),
            texts=np.arange(n * k * 4, dtype=np.float32).reshape(n * k, 4),
        )
    else:
        np.savez(
            path,
            features=rng.normal(size=(n, 4)).astype(np.float32),
            labels=np.arange(n) % classes,
        )
    return path


def write_split_features(
    path: Path, labels: dict[str, list[int]] | None = None, images: dict[str, int] | None = None
) -> Path:
    """One .npz of split-prefixed arrays: ``{split}_features`` + ``{split}_labels`` with the given labels per
    split, or ``{split}_images`` + ``{split}_texts`` (2 texts per image) with the given image counts."""
    rng = np.random.default_rng(4)
    arrays: dict[str, np.ndarray] = {}
    for split, split_labels in (labels or {}).items():
        arrays[f"{split}_features"] = rng.normal(size=(len(split_labels), 4)).astype(np.float32)
        arrays[f"{split}_labels"] = np.asarray(split_labels, dtype=np.int64)
    for split, count in (images or {}).items():
        arrays[f"{split}_images"] = rng.normal(size=(count, 4)).astype(np.float32)
        arrays[f"{split}_texts"] = rng.normal(size=(2 * count, 4)).astype(np.float32)
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path
