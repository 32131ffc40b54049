"""A user's SCAN/VSE "precomp" folder: ``{split}_ims.npy`` + ``{split}_caps.txt`` (+ optional vocab json).

Why care about memory: Flickr30K's train regions alone are ~8.5 GB. Arrays are memory-mapped and scanned
in chunks (shape, dtype, NaN/Inf); a valid array is hard-linked (or stream-copied) into the dataset folder,
never loaded whole. Some releases repeat every image ``captions_per_image`` times to align rows with
captions: that is detected (every group of rows identical) and the repeats are dropped in a stream.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from gssf_cli.core.errors import UserInputError
from gssf_cli.core.files import check_float_array, iter_rows, link_or_copy, open_array
from gssf_cli.core.stage_configs import PrepareConfig
from gssf_cli.data.text import TOKENIZER, Vocabulary, build_vocabulary, read_captions

SPLITS = ("train", "dev", "test", "testall")


def write_precomp(config: PrepareConfig, folder: Path) -> dict[str, Any]:
    source = _source_folder(config.source)
    found = _find_splits(source)
    k = config.captions_per_image
    item_shape: tuple[int, ...] | None = None
    splits: dict[str, Any] = {}
    captions_by_split: dict[str, list[str]] = {}
    dtype = "float32"
    for split in found:
        ims_path, caps_path = source / f"{split}_ims.npy", source / f"{split}_caps.txt"
        ims = open_array(ims_path, "image features")
        check_float_array(ims, str(ims_path), ndims=(2, 3))
        if item_shape is not None and ims.shape[1:] != item_shape:
            raise UserInputError(
                f"{ims_path}: per-image shape {list(ims.shape[1:])} differs from other splits' {list(item_shape)}"
            )
        item_shape = ims.shape[1:]
        dtype = str(ims.dtype)
        captions = read_captions(caps_path)
        n_images = _write_images(ims, ims_path, len(captions), k, folder / f"{split}_ims.npy")
        shutil.copyfile(caps_path, folder / f"{split}_caps.txt")
        captions_by_split[split] = captions
        splits[split] = {"images": n_images, "captions": len(captions)}

    vocab = _vocabulary(config, source, captions_by_split)
    vocab.save(folder / "vocab.json")
    assert item_shape is not None
    image_type = "regions" if len(item_shape) == 2 else "global"
    return {
        "task": "cross_modal",
        "captions_per_image": k,
        "modalities": {
            "image": {"type": image_type, "shape": list(item_shape), "dtype": dtype},
            "text": {"type": "captions", "vocab_size": len(vocab), "tokenizer": TOKENIZER},
        },
        "splits": splits,
        "source": str(source.resolve()),
        "seed": None,
    }


def _source_folder(source: Path | None) -> Path:
    if source is None:
        raise UserInputError("--source is required for --dataset precomp: point it at your precomp folder")
    if not source.exists():
        raise UserInputError(f"source {source} not found: point --source at a SCAN/VSE precomp folder")
    if not source.is_dir():
        raise UserInputError(f"source {source} is not a folder: point --source at a SCAN/VSE precomp folder")
    return source


def _find_splits(source: Path) -> list[str]:
    found = []
    for split in SPLITS:
        ims, caps = source / f"{split}_ims.npy", source / f"{split}_caps.txt"
        if ims.exists() != caps.exists():
            missing = caps if ims.exists() else ims
            raise UserInputError(f"{missing}: missing (each split needs both {ims.name} and {caps.name})")
        if ims.exists():
            found.append(split)
    if not found:
        raise UserInputError(f"{source}: no {{split}}_ims.npy + {{split}}_caps.txt pairs (splits: {', '.join(SPLITS)})")
    return found


def _write_images(ims: np.ndarray, ims_path: Path, n_captions: int, k: int, dst: Path) -> int:
    """Link ``ims`` into ``dst`` (or drop k-fold repeats in a stream); returns the number of images."""
    n_rows = ims.shape[0]
    if n_captions == k * n_rows:
        link_or_copy(ims_path, dst)
        return n_rows
    if k > 1 and n_captions == n_rows and n_rows % k == 0 and _rows_repeat(ims, k):
        out = np.lib.format.open_memmap(dst, mode="w+", dtype=ims.dtype, shape=(n_rows // k, *ims.shape[1:]))
        done = 0
        for chunk in iter_rows(ims, rows_per_chunk=k * 256):
            unique = chunk[::k]
            out[done : done + len(unique)] = unique
            done += len(unique)
        out.flush()
        del out
        return n_rows // k
    raise UserInputError(
        f"{ims_path}: {n_rows} images but {n_captions} captions in the matching _caps.txt; "
        f"expected {k} captions per image in image order"
    )


def _rows_repeat(ims: np.ndarray, k: int) -> bool:
    """True when every group of ``k`` consecutive rows holds one image repeated."""
    for chunk in iter_rows(ims, rows_per_chunk=k * 256):
        groups = chunk.reshape(len(chunk) // k, k, -1)
        if not (groups == groups[:, :1]).all():
            return False
    return True


def _vocabulary(config: PrepareConfig, source: Path, captions: dict[str, list[str]]) -> Vocabulary:
    given = source / "vocab.json"
    if given.is_file():
        return Vocabulary.load(given)
    if "train" not in captions:
        raise UserInputError(f"{source}: no train split to build a vocabulary from; add train_caps.txt or a vocab.json")
    return build_vocabulary(captions["train"], config.min_word_count)
