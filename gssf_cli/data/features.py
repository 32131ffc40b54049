"""A user's precomputed embeddings: paired image/text features, or features with class labels.

Accepted sources: a folder of ``.npy`` files or one ``.npz`` file, holding either split-prefixed arrays
(``train_images`` + ``train_texts``, or ``train_features`` + ``train_labels``, likewise ``dev_``/``test_``)
or unsplit ones (``images`` + ``texts``, or ``features`` + ``labels``). ``texts`` holds k rows per image in
image order (k = 1 for CLIP-style pairs). Pairs may carry ``labels`` (``[N]`` integers, a class per image; split
ones ``{split}_labels``): they say which items are relevant to each other for intra-modal retrieval and never
train. Unsplit arrays are split with the seed: pairs by image, labelled data by class (train, dev and test classes are disjoint, the convention of the field). dev and test
get at least the minimum a split needs to rank (2 images, or 2 classes: see :mod:`gssf_cli.data.rankable`)
even when the fractions give fewer.

Output: ``{split}_ims.npy`` + ``{split}_txts.npy`` (paired, with ``{split}_labels.npy`` when given) or
``{split}_feats.npy`` + ``{split}_labels.npy``.
``.npy`` inputs are memory-mapped and linked, not loaded; ``.npz`` members are read (zip members cannot be
memory-mapped).
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from gssf_cli.core.errors import UserInputError, first_line
from gssf_cli.core.files import check_float_array, link_or_copy, open_array
from gssf_cli.core.limits import MIN_SPLIT_CLASSES, MIN_SPLIT_IMAGES
from gssf_cli.core.stage_configs import PrepareConfig

SPLITS = ("train", "dev", "test")
PAIRED = ("images", "texts")
LABELLED = ("features", "labels")
OUTPUT_NAMES = {"images": "ims", "texts": "txts", "features": "feats", "labels": "labels"}


def write_features(config: PrepareConfig, folder: Path) -> dict[str, Any]:
    source = config.source
    if source is None or not source.exists():
        raise UserInputError(f"source {source} not found: point --source at a folder of .npy files or an .npz file")
    arrays, files = _read_source(source)
    layout = PAIRED if any(k.endswith("images") for k in arrays) else LABELLED
    if any(f"{s}_{layout[0]}" in arrays for s in SPLITS):
        by_split = {s: {n: f"{s}_{n}" for n in layout} for s in SPLITS if f"{s}_{layout[0]}" in arrays}
    elif layout[0] in arrays:
        by_split = {}
    else:
        raise UserInputError(
            f"{source}: found {sorted(arrays) or 'no arrays'}; expected images+texts or features+labels "
            "(optionally prefixed train_/dev_/test_)"
        )
    for names in by_split.values():
        for key in names.values():
            if key not in arrays:
                raise UserInputError(f"{source}: {key} is missing (needed beside {names[layout[0]]})")
    if layout == PAIRED and any(name.endswith("labels") for name in arrays):
        for split, names in (by_split or {"": {"images": "images"}}).items():
            names["labels"] = f"{split}_labels" if split else "labels"
            if names["labels"] not in arrays:
                raise UserInputError(f"{source}: {names['labels']} is missing (labels are given for other images)")

    seed = None if by_split else config.seed
    if layout == PAIRED:
        splits, k = _paired(config, arrays, files, by_split, folder, source)
        return _paired_manifest(arrays, splits, k, source, seed)
    splits = _labelled(config, arrays, files, by_split, folder, source)
    feats = next(arrays[n] for n in arrays if n.endswith("features"))
    return {
        "task": "labels",
        "modalities": {"features": {"type": "features", "shape": list(feats.shape[1:]), "dtype": str(feats.dtype)}},
        "splits": splits,
        "source": str(source.resolve()),
        "seed": seed,
    }


def _read_source(source: Path) -> tuple[dict[str, np.ndarray], dict[str, Path]]:
    """Arrays by name, and for memory-mapped ones the file they came from (so they can be linked)."""
    if source.is_dir():
        paths = {p.stem: p for p in sorted(source.glob("*.npy"))}
        return {name: open_array(path, name) for name, path in paths.items()}, paths
    if source.suffix == ".npy":
        raise UserInputError(f"{source}: one .npy holds one array; pass its folder or an .npz with several")
    try:
        with np.load(source, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}, {}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise UserInputError(f"{source}: not a readable .npz file ({first_line(exc)})") from None


def _paired(
    config: PrepareConfig,
    arrays: Mapping[str, np.ndarray],
    files: Mapping[str, Path],
    by_split: dict[str, dict[str, str]],
    folder: Path,
    source: Path,
) -> tuple[dict[str, Any], int]:
    ks = set()
    labelled = "labels" in arrays
    for names in by_split.values() or [
        {"images": "images", "texts": "texts"} | ({"labels": "labels"} if labelled else {})
    ]:
        images, texts = arrays[names["images"]], arrays[names["texts"]]
        check_float_array(images, f"{source}:{names['images']}", ndims=(2,))
        check_float_array(texts, f"{source}:{names['texts']}", ndims=(2,))
        if "labels" in names:
            _check_labels(arrays[names["labels"]], len(images), f"{source}:{names['labels']}", "image rows")
        if len(texts) % len(images):
            raise UserInputError(
                f"{source}:{names['texts']}: {len(texts)} rows is not a multiple of the {len(images)} images"
            )
        ks.add(len(texts) // len(images))
    if len(ks) != 1:
        raise UserInputError(f"{source}: texts per image differ between splits ({sorted(ks)})")
    k = ks.pop()
    splits: dict[str, Any] = {}
    if by_split:
        for split, names in by_split.items():
            for role, key in names.items():
                _save(arrays[key], files.get(key), folder / f"{split}_{OUTPUT_NAMES[role]}.npy")
            splits[split] = {"images": len(arrays[names["images"]]), "captions": len(arrays[names["texts"]])}
        return splits, k
    images, texts = np.asarray(arrays["images"]), np.asarray(arrays["texts"])
    order = np.random.default_rng(config.seed).permutation(len(images))
    for split, idx in _split_indices(order, config, MIN_SPLIT_IMAGES, "images").items():
        idx = np.sort(idx)
        text_idx = (idx[:, None] * k + np.arange(k)).reshape(-1)
        np.save(folder / f"{split}_ims.npy", images[idx])
        np.save(folder / f"{split}_txts.npy", texts[text_idx])
        if labelled:
            np.save(folder / f"{split}_labels.npy", np.asarray(arrays["labels"])[idx].astype(np.int64))
        splits[split] = {"images": len(idx), "captions": len(text_idx)}
    return splits, k


def _labelled(
    config: PrepareConfig,
    arrays: Mapping[str, np.ndarray],
    files: Mapping[str, Path],
    by_split: dict[str, dict[str, str]],
    folder: Path,
    source: Path,
) -> dict[str, Any]:
    for names in by_split.values() or [{"features": "features", "labels": "labels"}]:
        feats, labels = arrays[names["features"]], arrays[names["labels"]]
        check_float_array(feats, f"{source}:{names['features']}", ndims=(2,))
        _check_labels(labels, len(feats), f"{source}:{names['labels']}", "feature rows")
    splits: dict[str, Any] = {}
    if by_split:
        for split, names in by_split.items():
            for role, key in names.items():
                _save(arrays[key], files.get(key), folder / f"{split}_{OUTPUT_NAMES[role]}.npy")
            labels = np.asarray(arrays[names["labels"]])
            splits[split] = {"items": len(labels), "classes": len(np.unique(labels))}
        return splits
    feats, labels = np.asarray(arrays["features"]), np.asarray(arrays["labels"]).astype(np.int64)
    classes = np.unique(labels)
    order = np.random.default_rng(config.seed).permutation(classes)
    for split, chosen in _split_indices(order, config, MIN_SPLIT_CLASSES, "classes").items():
        idx = np.flatnonzero(np.isin(labels, chosen))
        np.save(folder / f"{split}_feats.npy", feats[idx])
        np.save(folder / f"{split}_labels.npy", labels[idx])
        splits[split] = {"items": len(idx), "classes": len(chosen)}
    return splits


def _check_labels(labels: np.ndarray, rows: int, where: str, what: str) -> None:
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise UserInputError(f"{where}: expected a 1-D integer array, got {labels.dtype} shape {list(labels.shape)}")
    if len(labels) != rows:
        raise UserInputError(f"{where}: {len(labels)} labels for {rows} {what}; they must match")


def _split_indices(order: np.ndarray, config: PrepareConfig, minimum: int, what: str) -> dict[str, np.ndarray]:
    """Cut a permutation of images (or classes) into train/dev/test by the configured fractions; dev and test
    get at least ``minimum`` each (the least a split can rank with), train at least one."""
    n = len(order)
    n_test = max(minimum, round(config.test_fraction * n))
    n_dev = max(minimum, round(config.dev_fraction * n))
    if n - n_test - n_dev < 1:
        raise UserInputError(
            f"only {n} {what} to split into train/dev/test (dev and test need at least {minimum} {what} each, "
            "train one); provide more data or split it yourself"
        )
    return {"train": order[n_test + n_dev :], "dev": order[n_test : n_test + n_dev], "test": order[:n_test]}


def _save(array: np.ndarray, path: Path | None, dst: Path) -> None:
    if path is not None:
        link_or_copy(path, dst)
    else:
        np.save(dst, np.asarray(array))


def _paired_manifest(
    arrays: Mapping[str, np.ndarray],
    splits: dict[str, Any],
    k: int,
    source: Path,
    seed: int | None,
) -> dict[str, Any]:
    images = next(arrays[n] for n in arrays if n.endswith("images"))
    texts = next(arrays[n] for n in arrays if n.endswith("texts"))
    return {
        "task": "cross_modal",
        "captions_per_image": k,
        "modalities": {
            "image": {"type": "features", "shape": list(images.shape[1:]), "dtype": str(images.dtype)},
            "text": {"type": "features", "shape": list(texts.shape[1:]), "dtype": str(texts.dtype)},
        },
        "splits": splits,
        "source": str(source.resolve()),
        "seed": seed,
    }
