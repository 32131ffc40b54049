"""Can a split measure retrieval? The rule ``gssf prepare`` and training both apply to evaluation splits.

Why: a label-based dev split with one class makes every item relevant to every query, so MAP@R and the
other metrics are 1.0 whatever the model does; training then keeps epoch 1 as "best", and that is the
checkpoint evaluate and export use. A cross-modal split with one image has nothing to rank. The minimums
live in :mod:`gssf_cli.core.limits`; this module applies them to a dataset folder (or a staging folder that
``prepare`` is still writing) and its manifest fields.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gssf_cli.core.errors import UserInputError
from gssf_cli.core.limits import MIN_CLASS_ITEMS, MIN_SPLIT_CLASSES, MIN_SPLIT_IMAGES

LABELS_RULE = (
    f"label-based retrieval needs at least {MIN_SPLIT_CLASSES} classes and a class with at least "
    f"{MIN_CLASS_ITEMS} items, so that queries have positives to find among negatives"
)
CROSS_MODAL_RULE = f"cross-modal retrieval needs at least {MIN_SPLIT_IMAGES} images to rank"


def labels_problem(class_sizes: Sequence[int] | np.ndarray) -> str | None:
    """Why a label-based split with these class sizes cannot rank (``"has 1 class (...)"``), or None."""
    sizes = [int(n) for n in class_sizes if int(n) > 0]
    if len(sizes) < MIN_SPLIT_CLASSES:
        noun = "class" if len(sizes) == 1 else "classes"
        return f"has {len(sizes)} {noun} ({LABELS_RULE})"
    if max(sizes) < MIN_CLASS_ITEMS:
        return f"has {len(sizes)} classes but none with {MIN_CLASS_ITEMS} items ({LABELS_RULE})"
    return None


def images_problem(images: int) -> str | None:
    """Why a cross-modal split with this many images cannot rank, or None."""
    if images < MIN_SPLIT_IMAGES:
        return f"has {images} image{'' if images == 1 else 's'} ({CROSS_MODAL_RULE})"
    return None


def split_problem(folder: Path, manifest: Mapping[str, Any], split: str) -> str | None:
    """Why ``split`` of the dataset in ``folder`` cannot rank, or None.

    ``manifest`` needs ``task`` and ``splits`` (the fields a writer returns are enough). Label-based splits
    are judged from their ``{split}_labels.npy`` (class sizes are not in the manifest), cross-modal ones from
    the manifest's image count.
    """
    if manifest["task"] == "labels":
        labels = np.load(folder / f"{split}_labels.npy", mmap_mode="r")
        _, sizes = np.unique(np.asarray(labels), return_counts=True)
        return labels_problem(sizes)
    return images_problem(int(manifest["splits"][split]["images"]))


def check_prepared_splits(folder: Path, fields: Mapping[str, Any]) -> None:
    """Refuse a freshly written dataset whose dev/test (any non-train) split cannot rank: a one-line
    :class:`UserInputError` naming the split and the fix. ``fields``: the writer's manifest fields plus
    ``kind``."""
    for split in fields["splits"]:
        if split == "train":
            continue
        problem = split_problem(folder, fields, split)
        if problem is not None:
            raise UserInputError(f"prepare: the {split} split {problem}; {_prepare_fix(fields, split)}")


def _prepare_fix(fields: Mapping[str, Any], split: str) -> str:
    kind = fields["kind"]
    what = "classes" if fields["task"] == "labels" else "images"
    if kind == "synthetic":
        return f"raise --{split}-images to at least {MIN_SPLIT_IMAGES}"
    if kind == "digits" and split == "dev":
        return "raise --dev-fraction"
    if kind == "features" and fields.get("seed") is not None and split in ("dev", "test"):
        # the features writer records a seed only when it split the data itself
        return f"raise --{split}-fraction or give a split {split} set ({split}_-prefixed arrays)"
    return f"give the source's {split} split more {what}"
