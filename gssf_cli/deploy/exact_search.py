"""The exact answer an approximate index is measured against: top-k by inner product in numpy, in bounded memory,
and recall@k of an index's hits against it. No faiss, so the reference shares no code with what it checks."""

from __future__ import annotations

from typing import Final

import numpy as np

SCORE_BLOCK_BYTES: Final = 256 * 2**20
""":func:`exact_search` computes scores in gallery-row chunks of at most this many bytes."""


def exact_search(
    gallery: np.ndarray, queries: np.ndarray, k: int, chunk: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` by inner product without faiss: ``(scores [Q, k], rows [Q, k])`` as :func:`search`.

    ``gallery [N, D]`` is scored in chunks of ``chunk`` rows (``None``: a ~256 MiB score block), so memory stays
    bounded by the block whatever N. Each chunk's scores ``[Q, chunk]`` are first compared with every query's
    current k-th best score: only the rows above it (few, once the first chunks have been seen) are merged, so
    the top-k costs about one comparison per score instead of a partition.
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    n = gallery.shape[0]
    rows_per_chunk = chunk or max(k, SCORE_BLOCK_BYTES // (4 * max(q.shape[0], 1)))
    best_scores = np.full((q.shape[0], k), -np.inf, dtype=np.float32)
    best_rows = np.full((q.shape[0], k), -1, dtype=np.int64)
    for start in range(0, n, rows_per_chunk):
        block = q @ np.asarray(gallery[start : start + rows_per_chunk], dtype=np.float32).T
        best_scores, best_rows = _merge_block(best_scores, best_rows, block, start)
    return sorted_best(best_scores, best_rows)


def _merge_block(
    best_scores: np.ndarray, best_rows: np.ndarray, block: np.ndarray, offset: int
) -> tuple[np.ndarray, np.ndarray]:
    """Merge a score block ``[Q, C]`` (gallery rows ``offset..offset+C``) into the running top-k ``[Q, k]``.

    Only scores above a query's current k-th best can enter. Once a few blocks are in, those are a handful per
    query and are gathered sparsely; while they are many (the first block) each row is partitioned whole.
    """
    k = best_scores.shape[1]
    above = block > best_scores.min(axis=1, keepdims=True)
    if np.count_nonzero(above) > k * block.shape[0]:
        cols = _top_columns(block, k)
        scores, rows = np.take_along_axis(block, cols, 1), offset + cols
    else:
        scores, rows = _gather_above(block, above, offset)
    return top_k(np.hstack([best_scores, scores]), np.hstack([best_rows, rows]), k)


def _gather_above(block: np.ndarray, above: np.ndarray, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """The marked scores of ``block [Q, C]`` packed left into ``[Q, most marked in a row]`` (-inf / -1 padding)."""
    query, col = np.nonzero(above)
    counts = np.bincount(query, minlength=block.shape[0])
    slot = np.arange(query.size) - np.repeat(np.cumsum(counts) - counts, counts)
    width = int(counts.max(initial=0))
    scores = np.full((block.shape[0], width), -np.inf, dtype=np.float32)
    rows = np.full((block.shape[0], width), -1, dtype=np.int64)
    scores[query, slot] = block[query, col]
    rows[query, slot] = offset + col
    return scores, rows


def _top_columns(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the ``min(k, C)`` largest entries of each row of ``scores [Q, C]``, unordered."""
    if scores.shape[1] <= k:
        return np.broadcast_to(np.arange(scores.shape[1]), scores.shape).copy()
    return np.argpartition(scores, scores.shape[1] - k, axis=1)[:, -k:]


def top_k(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    cols = _top_columns(scores, k)
    return np.take_along_axis(scores, cols, 1), np.take_along_axis(rows, cols, 1)


def sorted_best(scores: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best first; equal scores in row order, and the empty places (row -1) last."""
    missing = rows < 0
    order = np.lexsort((np.where(missing, np.iinfo(np.int64).max, rows), -scores), axis=1)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of ``|found_i ∩ exact_i| / |exact_i|``, ignoring row -1 on both sides.

    ``found [Q, k']`` and ``exact [Q, k]`` are row ids (``k' != k`` measures recall of k in k'). Queries with no
    exact rows (an empty gallery) are left out; with none left the recall is 1.0 (there was nothing to find).
    """
    if found.shape[0] != exact.shape[0]:
        raise ValueError(f"found has {found.shape[0]} queries, exact has {exact.shape[0]}")
    ratios = []
    for got, want in zip(found, exact, strict=True):
        truth = set(want[want >= 0].tolist())
        if truth:
            ratios.append(len(truth & set(got[got >= 0].tolist())) / len(truth))
    return float(np.mean(ratios)) if ratios else 1.0
