"""A user's SCAN/VSE "precomp" folder: ``{split}_ims.npy`` + ``{split}_caps.txt`` (+ optional vocab json).

Why care about memory: Flickr30K's train regions alone are ~8.5 GB. Arrays are memory-mapped and scanned
in chunks (shape, dtype, NaN/Inf); a valid array is hard-linked (or stream-copied) into the dataset folder,
never loaded whole. Some releases repeat every image ``captions_per_image`` times to align rows with
captions: that is detected (every group of rows identical) and the repeats are dropped in a stream.

``{split}_ids.txt``, where a folder has it, is kept: the image id of each image (COCO's image ids in SCAN's
``coco_precomp``, which ECCV Caption and CxC rank by, see :mod:`gssf_cli.evaluation.coco_protocols`). Real folders
write one id per caption line (SCAN's ``testall_ids.txt``: 25,000 lines, each image's id on its 5 caption lines);
one id per image is accepted too. The dataset folder always holds one id per image, one per line.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

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
        ids_path = source / f"{split}_ids.txt"
        if ids_path.exists():
            write_image_ids(folder / ids_path.name, read_image_ids(ids_path, n_images, k))
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


def read_image_ids(path: Path, n_images: int, k: int) -> NDArray[np.int64]:
    """The image id of each of ``n_images`` images ``[n_images]`` from ``path``: one non-negative integer per line,
    either one line per image or one per caption (``k`` lines per image, in image order, all holding that image's
    id). Anything else is a one-line :class:`UserInputError` naming the file."""
    if not path.is_file():
        raise UserInputError(f"{path}: not a file (image ids)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserInputError(f"{path}: not UTF-8 text; expected one integer image id per line") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip().isdigit() or not line.strip().isascii():
            raise UserInputError(
                f"{path}: line {number} is {line.strip()[:30]!r}, not an image id (a non-negative integer)"
            )
    try:
        ids = np.array([int(line) for line in lines], dtype=np.int64)
    except OverflowError:
        raise UserInputError(f"{path}: an image id does not fit in 64 bits") from None
    if len(ids) == n_images:
        return ids
    if k > 1 and len(ids) == k * n_images:
        groups = ids.reshape(n_images, k)
        differs = np.flatnonzero((groups != groups[:, :1]).any(axis=1))
        if len(differs):
            image = int(differs[0])
            raise UserInputError(
                f"{path}: lines {k * image + 1}-{k * image + k} (the captions of image {image}) hold different ids "
                f"{sorted(set(groups[image].tolist()))}; one id per caption line must repeat its image's id"
            )
        return groups[:, 0].copy()
    per_caption = f" or one per caption ({k * n_images:,})" if k > 1 else ""
    raise UserInputError(
        f"{path}: {len(ids):,} ids for {n_images:,} images; expected one id per image ({n_images:,}){per_caption}"
    )


def write_image_ids(path: Path, ids: NDArray[np.int64]) -> None:
    """One id per image, one per line (the dataset folder's layout of ``{split}_ids.txt``)."""
    path.write_text("".join(f"{int(i)}\n" for i in ids), encoding="utf-8")


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
