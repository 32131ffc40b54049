"""Modal imbalance on demand: a dataset whose captions or regions say less, or say it with noise.

Why: the Rebalanced VLR question — is cross-modal matching worse when one modality is noisier or says less than
the other, and does structure-aware distillation rebalance it? — needs datasets that are imbalanced by a known,
exact amount. Four knobs, each applied to the named splits only (``train`` by default, so that evaluation stays
on clean data):

- **caption noise** ``p``: exactly ``round(p · W)`` of the split's ``W`` caption words are replaced by a random
  vocabulary word other than themselves;
- **caption insufficiency** ``p``: exactly ``round(p · C)`` of the split's ``C`` content words (words that are not
  :data:`FUNCTION_WORDS`) are dropped, every caption keeping at least one (so fewer when that forbids more; the
  share reached is recorded);
- **region noise** ``σ``: Gaussian noise whose standard deviation is ``σ`` times each region's own RMS value;
- **region insufficiency** ``p``: exactly ``round(p · K)`` of the split's ``K`` concept regions (regions showing a
  latent concept: known for generated data, ``{split}_region_concepts.npy``) are replaced by clutter regions
  drawn from the same split.

Insufficiency is applied before noise, and the noise shares count the words and regions left. The draws come
from their own generator (the dataset's seed and the knobs), so an imbalanced dataset differs from its balanced
twin exactly where it was degraded. The manifest's ``imbalance`` records the knobs, the splits and the shares
reached per split.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gssf_cli.core.errors import UserInputError
from gssf_cli.data.synthetic import CORE_FILLERS, FILLERS
from gssf_cli.data.text import SPECIALS, Vocabulary, read_captions, tokenize

if TYPE_CHECKING:
    from gssf_cli.core.stage_configs import PrepareConfig

FUNCTION_WORDS = frozenset(
    {word for _, words in FILLERS for word in words}
    | set(CORE_FILLERS)
    | set(
        [
            "the",
            "or",
            "but",
            "of",
            "in",
            "on",
            "at",
            "by",
            "for",
            "to",
            "from",
            "into",
            "onto",
            "is",
            "are",
            "was",
            "were",
            "be",
            "been",
            "it",
            "its",
            "this",
            "that",
            "these",
            "those",
        ]
    )
)
"""Words that carry no concept, for caption insufficiency: every filler word of the synthetic grammar (articles,
relations, openers, scenes such as ``on a table``) and common English function words for other captions."""
REGION_CONCEPTS = "{split}_region_concepts.npy"
"""Per region of a generated split, the concept it shows (``-1``: clutter), ``[N, R]`` int16."""
SEED_OFFSET = 0x1BA1
"""Added to the dataset's seed for the imbalance draws: other draws than the data's own."""


@dataclass(frozen=True)
class Imbalance:
    """The four knobs and the splits they apply to (see the module docstring)."""

    caption_noise: float = 0.0
    caption_insufficiency: float = 0.0
    region_noise: float = 0.0
    region_insufficiency: float = 0.0
    splits: tuple[str, ...] = ("train",)

    @classmethod
    def of(cls, config: PrepareConfig) -> Imbalance:
        return cls(config.caption_noise, config.caption_insufficiency, config.region_noise,
                   config.region_insufficiency, tuple(config.imbalance_splits))  # fmt: skip

    def any(self) -> bool:
        return any((self.caption_noise, self.caption_insufficiency, self.region_noise, self.region_insufficiency))

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "splits": list(self.splits)}


# ---------------------------------------------------------------------------------------------------------
# The math: pure functions over one split


def drop_content_words(
    captions: Sequence[list[str]], share: float, rng: np.random.Generator, content: Callable[[str], bool]
) -> tuple[list[list[str]], int, int]:
    """Drop ``round(share · C)`` of the ``C`` content words, each caption keeping one (chosen at random):
    ``(captions, dropped, C)``; fewer are dropped only when the kept ones leave too few."""
    positions = [(c, w) for c, words in enumerate(captions) for w, word in enumerate(words) if content(word)]
    kept: dict[int, int] = {}
    for c, w in rng.permutation(np.array(positions, dtype=np.int64).reshape(-1, 2)).tolist():
        kept.setdefault(c, w)
    droppable = [(c, w) for c, w in positions if kept.get(c) != w]
    count = min(round(share * len(positions)), len(droppable))
    chosen = {droppable[i] for i in rng.choice(len(droppable), count, replace=False)} if count else set()
    out = [[word for w, word in enumerate(words) if (c, w) not in chosen] for c, words in enumerate(captions)]
    return out, count, len(positions)


def replace_words(
    captions: Sequence[list[str]], share: float, rng: np.random.Generator, vocabulary: Sequence[str]
) -> tuple[list[list[str]], int, int]:
    """Replace ``round(share · W)`` of the ``W`` words by a random ``vocabulary`` word other than themselves:
    ``(captions, replaced, W)``."""
    positions = [(c, w) for c, words in enumerate(captions) for w in range(len(words))]
    count = round(share * len(positions))
    out = [list(words) for words in captions]
    if count == 0 or len(vocabulary) < 2:
        return out, 0, len(positions)
    for index in rng.choice(len(positions), count, replace=False):
        c, w = positions[index]
        word = out[c][w]
        while (new := vocabulary[int(rng.integers(len(vocabulary)))]) == word:
            pass
        out[c][w] = new
    return out, count, len(positions)


def noisy_regions(regions: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """``[N, R, F]`` plus Gaussian noise of standard deviation ``sigma`` × each region's RMS value."""
    rms = np.sqrt(np.mean(np.square(regions, dtype=np.float64), axis=-1, keepdims=True))
    return (regions + sigma * rms * rng.normal(size=regions.shape)).astype(np.float32)


def clutter_regions(
    regions: np.ndarray, concepts: np.ndarray, share: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Replace ``round(share · K)`` of the ``K`` concept regions (``concepts [N, R]`` ≥ 0) by clutter regions of
    the same split, drawn at random: ``(regions, concepts with -1 there, replaced, K)``."""
    shown = np.argwhere(concepts >= 0)
    clutter = np.argwhere(concepts < 0)
    count = round(share * len(shown))
    out, labels = np.array(regions, copy=True), np.array(concepts, copy=True)
    if count == 0:
        return out, labels, 0, len(shown)
    if len(clutter) == 0:
        raise UserInputError("--region-insufficiency: this split has no clutter regions to put in place of concepts")
    targets = shown[rng.choice(len(shown), count, replace=False)]
    sources = clutter[rng.integers(len(clutter), size=count)]
    out[targets[:, 0], targets[:, 1]] = regions[sources[:, 0], sources[:, 1]]
    labels[targets[:, 0], targets[:, 1]] = -1
    return out, labels, count, len(shown)


# ---------------------------------------------------------------------------------------------------------
# A dataset folder


def apply(folder: Path, manifest: dict[str, Any], imbalance: Imbalance, seed: int) -> dict[str, Any]:
    """Degrade ``imbalance.splits`` of the cross-modal dataset in ``folder`` in place (its manifest fields are
    ``manifest``; the caller writes the manifest); returns the record for the manifest's ``imbalance``."""
    rng = np.random.default_rng([seed, SEED_OFFSET])
    vocabulary = _vocabulary_words(folder)
    reached: dict[str, dict[str, Any]] = {}
    for split in imbalance.splits:
        reached[split] = _captions(folder, split, imbalance, rng, vocabulary) | _regions(folder, split, imbalance, rng)
    return {**imbalance.to_json(), "seed": seed, "reached": reached}


def check(manifest: dict[str, Any], imbalance: Imbalance, folder: Path, where: str) -> None:
    """Refuse, before anything is written, knobs the dataset cannot take: a dataset that is not image–caption,
    a split it lacks, and region insufficiency without a record of which regions show concepts."""
    if (
        manifest.get("task") != "cross_modal"
        or manifest.get("modalities", {}).get("text", {}).get("type") != "captions"
    ):
        raise UserInputError(f"{where}: imbalance applies to image–caption datasets (regions and captions)")
    for split in imbalance.splits:
        if split not in manifest.get("splits", {}):
            raise UserInputError(
                f"{where}: no {split!r} split to make imbalanced (it has {', '.join(manifest['splits'])})"
            )
        if imbalance.region_insufficiency and not (folder / REGION_CONCEPTS.format(split=split)).is_file():
            raise UserInputError(
                f"{where}: --region-insufficiency needs to know which regions show a concept "
                f"({REGION_CONCEPTS.format(split=split)}, which generated datasets carry); this dataset has no such record"
            )
    if (imbalance.region_noise or imbalance.region_insufficiency) and manifest["modalities"]["image"][
        "type"
    ] != "regions":
        raise UserInputError(f"{where}: region imbalance needs region features [N, R, F]")


def _vocabulary_words(folder: Path) -> list[str]:
    """The dataset's vocabulary less the special tokens: what a noisy word is drawn from."""
    return list(Vocabulary.load(folder / "vocab.json").words[len(SPECIALS) :])


def _captions(
    folder: Path, split: str, imbalance: Imbalance, rng: np.random.Generator, vocabulary: list[str]
) -> dict[str, Any]:
    if not (imbalance.caption_noise or imbalance.caption_insufficiency):
        return {}
    path = folder / f"{split}_caps.txt"
    captions = [tokenize(line) for line in read_captions(path)]
    dropped, content = 0, 0
    if imbalance.caption_insufficiency:
        captions, dropped, content = drop_content_words(
            captions, imbalance.caption_insufficiency, rng, lambda word: word not in FUNCTION_WORDS
        )
    replaced, words = 0, 0
    if imbalance.caption_noise:
        captions, replaced, words = replace_words(captions, imbalance.caption_noise, rng, vocabulary)
    path.write_text("".join(" ".join(words_) + "\n" for words_ in captions), encoding="utf-8")
    return {
        **({"caption_words_dropped": dropped, "content_words": content,
            "caption_insufficiency": dropped / max(content, 1)} if imbalance.caption_insufficiency else {}),
        **({"caption_words_replaced": replaced, "caption_words": words,
            "caption_noise": replaced / max(words, 1)} if imbalance.caption_noise else {}),
    }  # fmt: skip


def _regions(folder: Path, split: str, imbalance: Imbalance, rng: np.random.Generator) -> dict[str, Any]:
    if not (imbalance.region_noise or imbalance.region_insufficiency):
        return {}
    path = folder / f"{split}_ims.npy"
    regions = np.load(path, allow_pickle=False)
    record: dict[str, Any] = {}
    if imbalance.region_insufficiency:
        labels_path = folder / REGION_CONCEPTS.format(split=split)
        concepts = np.load(labels_path, allow_pickle=False)
        regions, concepts, replaced, shown = clutter_regions(regions, concepts, imbalance.region_insufficiency, rng)
        np.save(labels_path, concepts)
        record |= {"concept_regions_replaced": replaced, "concept_regions": shown,
                   "region_insufficiency": replaced / max(shown, 1)}  # fmt: skip
    if imbalance.region_noise:
        regions = noisy_regions(regions, imbalance.region_noise, rng)
        record["region_noise"] = imbalance.region_noise
    np.save(path, regions.astype(np.float32))
    return record


def write_imbalance(config: PrepareConfig, folder: Path) -> dict[str, Any]:
    """``--dataset imbalance --source DATASET``: a copy of a cross-modal dataset folder with the knobs applied;
    returns its manifest fields (the source's, with ``imbalance`` and ``derived_from``)."""
    from gssf_cli.core.files import manifest_digest
    from gssf_cli.data.manifest import load_manifest

    assert config.source is not None
    source = config.source
    manifest = load_manifest(source)
    imbalance = Imbalance.of(config)
    check(manifest, imbalance, source, str(source))
    for name in manifest["files"]:
        shutil.copyfile(source / name, folder / name)
    record = apply(folder, manifest, imbalance, config.seed)
    fields = {key: value for key, value in manifest.items()
              if key not in ("files", "format_version", "created_by", "name", "kind", "settings")}  # fmt: skip
    return {**fields, "imbalance": record,
            "derived_from": {"path": str(source), "manifest_sha256": manifest_digest(source),
                             "kind": manifest.get("kind")}}  # fmt: skip
