"""Reading a prepared dataset for training and evaluation: verified, memory-mapped, batched on demand.

Why memory-mapped: a paper-scale split (Flickr30K train regions, ~8.5 GB) does not fit in memory, so a
batch reads only its own rows. Captions are tokenised once into a flat id array (small next to regions).

A cross-modal epoch visits every caption once, paired with its image (the VSE convention). A label-based
epoch visits every item once as an anchor, paired with a random other item of its class, so the same
pair-wise losses apply to both tasks: row i of a batch is the anchor side, column j the positive side, and
``ids`` (image index or class) says which off-diagonal pairs are not negatives.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gssf_cli.core.errors import UserInputError
from gssf_cli.core.files import manifest_digest, open_array
from gssf_cli.data.manifest import load_manifest
from gssf_cli.data.text import Vocabulary, pad_ids, read_captions


@dataclass
class Batch:
    """One training or encoding batch (tensors on CPU; the trainer moves them).

    ``images`` ``[B, R, F]`` / ``[B, F]`` (or label-based anchors ``[B, F]``); ``texts`` either token ids
    ``[B, L]`` with ``lengths`` ``[B]`` or features ``[B, F']`` (label-based: the positives ``[B, F]``);
    ``ids`` ``[B]`` image index or class label of each pair. A data-parallel worker's training batch holds the
    inputs of its own rows only, and the ids of the whole global batch.
    """

    images: torch.Tensor
    texts: torch.Tensor
    lengths: torch.Tensor | None
    ids: torch.Tensor


class TokenizedCaptions:
    """All captions of a split as one flat id array plus offsets (cheap to slice into padded batches)."""

    def __init__(self, captions: list[str], vocab: Vocabulary) -> None:
        encoded = [vocab.encode(c) for c in captions]
        self.lengths = np.array([len(e) for e in encoded], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        self.ids = np.fromiter((t for e in encoded for t in e), dtype=np.int64, count=int(self.lengths.sum()))

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded ids ``[B, L]`` (L = longest in the batch) and lengths ``[B]``."""
        padded, lengths = pad_ids([self.ids[self.offsets[row] : self.offsets[row + 1]] for row in rows])
        return torch.from_numpy(padded), torch.from_numpy(lengths)


class Split:
    """One split of a dataset: what a batch of given row indices looks like."""

    def __init__(self, folder: Path, manifest: dict[str, Any], name: str, vocab: Vocabulary | None) -> None:
        if name not in manifest["splits"]:
            raise UserInputError(f"{folder}: no {name!r} split (has {', '.join(manifest['splits'])})")
        self.name = name
        self.task: str = manifest["task"]
        if self.task == "cross_modal":
            self.k: int = manifest["captions_per_image"]
            self.images = np.load(folder / f"{name}_ims.npy", mmap_mode="r")
            self.captions: TokenizedCaptions | None = None
            self.text_features: np.ndarray | None = None
            if manifest["modalities"]["text"]["type"] == "captions":
                assert vocab is not None
                self.captions = TokenizedCaptions(read_captions(folder / f"{name}_caps.txt"), vocab)
            else:
                self.text_features = np.load(folder / f"{name}_txts.npy", mmap_mode="r")
            self.num_pairs = self.k * len(self.images)
        else:
            self.k = 1
            self.images = np.load(folder / f"{name}_feats.npy", mmap_mode="r")
            self.labels = np.load(folder / f"{name}_labels.npy")
            self.num_pairs = len(self.labels)

    @property
    def num_images(self) -> int:
        return len(self.images)

    def image_batch(self, rows: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.images[rows], dtype=np.float32))

    def text_batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Texts ``rows`` (caption indices): token ids + lengths, or features + None."""
        if self.captions is not None:
            return self.captions.batch(rows)
        assert self.text_features is not None
        return torch.from_numpy(np.asarray(self.text_features[rows], dtype=np.float32)), None

    def pair_batches(self, batch_size: int, generator: torch.Generator) -> list[np.ndarray]:
        """Shuffled pair indices of one epoch in batches (the last may be smaller, never below 2)."""
        order = torch.randperm(self.num_pairs, generator=generator).numpy()
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        if len(batches) > 1 and len(batches[-1]) < 2:
            batches[-2] = np.concatenate(batches[-2:])
            batches.pop()
        return batches

    def training_batch(self, pairs: np.ndarray, generator: torch.Generator, rows: slice = slice(None)) -> Batch:
        """The training batch of ``pairs`` ``[B]``, loading only the inputs of ``rows`` (a data-parallel worker's
        share; ``ids`` always covers all ``B`` pairs, since every negative of the global batch counts). Random
        draws are made for all ``B`` pairs whatever ``rows`` is, so every worker's generator stays in step with a
        single process's."""
        if self.task == "cross_modal":
            image_rows = pairs // self.k
            texts, lengths = self.text_batch(pairs[rows])
            return Batch(self.image_batch(image_rows[rows]), texts, lengths, torch.from_numpy(image_rows))
        labels = self.labels[pairs]
        partners = self._same_class_partners(pairs, generator)
        return Batch(self.image_batch(pairs[rows]), self.image_batch(partners[rows]), None, torch.from_numpy(labels))

    def _same_class_partners(self, anchors: np.ndarray, generator: torch.Generator) -> np.ndarray:
        """A random other item of the same class for each anchor (itself if its class has one item)."""
        if not hasattr(self, "_by_class"):
            order = np.argsort(self.labels, kind="stable")
            classes, starts, counts = np.unique(self.labels[order], return_index=True, return_counts=True)
            self._by_class = (
                order,
                dict(zip(classes.tolist(), zip(starts.tolist(), counts.tolist(), strict=True), strict=True)),
            )
        order, spans = self._by_class
        draws = torch.rand(len(anchors), generator=generator).numpy()
        partners = np.empty_like(anchors)
        for i, anchor in enumerate(anchors):
            start, count = spans[int(self.labels[anchor])]
            if count == 1:
                partners[i] = anchor
                continue
            pick = order[start + int(draws[i] * (count - 1))]
            partners[i] = pick if pick != anchor else order[start + count - 1]
        return partners


class Dataset:
    """A verified dataset folder (checksums re-checked on open)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.manifest = load_manifest(folder)
        self.digest = manifest_digest(folder)
        self.name: str = self.manifest["name"]
        self.task: str = self.manifest["task"]
        self.vocab = Vocabulary.load(folder / "vocab.json") if (folder / "vocab.json").is_file() else None
        check_split_files(folder, self.manifest, self.vocab is not None)
        self._splits: dict[str, Split] = {}

    def split(self, name: str) -> Split:
        if name not in self._splits:
            self._splits[name] = Split(self.folder, self.manifest, name, self.vocab)
        return self._splits[name]

    def has_split(self, name: str) -> bool:
        return name in self.manifest["splits"]

    def split_content(self, name: str) -> dict[str, Any]:
        """What measuring on split ``name`` reads, by content: the task, the modalities, and the checksums of the
        split's files and of the vocabulary. Two datasets with equal ``split_content`` give every model the same
        inputs on that split, whatever their other splits hold (an imbalanced train split, say)."""
        files = self.manifest["files"]
        read = sorted(f for f in files if f.startswith(f"{name}_") or f == "vocab.json")
        return {
            "task": self.task,
            "captions_per_image": self.manifest.get("captions_per_image"),
            "modalities": self.manifest["modalities"],
            "files": {f: files[f]["sha256"] for f in read},
        }


def check_split_files(folder: Path, manifest: dict[str, Any], has_vocab: bool) -> None:
    """Every split's files agree with the manifest: present, readable, numeric (float features, integer labels),
    the manifest's item shape, its counts, and not empty. Only array headers and caption line counts are read, so
    a stage refuses a damaged or hand-edited dataset before it opens a run instead of failing in an epoch."""
    task = manifest["task"]
    modalities = manifest["modalities"]
    for split, counts in manifest["splits"].items():
        if task == "labels":
            items = counts["items"]
            _check_array(folder, f"{split}_feats.npy", items, modalities["features"]["shape"], "f")
            _check_array(folder, f"{split}_labels.npy", items, [], "i")
            continue
        images, captions = counts["images"], counts["captions"]
        if captions != manifest["captions_per_image"] * images:
            raise UserInputError(
                f"{folder}: the {split} split lists {images} images but {captions} captions, not "
                f"{manifest['captions_per_image']} per image; prepare the dataset again"
            )
        _check_array(folder, f"{split}_ims.npy", images, modalities["image"]["shape"], "f")
        text = modalities["text"]
        if text["type"] != "captions":
            _check_array(folder, f"{split}_txts.npy", captions, text["shape"], "f")
            continue
        if not has_vocab:
            raise UserInputError(f"{folder}/vocab.json: missing (the captions need it); prepare the dataset again")
        path = folder / f"{split}_caps.txt"
        if not path.is_file():
            raise UserInputError(f"{path}: missing; prepare the dataset again")
        lines = len(path.read_bytes().splitlines())
        if lines != captions:
            raise UserInputError(f"{path}: {lines} captions, the manifest lists {captions}; prepare the dataset again")


def _check_array(folder: Path, name: str, rows: int, item_shape: list[int], kind: str) -> None:
    """``folder/name`` holds ``rows`` rows of ``item_shape`` (the manifest's; for regions ``[R, F]`` the region
    count may differ from it) of floating (``kind`` "f") or integer ("i") values."""
    path = folder / name
    array = open_array(path, "listed in the manifest")
    fix = "prepare the dataset again"
    if kind == "f" and not np.issubdtype(array.dtype, np.floating):
        raise UserInputError(f"{path}: expected floating-point values, got dtype {array.dtype}; {fix}")
    if kind == "i" and not np.issubdtype(array.dtype, np.integer):
        raise UserInputError(f"{path}: expected integer labels, got dtype {array.dtype}; {fix}")
    if array.ndim != 1 + len(item_shape) or list(array.shape[1:][-1:]) != item_shape[-1:]:
        expected = ["N", *item_shape]
        raise UserInputError(f"{path}: expected shape {expected}, got {list(array.shape)}; {fix}")
    if len(array) != rows:
        raise UserInputError(f"{path}: {len(array)} rows, the manifest lists {rows}; {fix}")
    if rows == 0:
        raise UserInputError(f"{path}: the split is empty; {fix}")
