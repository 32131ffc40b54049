"""A generated cross-modal dataset whose matching is learnable and whose channels interact.

Why this generator: tests and the quickstart need image-text data with no download, where a model that
learns does far better than chance, and where a learned metric has something to learn beyond cosine.

Generative story (all from one seeded ``numpy.random.Generator``, so one seed gives identical bytes):
- ``concepts`` latent concepts, each with an appearance vector in R^F and three synonym words.
- An image holds 3 distinct concepts. Its ``regions`` region features are: one region per concept
  (appearance + noise), plus clutter regions drawn from background prototypes that no caption mentions.
  Region features are then passed through a fixed random channel mixing and a rectifier, so channels are
  correlated (interactions between channels carry the signal, not single channels).
- Each of its captions names a random subset (at least 2) of its concepts with random synonyms, in random
  order, among filler words that carry no information.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gssf_cli.core.errors import UserInputError
from gssf_cli.core.stage_configs import PrepareConfig
from gssf_cli.data.text import build_vocabulary

CONCEPTS_PER_IMAGE = 3
SYNONYMS = 3
BACKGROUNDS = 16
SPLITS = ("train", "dev", "test")


PEAK_BYTES_PER_VALUE = 3 * 8
"""Generating one split's regions holds about three float64 arrays of its ``[N, R, F]`` values at once."""
CAPTION_BYTES = 64
"""About what one caption takes on disk (a few words of ``w0123``) and in memory (a Python string)."""


def needed_bytes(config: PrepareConfig) -> tuple[int, int]:
    """``(memory, disk)``: the peak memory generating the largest split takes, and the bytes of the dataset
    folder, estimated from the sizes alone (before anything is allocated)."""
    counts = (config.train_images, config.dev_images, config.test_images)
    values = [n * config.regions * config.region_dim for n in counts]
    captions = [n * config.captions_per_image for n in counts]
    memory = max(v * PEAK_BYTES_PER_VALUE + c * CAPTION_BYTES for v, c in zip(values, captions, strict=True))
    disk = sum(values) * 4 + sum(captions) * CAPTION_BYTES
    return memory, disk


def check_size(config: PrepareConfig, out: Path) -> None:
    """Refuse sizes whose generation would not fit in the memory available now or on the disk of ``out``, with
    the numbers, instead of running for minutes and failing (or swapping) half-way."""
    from gssf_cli.core.files import available_memory, format_bytes, free_disk

    memory, disk = needed_bytes(config)
    sizes = (
        f"{config.train_images:,}/{config.dev_images:,}/{config.test_images:,} train/dev/test images of "
        f"{config.regions} x {config.region_dim} regions"
    )
    fix = "lower --train-images/--dev-images/--test-images, --regions or --region-dim"
    available = available_memory()
    if available is not None and memory > available:
        raise UserInputError(
            f"prepare: {sizes} need about {memory:,} bytes ({format_bytes(memory)}) of memory to generate, but "
            f"this machine has {available:,} bytes ({format_bytes(available)}) available; {fix}"
        )
    free = free_disk(out.parent)
    if free is not None and disk > free:
        raise UserInputError(
            f"prepare: {sizes} take about {disk:,} bytes ({format_bytes(disk)}) on disk, but {out.parent} has "
            f"{free:,} bytes ({format_bytes(free)}) free; {fix}"
        )


def write_synthetic(config: PrepareConfig, folder: Path) -> dict[str, Any]:
    rng = np.random.default_rng(config.seed)
    dim, regions = config.region_dim, config.regions
    appearance = rng.normal(size=(config.concepts, dim))
    backgrounds = rng.normal(size=(BACKGROUNDS, dim))
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    words = [f"w{i:04d}" for i in rng.permutation(config.vocab_size)]
    concept_words = np.array(words[: config.concepts * SYNONYMS]).reshape(config.concepts, SYNONYMS)
    fillers = words[config.concepts * SYNONYMS :]

    counts = {"train": config.train_images, "dev": config.dev_images, "test": config.test_images}
    splits: dict[str, Any] = {}
    train_captions: list[str] = []
    for split in SPLITS:
        n = counts[split]
        image_concepts = np.stack([rng.choice(config.concepts, CONCEPTS_PER_IMAGE, replace=False) for _ in range(n)])
        ims = _regions(rng, image_concepts, appearance, backgrounds, mixing, regions)
        captions = [
            _caption(rng, concepts, concept_words, fillers)
            for concepts in image_concepts
            for _ in range(config.captions_per_image)
        ]
        np.save(folder / f"{split}_ims.npy", ims)
        (folder / f"{split}_caps.txt").write_text("\n".join(captions) + "\n", encoding="utf-8")
        if split == "train":
            train_captions = captions
        splits[split] = {"images": n, "captions": len(captions)}

    vocab = build_vocabulary(train_captions, min_count=1)
    vocab.save(folder / "vocab.json")
    return {
        "task": "cross_modal",
        "captions_per_image": config.captions_per_image,
        "modalities": {
            "image": {"type": "regions", "shape": [regions, dim], "dtype": "float32"},
            "text": {"type": "captions", "vocab_size": len(vocab), "tokenizer": vocab.to_json()["tokenizer"]},
        },
        "splits": splits,
        "source": "generated",
        "seed": config.seed,
    }


def _regions(
    rng: np.random.Generator,
    image_concepts: np.ndarray,
    appearance: np.ndarray,
    backgrounds: np.ndarray,
    mixing: np.ndarray,
    regions: int,
) -> np.ndarray:
    """Region features ``[N, R, F]`` float32: concept regions first in random order, then clutter."""
    n, k = image_concepts.shape
    dim = appearance.shape[1]
    out = np.empty((n, regions, dim))
    shown = min(k, regions)
    out[:, :shown] = appearance[image_concepts[:, :shown]]
    clutter = regions - shown
    if clutter:
        out[:, shown:] = backgrounds[rng.integers(0, len(backgrounds), size=(n, clutter))]
    out += 0.5 * rng.normal(size=out.shape)
    order = np.argsort(rng.random((n, regions)), axis=1)
    out = np.take_along_axis(out, order[:, :, None], axis=1)
    return np.maximum(out @ mixing, 0.0).astype(np.float32)


def _caption(rng: np.random.Generator, concepts: np.ndarray, concept_words: np.ndarray, fillers: list[str]) -> str:
    mentioned = rng.permutation(concepts)[: rng.integers(2, len(concepts) + 1)]
    tokens = [str(concept_words[c, rng.integers(SYNONYMS)]) for c in mentioned]
    tokens += [fillers[i] for i in rng.integers(0, len(fillers), size=rng.integers(3, 9))]
    return " ".join(tokens[i] for i in rng.permutation(len(tokens)))
