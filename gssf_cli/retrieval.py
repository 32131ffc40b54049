"""Retrieval metrics for cross-modal (image-text) and label-based evaluation, exact and in bounded memory.

Why this module exists: the usual evaluation code (VSE++, SCAN, VSE∞) materialises the whole score matrix
and argsorts every query's row, which needs O(N·M) memory and costs more than computing the scores. A rank
only needs *counts* of gallery items scoring at or above each positive of the query. With few positives
(cross-modal: the k captions of an image, the one image of a caption) the counts come from vectorised
compare-and-count passes over cache-sized tiles, no sorting at all. With many positives (label-based: a whole
class) each tile row is sorted once, values only, and all positives are located by binary search.

Inputs are numpy arrays or torch tensors. Each metric function takes EITHER embeddings plus an optional
``score_fn`` (default: inner product, i.e. cosine for L2-normalised embeddings) OR a ready score matrix
``scores=``. Both are consumed as row chunks of ``[rows, M]`` sized by ``memory_budget_bytes``
(:func:`iter_score_chunks`); the working memory beyond one chunk is a few cache-sized tiles. Computation
runs in torch on the inputs' device, in ``dtype`` (float32 by default); only the value sorts of CPU tiles go
through numpy, whose SIMD sort is much faster than torch's on CPU.

Tie rule (pessimistic): a non-relevant item that scores *exactly the same* as a relevant one is ranked above
it. Ties therefore always count against the query: a constant score matrix gets R@1 = 0 unless a query has
no non-relevant candidate at all. Relevant items tied among themselves are interchangeable (best rank and
average precision do not depend on their order).

Cross-modal (:func:`evaluate_cross_modal`): N images, k·N captions in image order (captions ``k*i ..
k*i+k-1`` belong to image i), S ``[N, kN]``. 0-based ranks:

- i2t rank of image i = #non-positive captions j with ``S[i, j] >= max of S over i's k positives``;
- t2i rank of caption j = #images i' != img(j) with ``S[i', j] >= S[img(j), j]`` (same S, its columns, so an
  asymmetric score is handled as in the literature);
- R@K = 100·mean(rank < K); medr = floor(median(rank)) + 1; meanr = mean(rank) + 1; rsum = the true sum of
  all i2t and t2i R@K (600 at most for ks = (1, 5, 10));
- i2t_map = 100·mean over images of AP over the k positives, in the tie-broken order (negatives before
  positives on ties). Percent, like the recalls next to it.

Label-based (:func:`evaluate_labels`), as pytorch-metric-learning's AccuracyCalculator but exact over the
whole gallery: fractions in [0, 1] for ``r_at_K`` (a relevant item in the top K), ``precision_at_1``,
``map`` (AP over the full ranking), ``map_at_r`` and ``r_precision`` (R = #relevant items of the query).
When the gallery is the query set, each query is removed from its own gallery. Queries with no relevant
gallery item are skipped: they count in no mean, and are reported as ``num_skipped``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from gssf_cli.limits import PROTOCOLS

__all__ = [
    "CROSS_MODAL_PROTOCOLS",
    "DEFAULT_MEMORY_BUDGET_BYTES",
    "ArrayLike",
    "CrossModalRanks",
    "LabelsLike",
    "RetrievalInputError",
    "ScoreFn",
    "cross_modal_metrics",
    "cross_modal_ranks",
    "evaluate_cross_modal",
    "evaluate_labels",
    "inner_product",
    "iter_score_chunks",
    "rows_per_chunk",
]

ArrayLike = NDArray[Any] | Tensor
LabelsLike = NDArray[Any] | Tensor | Sequence[Any]
ScoreFn = Callable[[Tensor, Tensor], Tensor]

DEFAULT_MEMORY_BUDGET_BYTES = 256 * 2**20
CROSS_MODAL_PROTOCOLS = PROTOCOLS
_PROTOCOL_IMAGES = {"f30k-1k": 1_000, "coco-1k": 5_000, "coco-5k": 5_000}
_COCO_1K_FOLD_IMAGES = 1_000

_TILE_ELEMENTS = 2**20
_MAX_COMPARE_PASSES = 8
_PARALLEL_SORT_ELEMENTS = 2**18
_PARTIAL_SORT_MAX_FRACTION = 0.5
_POSITIVE_PASS_IMAGES = 128


class RetrievalInputError(ValueError):
    """Inputs that cannot be evaluated as asked (the CLI reports the message and exits with code 2)."""


def inner_product(queries: Tensor, gallery: Tensor) -> Tensor:
    """Default score: ``[Bq, D] x [Bg, D] -> [Bq, Bg]``; cosine similarity for L2-normalised embeddings."""
    return queries @ gallery.T


# ----------------------------------------------------------------------------------------------------------
# Input conversion and validation


def _as_tensor(x: ArrayLike, name: str, dtype: torch.dtype, device: torch.device | None = None) -> Tensor:
    """numpy or torch -> detached tensor of ``dtype`` (on ``device`` if given, else where it already is)."""
    try:
        t = torch.as_tensor(x).detach()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise RetrievalInputError(f"{name} must be a numeric array or tensor ({exc})") from None
    if t.is_complex() or t.dtype == torch.bool:
        raise RetrievalInputError(f"{name} must be real-valued, got dtype {t.dtype}")
    return t.to(device=device if device is not None else t.device, dtype=dtype)


def _embeddings(x: ArrayLike, name: str, dtype: torch.dtype, device: torch.device | None = None) -> Tensor:
    """Validated embedding matrix ``[N, D]`` with N, D >= 1 and only finite values."""
    t = _as_tensor(x, name, dtype, device)
    if t.ndim != 2:
        raise RetrievalInputError(f"{name} must be a 2-D [N, D] matrix, got shape {list(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise RetrievalInputError(f"{name} is empty (shape {list(t.shape)})")
    if not _all_finite(t):
        raise RetrievalInputError(f"{name} contains NaN or Inf")
    return t


def _all_finite(x: Tensor) -> bool:
    """One allocation-free reduction: min and max propagate NaN, and are infinite iff some value is."""
    low, high = torch.aminmax(x)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _check_dtype(dtype: torch.dtype) -> None:
    if not dtype.is_floating_point:
        raise RetrievalInputError(f"dtype must be a floating-point torch dtype, got {dtype}")


def _check_budget(memory_budget_bytes: int) -> None:
    if memory_budget_bytes < 1:
        raise RetrievalInputError(f"memory_budget_bytes must be >= 1, got {memory_budget_bytes}")


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    """Distinct cut-offs in increasing order (duplicates would double-count in rsum)."""
    try:
        values = [int(k) for k in ks]
    except (TypeError, ValueError):
        raise RetrievalInputError(f"ks must be positive integers, got {ks!r}") from None
    if not values or any(k < 1 or k != kk for k, kk in zip(values, ks, strict=True)):
        raise RetrievalInputError(f"ks must be a non-empty list of positive integers, got {list(ks)!r}")
    return tuple(sorted(set(values)))


def _score_matrix_shape(scores: ArrayLike) -> tuple[int, int]:
    shape = tuple(scores.shape)
    if len(shape) != 2:
        raise RetrievalInputError(f"scores must be a 2-D matrix, got shape {list(shape)}")
    if shape[0] == 0 or shape[1] == 0:
        raise RetrievalInputError(f"scores is empty (shape {list(shape)})")
    return int(shape[0]), int(shape[1])


def _check_one_source(what: str, embeddings_given: bool, score_fn: ScoreFn | None, scores: ArrayLike | None) -> None:
    if scores is not None and (embeddings_given or score_fn is not None):
        raise RetrievalInputError(f"give either {what} (with an optional score_fn) or scores=, not both")
    if scores is None and not embeddings_given:
        raise RetrievalInputError(f"give {what} or a ready score matrix scores=")


# ----------------------------------------------------------------------------------------------------------
# Scores in chunks


def rows_per_chunk(num_columns: int, element_size: int, memory_budget_bytes: int) -> int:
    """Rows of a ``[rows, num_columns]`` score block that fit the budget (at least one row, so a budget
    smaller than a single row still makes progress)."""
    return max(1, memory_budget_bytes // max(1, num_columns * element_size))


def iter_score_chunks(
    queries: ArrayLike | None = None,
    gallery: ArrayLike | None = None,
    *,
    score_fn: ScoreFn | None = None,
    scores: ArrayLike | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    dtype: torch.dtype = torch.float32,
) -> Iterator[tuple[int, Tensor]]:
    """Yield ``(first_row, block)`` covering the query-by-gallery score matrix top to bottom.

    Why: the full ``[N, M]`` matrix may not fit in memory, and every metric here only needs one row block at a
    time. ``block`` is ``[rows, M]`` with ``rows`` from :func:`rows_per_chunk`, either
    ``score_fn(queries[first_row : first_row + rows], gallery)`` (queries ``[N, D]``, gallery ``[M, D]``) or
    the same rows of a ready ``scores`` ``[N, M]``. Every block is checked for NaN/Inf, so a score_fn that
    overflows is reported rather than silently ranked. Blocks may be views of ``scores``: do not modify them.
    """
    _check_dtype(dtype)
    _check_budget(memory_budget_bytes)
    if scores is not None:
        _check_one_source("queries and gallery", queries is not None or gallery is not None, score_fn, scores)
        yield from _iter_matrix_chunks(scores, memory_budget_bytes, dtype)
        return
    if queries is None or gallery is None:
        raise RetrievalInputError("give queries and gallery embeddings, or a ready score matrix scores=")
    q = _embeddings(queries, "queries", dtype)
    g = _embeddings(gallery, "gallery", dtype, q.device)
    _check_same_dim(q, g, "queries", "gallery")
    yield from _iter_embedding_chunks(q, g, score_fn or inner_product, memory_budget_bytes)


def _check_same_dim(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise RetrievalInputError(f"{name_a} and {name_b} have different embedding dims: {a.shape[1]} vs {b.shape[1]}")


def _iter_matrix_chunks(
    scores: ArrayLike, memory_budget_bytes: int, dtype: torch.dtype
) -> Iterator[tuple[int, Tensor]]:
    """Row blocks of a ready ``[N, M]`` matrix, converted block by block so that a float64 or integer matrix
    is never copied whole."""
    n, m = _score_matrix_shape(scores)
    rows = rows_per_chunk(m, torch.empty((), dtype=dtype).element_size(), memory_budget_bytes)
    for start in range(0, n, rows):
        block = _as_tensor(scores[start : start + rows], "scores", dtype)
        _check_block_finite(block, start, "scores")
        yield start, block
        del block


def _iter_embedding_chunks(
    queries: Tensor, gallery: Tensor, score_fn: ScoreFn, memory_budget_bytes: int
) -> Iterator[tuple[int, Tensor]]:
    n, m = queries.shape[0], gallery.shape[0]
    rows = rows_per_chunk(m, queries.element_size(), memory_budget_bytes)
    for start in range(0, n, rows):
        block = _call_score_fn(score_fn, queries[start : start + rows], gallery)
        _check_block_finite(block, start, "score_fn output")
        yield start, block
        del block


def _call_score_fn(score_fn: ScoreFn, queries: Tensor, gallery: Tensor) -> Tensor:
    """``[b, D] x [m, D] -> [b, m]`` without autograd (evaluation must not build a graph through W)."""
    with torch.no_grad():
        block = score_fn(queries, gallery)
    expected = (queries.shape[0], gallery.shape[0])
    if not isinstance(block, Tensor) or tuple(block.shape) != expected:
        got = list(block.shape) if isinstance(block, Tensor) else type(block).__name__
        raise RetrievalInputError(f"score_fn returned {got}, expected shape {list(expected)}")
    return block.detach().to(queries.dtype)


def _check_block_finite(block: Tensor, start: int, what: str) -> None:
    if not _all_finite(block):
        raise RetrievalInputError(f"{what} contain NaN or Inf (rows {start}..{start + block.shape[0] - 1})")


def _tiles(block: Tensor) -> Iterator[tuple[int, Tensor]]:
    """Row tiles of a block small enough to stay in cache: the counting passes re-read each tile a few
    times, which is several times faster from cache than from memory."""
    rows = max(1, _TILE_ELEMENTS // max(1, block.shape[1]))
    for start in range(0, block.shape[0], rows):
        yield start, block[start : start + rows]


# ----------------------------------------------------------------------------------------------------------
# Counting ranks


def _sort_rows(x: Tensor) -> Tensor:
    """``[B, M] -> [B, M]`` each row ascending. On CPU numpy's SIMD sort is ~30x faster than torch.sort
    (measured: ~3 vs ~90 ns per element on AVX-512), and a CPU tensor reaches numpy without conversion."""
    if x.device.type == "cpu" and x.dtype != torch.bfloat16:
        return torch.from_numpy(np.sort(x.numpy(), axis=1))
    return torch.sort(x, dim=1).values


def _largest_sorted(x: Tensor, keep: int) -> Tensor:
    """``[B, M] -> [B, keep]``: each row's ``keep`` largest values, ascending. Selecting them first is linear
    (numpy's SIMD partition on CPU, ~0.8 ns per element), so only the kept part pays for sorting."""
    if keep >= x.shape[1]:
        return _sort_rows(x)
    if x.device.type == "cpu" and x.dtype != torch.bfloat16:
        kth = x.shape[1] - keep
        return torch.from_numpy(np.sort(np.partition(x.numpy(), kth, axis=1)[:, kth:], axis=1))
    return torch.topk(x, keep, dim=1, sorted=True).values.flip(1)


def _count_true(mask: Tensor, dim: int) -> Tensor:
    """Number of True along ``dim`` as int32; summing the bytes is several times faster than summing bools."""
    return mask.view(torch.uint8).sum(dim, dtype=torch.int32)


def _count_at_or_above(tile: Tensor, thresholds: Tensor, pool: ThreadPoolExecutor | None) -> Tensor:
    """``#{j : tile[r, j] >= thresholds[r, p]}`` for tile ``[b, M]`` and thresholds ``[b, P]`` -> ``[b, P]``,
    exact for every finite threshold (-inf marks padding; its count is unspecified).

    Few thresholds: one vectorised compare-and-count pass each (O(M·P), no allocation beyond a boolean
    tile). Many thresholds: sort the values that can matter (those >= the row's lowest threshold, C of them)
    and binary-search the thresholds: O(M + C·log C + P·log C), ~10x faster on CPU than bucketing every
    element with torch.searchsorted. When most of the row can matter, the whole row is sorted instead of
    selected first. Given a ``pool``, large tiles are cut into column slabs handled in parallel (counts over
    slabs add up).
    """
    if thresholds.shape[1] <= _MAX_COMPARE_PASSES:
        counts = [_count_true(tile >= thresholds[:, p : p + 1], dim=1) for p in range(thresholds.shape[1])]
        return torch.stack(counts, dim=1).long()
    thresholds = thresholds.contiguous()
    lowest = torch.where(thresholds.isfinite(), thresholds, float("inf")).amin(1, keepdim=True)

    def count_in(part: Tensor) -> Tensor:
        keep = int(_count_true(part >= lowest, dim=1).max())
        if keep == 0:
            return torch.zeros_like(thresholds, dtype=torch.long)
        if keep > _PARTIAL_SORT_MAX_FRACTION * part.shape[1]:
            keep = part.shape[1]
        candidates = _largest_sorted(part, keep)
        return keep - torch.searchsorted(candidates, thresholds, right=False)

    if pool is None or tile.numel() < _PARALLEL_SORT_ELEMENTS:
        return count_in(tile)
    slabs = torch.tensor_split(tile, min(torch.get_num_threads(), tile.shape[1]), dim=1)
    return torch.stack(list(pool.map(count_in, slabs))).sum(0)


@contextlib.contextmanager
def _sorting_threads() -> Iterator[ThreadPoolExecutor | None]:
    """As many sorting threads as torch uses (numpy's sort releases the GIL); None when that is one. Scoped
    to one evaluation so that no thread outlives it (nor a fork)."""
    workers = torch.get_num_threads()
    if workers < 2:
        yield None
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="retrieval-sort") as pool:
        yield pool


def _negatives_at_or_above(
    tile: Tensor, relevant: Tensor, relevant_valid: Tensor, ranked: Tensor, pool: ThreadPoolExecutor | None
) -> tuple[Tensor, Tensor]:
    """Count, for each ranked positive, the non-relevant items that the tie rule places above it.

    tile ``[b, M]``: scores of b queries. relevant ``[b, Q]``: the tile's scores at each query's relevant
    columns (padded; ``relevant_valid`` ``[b, Q]`` marks real entries). ranked ``[b, Q]`` ⊆ valid: the
    positives whose positions are wanted (a query's own column is relevant but not ranked).

    Returns ``(negatives [b, Q], num_ranked [b])``: column n holds #non-relevant items scoring >= the n-th best
    ranked positive (n from 0, best first); columns n >= num_ranked are padding. With the pessimistic tie
    rule that positive sits at 1-based position ``n + 1 + negatives[:, n]``.
    """
    neg_inf = torch.tensor(float("-inf"), dtype=tile.dtype, device=tile.device)
    thresholds = _sort_rows(torch.where(ranked, relevant, neg_inf)).flip(1)
    relevant_sorted = _sort_rows(torch.where(relevant_valid, relevant, neg_inf))
    relevant_at_or_above = relevant.shape[1] - torch.searchsorted(relevant_sorted, thresholds, right=False)
    return _count_at_or_above(tile, thresholds, pool) - relevant_at_or_above, ranked.sum(1)


@dataclass(frozen=True)
class _PositionStats:
    """Per-query quantities from the positions of the ranked positives (each ``[queries]``)."""

    first_rank: Tensor
    average_precision: Tensor
    map_at_r: Tensor
    r_precision: Tensor


def _position_stats(negatives: Tensor, num_ranked: Tensor) -> _PositionStats:
    """negatives ``[b, Q]`` and num_ranked ``[b]`` (all >= 1) from :func:`_negatives_at_or_above`.

    AP is the mean over the R positives of (#positives at or above)/(position); MAP@R sums those precisions
    only over positives inside the top R and divides by R (pytorch-metric-learning's definition).
    """
    hits = torch.arange(1, negatives.shape[1] + 1, device=negatives.device)
    r = num_ranked.unsqueeze(1)
    valid = hits.unsqueeze(0) <= r
    position = hits + negatives
    precision = torch.where(valid, hits / position.to(torch.float64), 0.0)
    in_top_r = valid & (position <= r)
    r_float = num_ranked.to(torch.float64)
    return _PositionStats(
        first_rank=negatives[:, 0],
        average_precision=precision.sum(1) / r_float,
        map_at_r=torch.where(in_top_r, precision, 0.0).sum(1) / r_float,
        r_precision=in_top_r.sum(1) / r_float,
    )


# ----------------------------------------------------------------------------------------------------------
# Cross-modal


@dataclass(frozen=True)
class CrossModalRanks:
    """0-based ranks under the tie rule: ``i2t`` ``[N]`` (best positive caption of each image), ``t2i``
    ``[kN]`` (the image of each caption), and ``i2t_ap`` ``[N]`` (AP over each image's k captions, 0..1)."""

    i2t: Tensor
    t2i: Tensor
    i2t_ap: Tensor


def cross_modal_ranks(
    images: ArrayLike | None = None,
    texts: ArrayLike | None = None,
    *,
    captions_per_image: int,
    score_fn: ScoreFn | None = None,
    scores: ArrayLike | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    dtype: torch.dtype = torch.float32,
) -> CrossModalRanks:
    """Both directions' ranks from ONE pass over image-row chunks of S ``[N, kN]``.

    Why one pass: t2i needs columns of S, and a second pass over caption chunks would double the scoring
    cost. Instead each image-row block adds its column counts, compared against the positive score of each
    caption, which is known before the pass: gathered from ``scores``, or computed by a cheap pass over
    matching ``[128, 128k]`` image/caption blocks with ``score_fn``. (With a score_fn that positive score may
    differ from the value inside the big block in the last bit; the self-comparison is subtracted exactly,
    so only a tie within one ulp could be judged differently from a one-shot matrix.)

    images ``[N, D]``, texts ``[kN, D]`` with caption rows ``k*i .. k*i+k-1`` belonging to image i;
    ``score_fn(images_chunk [b, D], texts [kN, D]) -> [b, kN]`` (default inner product); or ``scores``
    ``[N, kN]``.
    """
    _check_dtype(dtype)
    _check_budget(memory_budget_bytes)
    k = _check_captions_per_image(captions_per_image)
    _check_one_source("images and texts", images is not None or texts is not None, score_fn, scores)
    if scores is not None:
        n, m = _score_matrix_shape(scores)
        _check_caption_count(n, m, k, f"scores has shape [{n}, {m}]")
        positive_scores = _positive_scores_from_matrix(scores, k, dtype)
        chunks = _iter_matrix_chunks(scores, memory_budget_bytes, dtype)
    else:
        if images is None or texts is None:
            raise RetrievalInputError("give both images and texts embeddings (or a ready score matrix scores=)")
        img = _embeddings(images, "images", dtype)
        txt = _embeddings(texts, "texts", dtype, img.device)
        _check_same_dim(img, txt, "images", "texts")
        n, m = img.shape[0], txt.shape[0]
        _check_caption_count(n, m, k, f"{n} images and {m} captions")
        fn = score_fn or inner_product
        positive_scores = _positive_scores_from_embeddings(img, txt, k, fn)
        chunks = _iter_embedding_chunks(img, txt, fn, memory_budget_bytes)
    return _rank_cross_modal_chunks(chunks, positive_scores, n, k)


def _check_captions_per_image(captions_per_image: int) -> int:
    if isinstance(captions_per_image, bool) or not isinstance(captions_per_image, int | np.integer):
        raise RetrievalInputError(f"captions_per_image must be an integer, got {captions_per_image!r}")
    if captions_per_image < 1:
        raise RetrievalInputError(f"captions_per_image must be >= 1, got {captions_per_image}")
    return int(captions_per_image)


def _check_caption_count(n: int, m: int, k: int, given: str) -> None:
    if m % n != 0:
        raise RetrievalInputError(f"{given}: caption count {m} is not a multiple of the image count {n}")
    if m != k * n:
        raise RetrievalInputError(
            f"{given}: expected {k} captions per image ({k * n} captions), got {m // n} per image"
        )


def _positive_scores_from_matrix(scores: ArrayLike, k: int, dtype: torch.dtype) -> Tensor:
    """``[kN]``: ``scores[j // k, j]`` for every caption j."""
    m = int(scores.shape[1])
    captions = np.arange(m)
    return _as_tensor(scores[captions // k, captions], "scores", dtype)


def _positive_scores_from_embeddings(images: Tensor, texts: Tensor, k: int, score_fn: ScoreFn) -> Tensor:
    """``[kN]``: each caption scored against its own image, through small diagonal blocks of S so that the
    extra work is ~128/N of the full scoring."""
    parts = []
    for start in range(0, images.shape[0], _POSITIVE_PASS_IMAGES):
        stop = min(start + _POSITIVE_PASS_IMAGES, images.shape[0])
        block = _call_score_fn(score_fn, images[start:stop], texts[k * start : k * stop])
        b = stop - start
        parts.append(torch.diagonal(block.reshape(b, b, k), dim1=0, dim2=1).T.reshape(-1))
    return torch.cat(parts)


def _rank_cross_modal_chunks(
    chunks: Iterator[tuple[int, Tensor]], positive_scores: Tensor, n: int, k: int
) -> CrossModalRanks:
    device = positive_scores.device
    i2t = torch.empty(n, dtype=torch.long, device=device)
    i2t_ap = torch.empty(n, dtype=torch.float64, device=device)
    t2i_at_or_above = torch.zeros(n * k, dtype=torch.long, device=device)
    t2i_self = torch.zeros(n * k, dtype=torch.long, device=device)
    offsets = torch.arange(k, device=device)
    with _sorting_threads() as pool:
        for chunk_start, block in chunks:
            for tile_start, tile in _tiles(block):
                first = chunk_start + tile_start
                rows = torch.arange(first, first + tile.shape[0], device=device)
                columns = (rows * k).unsqueeze(1) + offsets
                positives = tile.gather(1, columns)
                everything = torch.ones_like(positives, dtype=torch.bool)
                negatives, num_ranked = _negatives_at_or_above(tile, positives, everything, everything, pool)
                stats = _position_stats(negatives, num_ranked)
                i2t[rows] = stats.first_rank
                i2t_ap[rows] = stats.average_precision
                t2i_at_or_above += _count_true(tile >= positive_scores, dim=0)
                t2i_self[columns.reshape(-1)] = (positives >= positive_scores[columns]).reshape(-1).long()
            del block, tile  # release this chunk before the next one is scored: one block alive, not two
    return CrossModalRanks(i2t=i2t, t2i=t2i_at_or_above - t2i_self, i2t_ap=i2t_ap)


def cross_modal_metrics(ranks: CrossModalRanks, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Summary of :class:`CrossModalRanks`: ``i2t_r{K}``, ``t2i_r{K}`` (percent), ``rsum`` (their true sum),
    ``i2t_medr``, ``t2i_medr``, ``i2t_meanr``, ``t2i_meanr`` (1-based), ``i2t_map`` (percent)."""
    cutoffs = _check_ks(ks)
    i2t = ranks.i2t.cpu().numpy()
    t2i = ranks.t2i.cpu().numpy()
    out: dict[str, float] = {}
    for name, rank in (("i2t", i2t), ("t2i", t2i)):
        for cutoff in cutoffs:
            out[f"{name}_r{cutoff}"] = float(100.0 * np.mean(rank < cutoff))
    out["rsum"] = float(sum(out.values()))
    out["i2t_medr"] = float(np.floor(np.median(i2t)) + 1)
    out["t2i_medr"] = float(np.floor(np.median(t2i)) + 1)
    out["i2t_meanr"] = float(np.mean(i2t) + 1)
    out["t2i_meanr"] = float(np.mean(t2i) + 1)
    out["i2t_map"] = float(100.0 * ranks.i2t_ap.double().mean().item())
    return out


def evaluate_cross_modal(
    images: ArrayLike | None = None,
    texts: ArrayLike | None = None,
    *,
    captions_per_image: int,
    protocol: str = "all",
    score_fn: ScoreFn | None = None,
    scores: ArrayLike | None = None,
    ks: Sequence[int] = (1, 5, 10),
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Image-text retrieval metrics under a named protocol.

    images ``[N, D]`` and texts ``[kN, D]`` (+ optional ``score_fn``), or ``scores`` ``[N, kN]``.
    Protocols: ``f30k-1k`` (exactly 1,000 images, used whole), ``coco-5k`` (exactly 5,000, all at once),
    ``coco-1k`` (exactly 5,000: fold f = images ``1000f .. 1000f+999`` with their captions, metrics averaged
    over the 5 folds), ``all`` (the whole split, any N). Returns the :func:`cross_modal_metrics` keys (for
    coco-1k: means over folds), ``"protocol"``, and ``"folds"``: the per-fold metric dicts (5 for coco-1k,
    one entry equal to the top-level metrics otherwise).
    """
    _check_ks(ks)
    if protocol not in CROSS_MODAL_PROTOCOLS:
        raise RetrievalInputError(f"unknown protocol {protocol!r}; choose one of {', '.join(CROSS_MODAL_PROTOCOLS)}")
    k = _check_captions_per_image(captions_per_image)
    _check_one_source("images and texts", images is not None or texts is not None, score_fn, scores)
    if scores is not None:
        n, m = _score_matrix_shape(scores)
        _check_caption_count(n, m, k, f"scores has shape [{n}, {m}]")
    else:
        n, m = _num_rows(images, "images"), _num_rows(texts, "texts")
        _check_caption_count(n, m, k, f"{n} images and {m} captions")
    expected = _PROTOCOL_IMAGES.get(protocol)
    if expected is not None and n != expected:
        raise RetrievalInputError(
            f"protocol {protocol} needs {expected:,} images, got {n:,}; use --protocol all to evaluate the whole split"
        )
    fold_images = _COCO_1K_FOLD_IMAGES if protocol == "coco-1k" else n
    folds = []
    for start in range(0, n, fold_images):
        stop = start + fold_images
        ranks = cross_modal_ranks(
            images[start:stop] if images is not None else None,
            texts[k * start : k * stop] if texts is not None else None,
            captions_per_image=k,
            score_fn=score_fn,
            scores=scores[start:stop, k * start : k * stop] if scores is not None else None,
            memory_budget_bytes=memory_budget_bytes,
            dtype=dtype,
        )
        folds.append(cross_modal_metrics(ranks, ks))
    summary: dict[str, Any] = {key: float(np.mean([fold[key] for fold in folds])) for key in folds[0]}
    summary["protocol"] = protocol
    summary["folds"] = folds
    return summary


def _num_rows(x: ArrayLike | None, name: str) -> int:
    if x is None:
        raise RetrievalInputError("give both images and texts embeddings (or a ready score matrix scores=)")
    if len(x.shape) != 2 or x.shape[0] == 0:
        raise RetrievalInputError(f"{name} must be a non-empty 2-D [N, D] matrix, got shape {list(x.shape)}")
    return int(x.shape[0])


# ----------------------------------------------------------------------------------------------------------
# Label-based


@dataclass(frozen=True)
class _GalleryByClass:
    """Gallery columns grouped by class so that a query's relevant columns are one contiguous slice:
    ``order[start[c] : start[c] + count[c]]`` (all ``[G]`` / ``[C]`` int64)."""

    order: Tensor
    start: Tensor
    count: Tensor


def _label_codes(
    query_labels: LabelsLike, gallery_labels: LabelsLike | None, num_queries: int, num_gallery: int
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Any labels (ints, strings, ...) -> class codes ``0 .. C-1`` shared by queries ``[Q]`` and gallery
    ``[G]``."""
    q = _labels_to_numpy(query_labels, "query_labels", num_queries)
    g = q if gallery_labels is None else _labels_to_numpy(gallery_labels, "gallery_labels", num_gallery)
    try:
        _, inverse = np.unique(np.concatenate([q, g]), return_inverse=True)
    except TypeError as exc:
        raise RetrievalInputError(f"labels cannot be compared ({exc})") from None
    codes = inverse.reshape(-1).astype(np.int64)
    return codes[: len(q)], codes[len(q) :]


def _labels_to_numpy(labels: LabelsLike, name: str, expected: int) -> NDArray[Any]:
    array = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if array.ndim != 1:
        raise RetrievalInputError(f"{name} must be 1-D, got shape {list(array.shape)}")
    if len(array) != expected:
        raise RetrievalInputError(f"{name} has {len(array)} entries but there are {expected} rows to label")
    return array


def _group_by_class(gallery_codes: NDArray[np.int64], num_classes: int, device: torch.device) -> _GalleryByClass:
    order = np.argsort(gallery_codes, kind="stable")
    count = np.bincount(gallery_codes, minlength=num_classes)
    start = np.cumsum(count) - count
    return _GalleryByClass(*(torch.from_numpy(a).to(device) for a in (order, start, count)))


def _relevant_columns(query_codes: Tensor, gallery: _GalleryByClass) -> tuple[Tensor, Tensor]:
    """Relevant gallery columns of each query, padded: ``(columns [b, Q], valid [b, Q])``."""
    count = gallery.count[query_codes]
    width = int(count.max().item()) if count.numel() else 0
    offsets = torch.arange(width, device=query_codes.device)
    valid = offsets < count.unsqueeze(1)
    slots = (gallery.start[query_codes].unsqueeze(1) + offsets).clamp_max(gallery.order.numel() - 1)
    return gallery.order[slots], valid


def evaluate_labels(
    queries: ArrayLike | None,
    query_labels: LabelsLike,
    gallery: ArrayLike | None = None,
    gallery_labels: LabelsLike | None = None,
    *,
    score_fn: ScoreFn | None = None,
    scores: ArrayLike | None = None,
    ks: Sequence[int] = (1, 5, 10),
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    dtype: torch.dtype = torch.float32,
) -> dict[str, float]:
    """Label-based retrieval metrics (re-ID, fine-grained, cross-view), exact over the whole gallery.

    queries ``[Q, D]`` with query_labels ``[Q]``; gallery ``[G, D]`` with gallery_labels ``[G]``, or
    ``gallery=None`` to search the query set itself (each query then leaves itself out). With a ready
    ``scores`` matrix pass ``queries=None``: ``[Q, G]`` with gallery_labels, or ``[Q, Q]`` without (the
    diagonal is the excluded self-match). ``score_fn(queries_chunk [b, D], gallery [G, D]) -> [b, G]``.

    Returns fractions in [0, 1]: ``r_at_{K}``, ``precision_at_1``, ``map``, ``map_at_r``, ``r_precision``,
    averaged over queries with at least one relevant gallery item; plus ``num_queries`` (all queries given)
    and ``num_skipped`` (those without a relevant item, left out of every mean).
    """
    _check_dtype(dtype)
    _check_budget(memory_budget_bytes)
    cutoffs = _check_ks(ks)
    if query_labels is None:
        raise RetrievalInputError("query_labels are missing")
    _check_one_source("queries", queries is not None, score_fn, scores)
    if scores is not None:
        if gallery is not None:
            raise RetrievalInputError("with scores= give gallery_labels only, not gallery embeddings")
        num_queries, num_gallery = _score_matrix_shape(scores)
        excludes_self = gallery_labels is None
        if excludes_self and num_queries != num_gallery:
            raise RetrievalInputError(
                f"scores has shape [{num_queries}, {num_gallery}]: without gallery_labels the gallery is the "
                "query set, so scores must be square"
            )
        chunks = _iter_matrix_chunks(scores, memory_budget_bytes, dtype)
        device = torch.device("cpu") if not isinstance(scores, Tensor) else scores.device
    else:
        assert queries is not None
        q = _embeddings(queries, "queries", dtype)
        excludes_self = gallery is None
        if excludes_self and gallery_labels is not None:
            raise RetrievalInputError("gallery_labels given without gallery embeddings")
        if not excludes_self and gallery_labels is None:
            raise RetrievalInputError("gallery embeddings given without gallery_labels")
        g = q if gallery is None else _embeddings(gallery, "gallery", dtype, q.device)
        _check_same_dim(q, g, "queries", "gallery")
        num_queries, num_gallery = q.shape[0], g.shape[0]
        chunks = _iter_embedding_chunks(q, g, score_fn or inner_product, memory_budget_bytes)
        device = q.device
    query_codes, gallery_codes = _label_codes(query_labels, gallery_labels, num_queries, num_gallery)
    num_classes = int(max(query_codes.max(), gallery_codes.max())) + 1
    by_class = _group_by_class(gallery_codes, num_classes, device)
    stats = _label_stats(chunks, torch.from_numpy(query_codes).to(device), by_class, excludes_self)
    return _label_summary(stats, cutoffs)


def _label_stats(
    chunks: Iterator[tuple[int, Tensor]], query_codes: Tensor, gallery: _GalleryByClass, excludes_self: bool
) -> _PositionStats:
    """Position statistics of every query, ``[Q]`` each, filled chunk by chunk into preallocated tensors (a
    small tensor per tile would cost far more memory than its values). Queries without a relevant gallery
    item keep ``first_rank = -1``."""
    num_queries, device = query_codes.numel(), query_codes.device
    stats = _PositionStats(
        first_rank=torch.full((num_queries,), -1, dtype=torch.long, device=device),
        average_precision=torch.zeros(num_queries, dtype=torch.float64, device=device),
        map_at_r=torch.zeros(num_queries, dtype=torch.float64, device=device),
        r_precision=torch.zeros(num_queries, dtype=torch.float64, device=device),
    )
    with _sorting_threads() as pool:
        for chunk_start, block in chunks:
            for tile_start, tile in _tiles(block):
                first = chunk_start + tile_start
                rows = torch.arange(first, first + tile.shape[0], device=device)
                columns, valid = _relevant_columns(query_codes[rows], gallery)
                ranked = valid & (columns != rows.unsqueeze(1)) if excludes_self else valid
                keep = ranked.any(1)
                if not bool(keep.all()):
                    if not bool(keep.any()):
                        continue
                    tile, rows, columns, valid, ranked = (
                        tile[keep],
                        rows[keep],
                        columns[keep],
                        valid[keep],
                        ranked[keep],
                    )
                relevant = tile.gather(1, columns)
                negatives, num_ranked = _negatives_at_or_above(tile, relevant, valid, ranked, pool)
                tile_stats = _position_stats(negatives, num_ranked)
                stats.first_rank[rows] = tile_stats.first_rank
                stats.average_precision[rows] = tile_stats.average_precision
                stats.map_at_r[rows] = tile_stats.map_at_r
                stats.r_precision[rows] = tile_stats.r_precision
            del block, tile  # release this chunk before the next one is scored: one block alive, not two
    return stats


def _label_summary(stats: _PositionStats, cutoffs: tuple[int, ...]) -> dict[str, float]:
    evaluated = stats.first_rank >= 0
    if not bool(evaluated.any()):
        raise RetrievalInputError("no query has a relevant gallery item (same label): nothing to evaluate")
    first_rank = stats.first_rank[evaluated]
    out: dict[str, float] = {f"r_at_{k}": float((first_rank < k).double().mean().item()) for k in cutoffs}
    out["precision_at_1"] = float((first_rank == 0).double().mean().item())
    out["map"] = float(stats.average_precision[evaluated].mean().item())
    out["map_at_r"] = float(stats.map_at_r[evaluated].mean().item())
    out["r_precision"] = float(stats.r_precision[evaluated].mean().item())
    out["num_queries"] = evaluated.numel()
    out["num_skipped"] = int((~evaluated).sum().item())
    return out
