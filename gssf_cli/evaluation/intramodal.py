"""Intra-modal retrieval: image → image and caption → caption, where the dataset says what is relevant.

Why: Rebalanced VLR claims that structure-aware distillation "simultaneously enhances single-modal retrieval";
testing that needs i2i and t2t metrics beside the cross-modal ones. Relevance comes from the dataset
(:func:`relevance_of`):

- generated data records each image's latent concepts (``{split}_concepts.npy`` ``[N, 3]``) and the concepts each
  caption names (``{split}_caption_concepts.npy`` ``[kN, 3]``, -1 padding): two items are relevant when they share
  a concept;
- paired features with labels (``{split}_labels.npy`` ``[N]``, a class per image, its captions' too): two items are
  relevant when they share the label;
- otherwise the captions of one image are relevant to each other (t2t only; images have no relevance source).

Scores are the cosine of the model's pooled, unit embeddings (``[M, D]``; for an interaction model the L2-normalised
mean of its unit tokens, as :class:`gssf_cli.modeling.model.SplitScorer` gives them): the learned head scores an
image against a caption, not two items of one modality. Each query is ranked against every other item of its
side (itself left out) under evaluation's pessimistic tie rule: a non-relevant item scoring as high as a relevant
one ranks above it. Per query: ``r{K}`` = 100 if a relevant item is in the top K, ``map_at_r`` = 100 × AP over
the top R, R its number of relevant items (MAP@R, Musgrave et al. 2020). Queries with no relevant item are left
out of the means (``skipped``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

SIDES = ("i2i", "t2t")
KS = (1, 5, 10)
BLOCK_ELEMENTS = 2**22
"""Query rows × items scored and ranked at a time: bounds memory whatever the split's size."""
COUNT_BELOW = 16
"""Rows with at most this many relevant items have their places counted, not sorted (:func:`_ranked_relevance`);
the count holds ``[q, R, M]`` booleans, so blocks shrink by R then."""


@dataclass(frozen=True)
class Relevance:
    """What is relevant among ``M`` items of one side: ``sets [M, K]`` (values ≥ 0; -1 pads), two items being
    relevant when their sets share a value, and where the sets come from (``source``)."""

    sets: np.ndarray
    source: str

    def block(self, rows: slice) -> np.ndarray:
        """``[q, M]``: which items are relevant to queries ``rows`` (an item is never relevant to itself)."""
        queries, items = self.sets[rows], self.sets
        shared = (queries[:, None, :, None] == items[None, :, None, :]) & (queries[:, None, :, None] >= 0)
        relevant = shared.any(axis=(2, 3))
        start = rows.start or 0
        relevant[np.arange(relevant.shape[0]), np.arange(start, start + relevant.shape[0])] = False
        return relevant


def relevance_of(folder: Path, split: str, images: int, captions_per_image: int) -> dict[str, Relevance]:
    """The relevance sources a cross-modal split has: ``i2i`` from the images' concepts, ``t2t`` from the
    captions' concepts, else from their images (see the module docstring)."""
    found: dict[str, Relevance] = {}
    concepts = _array(folder / f"{split}_concepts.npy", images)
    labels = _array(folder / f"{split}_labels.npy", images)
    if concepts is not None:
        found["i2i"] = Relevance(concepts, "shared latent concept")
    elif labels is not None:
        found["i2i"] = Relevance(labels, "same label")
    named = _array(folder / f"{split}_caption_concepts.npy", images * captions_per_image)
    if named is not None:
        found["t2t"] = Relevance(named, "shared latent concept")
    elif labels is not None:
        found["t2t"] = Relevance(np.repeat(labels, captions_per_image, axis=0), "same label")
    else:
        own = np.repeat(np.arange(images), captions_per_image)[:, None]
        found["t2t"] = Relevance(own, "captions of the same image")
    return found


def _array(path: Path, rows: int) -> np.ndarray | None:
    if not path.is_file():
        return None
    array = np.load(path, allow_pickle=False)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2 or array.shape[0] != rows or array.dtype.kind not in "iu":
        return None
    return array.astype(np.int64)


@dataclass(frozen=True)
class IntraModal:
    """Per-query values of one side: ``hits[K]`` ``[M]`` (0 or 100) and ``ap`` ``[M]`` (0..100), NaN for queries
    with no relevant item."""

    side: str
    hits: dict[int, np.ndarray]
    ap: np.ndarray
    source: str

    def metrics(self) -> dict[str, float]:
        """``{side}_r{K}`` and ``{side}_map_at_r``: means over the queries that have a relevant item (none when no
        query has one)."""
        if self.skipped == len(self.ap):
            return {}
        out = {f"{self.side}_r{k}": float(np.nanmean(v)) for k, v in self.hits.items()}
        out[f"{self.side}_map_at_r"] = float(np.nanmean(self.ap))
        return out

    @property
    def skipped(self) -> int:
        return int(np.isnan(self.ap).sum())


def intra_modal(side: str, embeddings: np.ndarray, relevance: Relevance, ks: tuple[int, ...] = KS) -> IntraModal:
    """Rank every item of ``embeddings [M, D]`` (unit rows) against the others by cosine and measure it against
    ``relevance`` (see the module docstring), ``BLOCK_ELEMENTS`` scores at a time."""
    units = np.ascontiguousarray(embeddings, dtype=np.float32)
    m = len(units)
    hits = {k: np.full(m, np.nan) for k in ks}
    ap = np.full(m, np.nan)
    rows_per_block = max(1, BLOCK_ELEMENTS // max(m * COUNT_BELOW, 1))
    for start in range(0, m, rows_per_block):
        rows = slice(start, min(start + rows_per_block, m))
        scores = units[rows] @ units.T
        scores[np.arange(scores.shape[0]), np.arange(rows.start, rows.stop)] = -np.inf
        relevant = relevance.block(rows)
        count = relevant.sum(axis=1)
        ranked = _ranked_relevance(scores, relevant, int(count.max(initial=0)), max(ks))
        has = count > 0
        for k in ks:
            hits[k][rows] = np.where(has, 100.0 * ranked[:, :k].any(axis=1), np.nan)
        ap[rows] = np.where(has, 100.0 * _ap_at_r(ranked, count), np.nan)
    return IntraModal(side, hits, ap, relevance.source)


def _ranked_relevance(scores: np.ndarray, relevant: np.ndarray, most: int, deepest_k: int) -> np.ndarray:
    """``[q, depth]``: whether the item at each of the first ``depth = max(most, deepest_k)`` places of each row's
    ranking is relevant, under the tie rule (non-relevant before relevant among equal scores, relevant items among
    themselves by index). With few relevant items a row (:data:`COUNT_BELOW`) each one's place is counted —
    ``#non-relevant scoring ≥ it + #relevant scoring > it (or equal, earlier)``, O(R·M) — instead of sorting the
    row, O(M log M): at COCO's 25,000 captions with 4 relevant each, seconds instead of minutes."""
    depth = min(max(most, deepest_k), scores.shape[1])
    if most > COUNT_BELOW:
        order = np.lexsort((relevant, -scores), axis=1)
        return np.take_along_axis(relevant, order, axis=1)[:, :depth]
    rows, columns = np.nonzero(relevant)
    slot = np.arange(len(rows)) - np.repeat(
        np.cumsum(relevant.sum(axis=1)) - relevant.sum(axis=1), relevant.sum(axis=1)
    )
    items = np.full((scores.shape[0], max(most, 1)), -1, dtype=np.int64)
    items[rows, slot] = columns
    mine = np.where(items >= 0, np.take_along_axis(scores, np.maximum(items, 0), axis=1), np.nan)  # [q, R]
    ahead = ((scores[:, None, :] >= mine[:, :, None]) & ~relevant[:, None, :]).sum(axis=2)
    before = (scores[:, None, :] > mine[:, :, None]) | (
        (scores[:, None, :] == mine[:, :, None]) & (np.arange(scores.shape[1])[None, None, :] < items[:, :, None])
    )
    ahead += (before & relevant[:, None, :]).sum(axis=2)
    ranked = np.zeros((scores.shape[0], depth), dtype=bool)
    placed = (items >= 0) & (ahead < depth)
    ranked[np.nonzero(placed)[0], ahead[placed]] = True
    return ranked


def _ap_at_r(ranked: np.ndarray, count: np.ndarray) -> np.ndarray:
    """AP over each row's top R (R = ``count``): ``(1/R) Σ_{i≤R} P@i · rel_i``, 0 where R = 0."""
    depth = int(count.max(initial=0))
    top = ranked[:, :depth].astype(np.float64)
    precision = np.cumsum(top, axis=1) / np.arange(1, depth + 1)
    within = np.arange(depth)[None, :] < count[:, None]
    return (precision * top * within).sum(axis=1) / np.maximum(count, 1)


def split_intra_modal(
    folder: Path, split: str, images: np.ndarray, texts: np.ndarray, captions_per_image: int
) -> tuple[dict[str, float], dict[str, IntraModal], dict[str, str | None]]:
    """A cross-modal split's intra-modal retrieval from its pooled unit embeddings ``images [N, D]``, ``texts
    [kN, D]``: ``(metrics, per-side values, each side's relevance source or None)``."""
    relevance = relevance_of(folder, split, len(images), captions_per_image)
    sides = {"i2i": images, "t2t": texts}
    found = {side: intra_modal(side, sides[side], relevance[side]) for side in SIDES if side in relevance}
    metrics = {key: value for values in found.values() for key, value in values.metrics().items()}
    return metrics, found, {side: relevance[side].source if side in relevance else None for side in SIDES}


def unit_columns(found: dict[str, IntraModal], images: int, captions_per_image: int) -> dict[str, np.ndarray]:
    """Per-image values ``[N]`` of each side's metrics, for ``gssf compare``'s units (an image with its captions):
    an image's own i2i values, the mean of its captions' t2t values. A side with a query that has no relevant
    item is left out (its unit would have no value)."""
    columns: dict[str, np.ndarray] = {}
    for side, values in found.items():
        named = {f"{side}_r{k}": v for k, v in values.hits.items()} | {f"{side}_map_at_r": values.ap}
        if any(np.isnan(v).any() for v in named.values()):
            continue
        per = 1 if side == "i2i" else captions_per_image
        columns |= {name: v.reshape(images, per).mean(axis=1) for name, v in named.items()}
    return columns
