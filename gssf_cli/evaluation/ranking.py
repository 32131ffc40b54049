"""Retrieval metrics for cross-modal (image-text) and label-based evaluation, exact and in bounded memory.

Why this module exists: the usual evaluation code (VSE++, SCAN, VSE∞) materialises the whole score matrix
and argsorts every query's row, which needs O(N·M) memory and costs more than computing the scores. A rank
only needs *counts* of gallery items scoring at or above each positive of the query:

- cross-modal (few positives: the k captions of an image, the one image of a caption): k + 1 vectorised
  compare-and-count passes over cache-sized tiles, no sorting at all;
- label-based (many positives: a whole class): MAP@R, R-precision, P@1 and R@K only need each query's top
  max(R, K). An exact lower bound of that depth, read off the maxima of the row's columns when the row is
  viewed as a few stripes, leaves a few hundred candidates, and only those are sorted (one uint64 key each). Full mAP (``full_map=True``) needs
  every relevant item's position, so it sorts every score at or above the query's lowest relevant one.

Inputs are numpy arrays or torch tensors. Each metric function takes EITHER embeddings plus an optional
``score_fn`` (default: inner product, i.e. cosine for L2-normalised embeddings) OR a ready score matrix
``scores=``. Both are consumed as row chunks of ``[rows, M]`` sized by ``memory_budget_bytes``
(:func:`iter_score_chunks`); the working memory beyond one chunk is a few cache-sized tiles. Scores are
computed in torch on the inputs' device, in ``dtype`` (float32 by default). On CPU the ranking work after
each chunk's GEMM runs in numpy, in as many worker threads as torch uses, each taking whole row ranges:
torch ops on tiles this small are one OpenMP parallel region each, and when another process holds a core,
every region waits for the descheduled thread (measured 26x slower under load), while a worker that loses
its core only delays its own range. Other devices run the same counts as torch ops.

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
``map_at_r`` and ``r_precision`` (R = #relevant items of the query), and with ``full_map=True`` ``map`` (AP
over the full ranking).
When the gallery is the query set, each query is removed from its own gallery. Queries with no relevant
gallery item are skipped: they count in no mean, and are reported as ``num_skipped``.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from gssf_cli.core.limits import PROTOCOLS

__all__ = [
    "CROSS_MODAL_PROTOCOLS",
    "DEFAULT_MEMORY_BUDGET_BYTES",
    "ArrayLike",
    "CrossModalRanks",
    "LabelQueryStats",
    "LabelsLike",
    "RetrievalInputError",
    "ScoreFn",
    "cross_modal_fold_ranks",
    "cross_modal_metrics",
    "cross_modal_ranks",
    "evaluate_cross_modal",
    "evaluate_labels",
    "inner_product",
    "iter_score_chunks",
    "label_query_stats",
    "protocol_folds",
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
_PARTS_PER_WORKER = 4
_SCORE_TILE_ELEMENTS = 2**22
_MIN_SCORE_ROWS = 64
_STRIPE_COLUMNS = 4096
_STREAM_QUERY_ROWS = 256
_STRIPE_COLUMNS_PER_NEEDED = 8
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


Candidates = tuple[NDArray[np.int64], NDArray[np.int64], NDArray[Any]]
"""``(query, column, value)``, each ``[C]``: scores of a few (query, gallery) pairs."""


@dataclass(frozen=True)
class _RowBlocks:
    """Rows of the ``[N, M]`` query-by-gallery score matrix on demand: ``block(start, stop)`` is rows
    ``start .. stop - 1``, ``[stop - start, M]``, checked for NaN/Inf. Blocks may be views of a ready matrix:
    do not modify them."""

    num_rows: int
    num_columns: int
    element_size: int
    block: Callable[[int, int], Tensor]
    candidates: Callable[[NDArray[np.int64], NDArray[np.int64]], Candidates] | None = None
    """Given query rows ``[b]`` and their depths ``[b]``: their top candidates (:func:`_stream_top`) without
    materialising their rows; None where rows are cheaper read from a ready matrix."""

    def chunks(self, memory_budget_bytes: int) -> Iterator[tuple[int, Tensor]]:
        """``(first_row, block)`` top to bottom, each as many rows as fit the budget."""
        rows = rows_per_chunk(self.num_columns, self.element_size, memory_budget_bytes)
        for start in range(0, self.num_rows, rows):
            block = self.block(start, min(start + rows, self.num_rows))
            yield start, block
            del block


def _matrix_blocks(scores: ArrayLike, dtype: torch.dtype) -> _RowBlocks:
    """Row blocks of a ready matrix, converted block by block so that a float64 or integer matrix is never
    copied whole."""
    n, m = _score_matrix_shape(scores)

    def block(start: int, stop: int) -> Tensor:
        rows = _as_tensor(scores[start:stop], "scores", dtype)
        _check_block_finite(rows, start, "scores")
        return rows

    return _RowBlocks(n, m, torch.empty((), dtype=dtype).element_size(), block)


def _embedding_blocks(queries: Tensor, gallery: Tensor, score_fn: ScoreFn, reuse: bool = False) -> _RowBlocks:
    """Row blocks ``score_fn(queries[start:stop], gallery)``; checked for Inf unless no inner product of
    these embeddings can overflow.

    ``reuse``: the default inner product is written into one buffer per thread, overwritten by that thread's
    next block — for callers done with a block before they ask for the next. Why: glibc keeps freed blocks
    under 32 MB in per-thread heaps instead of returning them, so allocating one per range measured ~300 MB
    above the budget with two workers."""
    check = score_fn is not inner_product or not _inner_products_stay_finite(queries, gallery)
    in_place = reuse and score_fn is inner_product

    def scores(rows: Tensor, columns: Tensor, first_row: int) -> Tensor:
        if in_place:
            block = torch.mm(rows, columns.T, out=_scratch_scores((rows.shape[0], columns.shape[0]), rows.dtype))
        else:
            block = _call_score_fn(score_fn, rows, columns)
        if check:
            _check_block_finite(block, first_row, "score_fn output")
        return block

    def candidates(rows: NDArray[np.int64], need: NDArray[np.int64]) -> Candidates:
        return _stream_top(lambda g: scores(queries[rows], g, int(rows[0])).numpy(), gallery, need)

    return _RowBlocks(
        queries.shape[0],
        gallery.shape[0],
        queries.element_size(),
        lambda start, stop: scores(queries[start:stop], gallery, start),
        candidates if reuse else None,
    )


def _iter_matrix_chunks(
    scores: ArrayLike, memory_budget_bytes: int, dtype: torch.dtype
) -> Iterator[tuple[int, Tensor]]:
    return _matrix_blocks(scores, dtype).chunks(memory_budget_bytes)


def _iter_embedding_chunks(
    queries: Tensor, gallery: Tensor, score_fn: ScoreFn, memory_budget_bytes: int
) -> Iterator[tuple[int, Tensor]]:
    return _embedding_blocks(queries, gallery, score_fn).chunks(memory_budget_bytes)


def _inner_products_stay_finite(queries: Tensor, gallery: Tensor) -> bool:
    """Whether no inner product of these (finite) rows can overflow, so that checking every score block for
    Inf is unnecessary (a pass as long as the ranking's own at 100,000 x 500,000).

    By Cauchy-Schwarz every partial sum of ``q . g`` is at most ``|q| |g|`` in magnitude; a factor 4 covers
    rounding in any summation order."""
    bound = torch.linalg.vector_norm(queries, dim=1).max() * torch.linalg.vector_norm(gallery, dim=1).max()
    return bool(bound * 4 < torch.finfo(queries.dtype).max)


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


def _compare_counts(part: Tensor, row_thresholds: Tensor, column_thresholds: Tensor) -> tuple[Tensor, Tensor]:
    """Counts at or above thresholds along both axes of a row range ``[r, M]`` of a score block.

    Returns ``(rows [r, P], columns [M])``: ``#{j : part[i, j] >= row_thresholds[i, p]}`` and
    ``#{i : part[i, j] >= column_thresholds[j]}``. On CPU the compare passes run in numpy, single-threaded in
    the calling worker: a torch op on a tile is one OpenMP parallel region, and when another process holds a
    core every region waits for the descheduled thread (measured: 26x slower under load). All P + 1 passes
    over a tile are two broadcast ufunc calls and two reductions, all of which release the GIL; tiles of ~1M
    scores keep the GIL hand-overs between the workers rare (smaller, cache-sized tiles measured slower with
    two workers than with one)."""
    if row_thresholds.shape[1] > _MAX_COMPARE_PASSES or not _numpy_ok(part):
        rows = _count_at_or_above(part, row_thresholds, None)
        return rows, _count_true(part >= column_thresholds, dim=0).long()
    values, thresholds, column_values = part.numpy(), row_thresholds.numpy(), column_thresholds.numpy()
    rows_np = np.empty(thresholds.shape, dtype=np.int64)
    columns_np = np.zeros(values.shape[1], dtype=np.int64)
    num_thresholds, step = thresholds.shape[1], max(1, _TILE_ELEMENTS // values.shape[1])
    for start in range(0, values.shape[0], step):
        tile = values[start : start + step]
        masks = _scratch_mask((tile.shape[0], num_thresholds + 1, tile.shape[1]))
        np.greater_equal(tile[:, None, :], thresholds[start : start + step, :, None], out=masks[:, :num_thresholds])
        np.greater_equal(tile, column_values, out=masks[:, num_thresholds])
        rows_np[start : start + step] = _true_along_last(masks[:, :num_thresholds])
        columns_np += _true_along_last(masks[:, num_thresholds].T)
    return torch.from_numpy(rows_np), torch.from_numpy(columns_np)


def _true_along_last(mask: NDArray[np.bool_]) -> NDArray[np.int64]:
    """``[..., M] -> [...]`` True count along the last axis, as uint16 sums of the bytes over slabs of at most
    65,535: as fast as ``np.count_nonzero`` per row, and a ufunc reduction, which releases the GIL (per-row
    calls held it and kept the other worker thread waiting)."""
    slab = np.iinfo(np.uint16).max
    counts = np.zeros(mask.shape[:-1], dtype=np.int64)
    for start in range(0, mask.shape[-1], slab):
        counts += np.add.reduce(mask[..., start : start + slab].view(np.uint8), axis=-1, dtype=np.uint16)
    return counts


def _worker_parts(block: Tensor, workers: int) -> list[tuple[int, Tensor]]:
    """Row ranges of a block, a few per worker: enough for a worker that loses its core to leave the rest to
    the others, few enough that handing them out costs nothing."""
    rows = max(1, -(-block.shape[0] // (workers * _PARTS_PER_WORKER)))
    return [(start, block[start : start + rows]) for start in range(0, block.shape[0], rows)]


def _numpy_ok(x: Tensor) -> bool:
    """A CPU tensor numpy can read without conversion (numpy has no bfloat16)."""
    return x.device.type == "cpu" and x.dtype != torch.bfloat16


_thread_scratch = threading.local()


def _scratch_mask(shape: Sequence[int]) -> NDArray[np.bool_]:
    """A boolean buffer of ``shape`` reused by the calling thread: a fresh tile-sized array per pass would be
    a fresh mmap and page faults each time."""
    size = int(np.prod(shape))
    buffer = getattr(_thread_scratch, "mask", None)
    if buffer is None or buffer.size < size:
        buffer = np.empty(size, dtype=bool)
        _thread_scratch.mask = buffer
    return buffer[:size].reshape(tuple(shape))


def _scratch_scores(shape: tuple[int, int], dtype: torch.dtype) -> Tensor:
    """A ``shape`` tensor reused by the calling thread (see :func:`_embedding_blocks`)."""
    size = shape[0] * shape[1]
    buffer = getattr(_thread_scratch, "scores", None)
    if buffer is None or buffer.numel() < size or buffer.dtype != dtype:
        buffer = torch.empty(size, dtype=dtype)
        _thread_scratch.scores = buffer
    return buffer[:size].view(shape)


class _Workers:
    """``map`` over a thread pool, or in the calling thread when ``pool`` is None (one thread, or a device
    where torch already runs in parallel); ``size`` threads."""

    def __init__(self, pool: ThreadPoolExecutor | None, size: int) -> None:
        self.pool, self.size = pool, size

    def map(self, fn: Callable[..., Any], items: Sequence[Any]) -> Iterator[Any]:
        return self.pool.map(fn, items) if self.pool is not None else map(fn, items)


@contextlib.contextmanager
def _tile_workers(device: torch.device) -> Iterator[_Workers]:
    """Worker threads for numpy work, as many as torch uses on CPU (numpy releases the GIL); none elsewhere.
    They take whole row ranges (or, in the full-ranking path, column slabs of one tile to sort).

    Why whole ranges: a worker that loses its core to another process delays only its own tile while the
    others take the next ones, instead of stalling a barrier inside every op. Scoped to one evaluation so that
    no thread outlives it (nor a fork)."""
    workers = torch.get_num_threads()
    if device.type != "cpu" or workers < 2:
        yield _Workers(None, 1)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="retrieval-tiles") as pool:
        yield _Workers(pool, workers)


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
    """Fill per-image counts and per-caption column counts range by range, then turn them into ranks once.

    Each row range only yields raw counts (:func:`_compare_counts`); the rank and AP arithmetic runs once
    over all N images at the end, so that the work per range is the compare passes and nothing else."""
    device = positive_scores.device
    positives = torch.empty(n, k, dtype=positive_scores.dtype, device=device)
    thresholds = torch.empty(n, k, dtype=positive_scores.dtype, device=device)
    at_or_above = torch.empty(n, k, dtype=torch.long, device=device)
    t2i_at_or_above = torch.zeros(n * k, dtype=torch.long, device=device)
    offsets = torch.arange(k, device=device)
    with _tile_workers(device) as workers:
        for chunk_start, block in chunks:
            rows = slice(chunk_start, chunk_start + block.shape[0])
            images = torch.arange(rows.start, rows.stop, device=device)
            positives[rows] = block.gather(1, (images * k).unsqueeze(1) + offsets)
            thresholds[rows] = positives[rows].sort(dim=1, descending=True).values
            parts = _worker_parts(block, workers.size)
            counted = workers.map(
                lambda part: _compare_counts(
                    part[1], thresholds[part[0] : part[0] + part[1].shape[0]], positive_scores
                ),
                [(chunk_start + start, part) for start, part in parts],
            )
            for (start, part), (row_counts, column_counts) in zip(parts, counted, strict=True):
                at_or_above[chunk_start + start : chunk_start + start + part.shape[0]] = row_counts
                t2i_at_or_above += column_counts
            del block, parts, part  # release this chunk (and its views) before the next is scored: one alive
    positives_at_or_above = _count_true(positives.unsqueeze(1) >= thresholds.unsqueeze(2), dim=2)
    stats = _position_stats(at_or_above - positives_at_or_above, torch.full((n,), k, device=device))
    t2i_self = (positives >= positive_scores.view(n, k)).reshape(-1).long()
    return CrossModalRanks(i2t=stats.first_rank, t2i=t2i_at_or_above - t2i_self, i2t_ap=stats.average_precision)


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
    folds = []
    for start, stop in protocol_folds(n, protocol):
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


def protocol_folds(num_images: int, protocol: str) -> list[tuple[int, int]]:
    """The image ranges ``[(start, stop), ...]`` a protocol evaluates separately: five folds of 1,000 for
    ``coco-1k``, the whole split otherwise. A protocol that names a test set size refuses any other
    (:class:`RetrievalInputError`); ``all`` takes any."""
    if protocol not in CROSS_MODAL_PROTOCOLS:
        raise RetrievalInputError(f"unknown protocol {protocol!r}; choose one of {', '.join(CROSS_MODAL_PROTOCOLS)}")
    expected = _PROTOCOL_IMAGES.get(protocol)
    if expected is not None and num_images != expected:
        raise RetrievalInputError(
            f"protocol {protocol} needs {expected:,} images, got {num_images:,}; use --protocol all to evaluate the "
            "whole split"
        )
    fold_images = _COCO_1K_FOLD_IMAGES if protocol == "coco-1k" else num_images
    return [(start, start + fold_images) for start in range(0, num_images, fold_images)]


def cross_modal_fold_ranks(
    images: ArrayLike,
    texts: ArrayLike,
    *,
    captions_per_image: int,
    protocol: str = "all",
    score_fn: ScoreFn | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    dtype: torch.dtype = torch.float32,
) -> CrossModalRanks:
    """Per-query ranks under a protocol: :func:`cross_modal_ranks` of each fold (:func:`protocol_folds`),
    ranked within its fold, concatenated in image order (``i2t`` and ``i2t_ap`` ``[N]``, ``t2i`` ``[kN]``).

    The per-query values behind :func:`evaluate_cross_modal`: for every protocol, each of its mean metrics
    (R@K, meanr, mAP, rsum) is the mean over images of a per-image value computed from these ranks, since the
    folds of ``coco-1k`` are equally large. Chunked like the rest: no ``[N, kN]`` matrix is ever held.
    """
    k = _check_captions_per_image(captions_per_image)
    n, m = _num_rows(images, "images"), _num_rows(texts, "texts")
    _check_caption_count(n, m, k, f"{n} images and {m} captions")
    parts = [
        cross_modal_ranks(
            images[start:stop],
            texts[k * start : k * stop],
            captions_per_image=k,
            score_fn=score_fn,
            memory_budget_bytes=memory_budget_bytes,
            dtype=dtype,
        )
        for start, stop in protocol_folds(n, protocol)
    ]
    return CrossModalRanks(
        i2t=torch.cat([part.i2t for part in parts]),
        t2i=torch.cat([part.t2i for part in parts]),
        i2t_ap=torch.cat([part.i2t_ap for part in parts]),
    )


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
    full_map: bool = False,
) -> dict[str, float]:
    """Label-based retrieval metrics (re-ID, fine-grained, cross-view), exact over the whole gallery.

    queries ``[Q, D]`` with query_labels ``[Q]``; gallery ``[G, D]`` with gallery_labels ``[G]``, or
    ``gallery=None`` to search the query set itself (each query then leaves itself out). With a ready
    ``scores`` matrix pass ``queries=None``: ``[Q, G]`` with gallery_labels, or ``[Q, Q]`` without (the
    diagonal is the excluded self-match). ``score_fn(queries_chunk [b, D], gallery [G, D]) -> [b, G]``.

    Returns fractions in [0, 1]: ``r_at_{K}``, ``precision_at_1``, ``map_at_r``, ``r_precision``, and with
    ``full_map=True`` also ``map``, averaged over queries with at least one relevant gallery item; plus
    ``num_queries`` (all queries given) and ``num_skipped`` (those without a relevant item, left out of every
    mean).

    Cost: without ``full_map`` a query only needs its top max(R, K) (R = its relevant items); on CPU only
    the scores at or above an exact lower bound of that depth are ever sorted (:func:`_top_candidates`), a
    few hundred per query. ``map`` needs the position of every relevant item in the full ranking, so
    ``full_map=True`` sorts every score at or above each query's lowest relevant one — usually most of the
    row. Other devices always take that second path.
    """
    stats, cutoffs = _label_position_stats(
        queries, query_labels, gallery, gallery_labels, score_fn=score_fn, scores=scores, ks=ks,
        memory_budget_bytes=memory_budget_bytes, dtype=dtype, full_map=full_map,
    )  # fmt: skip
    return _label_summary(stats, cutoffs, full_map)


@dataclass(frozen=True)
class LabelQueryStats:
    """Per-query values of a label-based evaluation (numpy, ``[Q]`` each, in query order).

    ``first_rank``: 0-based position of the first relevant item under the tie rule, -1 for a query without a
    relevant gallery item (such queries count in no mean: see ``evaluated``). It is exact below the depth the
    ranking was known to, max(R, max K) (R = the query's relevant items); past it, it is a lower bound at or
    beyond that depth, so ``first_rank < K`` is exact for every K up to max K. ``map_at_r``, ``r_precision``:
    fractions; ``average_precision``: AP over the full ranking, only with ``full_map`` (None otherwise).
    """

    first_rank: NDArray[np.int64]
    map_at_r: NDArray[np.float64]
    r_precision: NDArray[np.float64]
    average_precision: NDArray[np.float64] | None = None

    @property
    def evaluated(self) -> NDArray[np.bool_]:
        """Queries with at least one relevant gallery item: the ones every metric averages over."""
        return self.first_rank >= 0


def label_query_stats(
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
    full_map: bool = False,
) -> LabelQueryStats:
    """The per-query values :func:`evaluate_labels` averages, from the same chunked pass (same arguments,
    same cost; ``ks`` sets how deep each ranking is known). Over the evaluated queries, the mean of
    ``first_rank < K`` is ``r_at_K``, of ``first_rank == 0`` ``precision_at_1``, and of the others the metric
    of their name."""
    stats, _ = _label_position_stats(
        queries, query_labels, gallery, gallery_labels, score_fn=score_fn, scores=scores, ks=ks,
        memory_budget_bytes=memory_budget_bytes, dtype=dtype, full_map=full_map,
    )  # fmt: skip
    return LabelQueryStats(
        first_rank=stats.first_rank.cpu().numpy().astype(np.int64),
        map_at_r=stats.map_at_r.cpu().numpy().astype(np.float64),
        r_precision=stats.r_precision.cpu().numpy().astype(np.float64),
        average_precision=stats.average_precision.cpu().numpy().astype(np.float64) if full_map else None,
    )


def _label_position_stats(
    queries: ArrayLike | None,
    query_labels: LabelsLike,
    gallery: ArrayLike | None,
    gallery_labels: LabelsLike | None,
    *,
    score_fn: ScoreFn | None,
    scores: ArrayLike | None,
    ks: Sequence[int],
    memory_budget_bytes: int,
    dtype: torch.dtype,
    full_map: bool,
) -> tuple[_PositionStats, tuple[int, ...]]:
    """The work of :func:`evaluate_labels` up to its summary: every query's position statistics, and the
    checked cut-offs."""
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
        blocks = _matrix_blocks(scores, dtype)
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
        blocks = _embedding_blocks(q, g, score_fn or inner_product, reuse=not full_map)
        device = q.device
    query_codes, gallery_codes = _label_codes(query_labels, gallery_labels, num_queries, num_gallery)
    num_classes = int(max(query_codes.max(), gallery_codes.max())) + 1
    by_class = _group_by_class(gallery_codes, num_classes, device)
    codes = torch.from_numpy(query_codes).to(device)
    if full_map or not _numpy_ok(torch.empty(0, dtype=dtype, device=device)):
        stats = _label_stats(blocks.chunks(memory_budget_bytes), codes, by_class, excludes_self)
    else:
        depth = _TopDepth(max(cutoffs), num_gallery - int(excludes_self), excludes_self)
        stats = _label_stats_top(blocks, memory_budget_bytes, codes, gallery_codes, by_class, depth)
    return stats, cutoffs


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
    with _tile_workers(device) as workers:
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
                negatives, num_ranked = _negatives_at_or_above(tile, relevant, valid, ranked, workers.pool)
                tile_stats = _position_stats(negatives, num_ranked)
                stats.first_rank[rows] = tile_stats.first_rank
                stats.average_precision[rows] = tile_stats.average_precision
                stats.map_at_r[rows] = tile_stats.map_at_r
                stats.r_precision[rows] = tile_stats.r_precision
            del block, tile  # release this chunk before the next one is scored: one block alive, not two
    return stats


@dataclass(frozen=True)
class _TopDepth:
    """How deep each query's ranking must be known when full mAP is not asked for: its top
    ``min(max(R, max_k), candidates)`` positions, R = its relevant items, candidates = gallery items it is
    ranked against (the gallery, less the query itself in self-retrieval)."""

    max_k: int
    candidates: int
    excludes_self: bool

    def of(self, relevant: NDArray[np.int64]) -> NDArray[np.int64]:
        return np.clip(relevant, self.max_k, self.candidates)


def _label_stats_top(
    blocks: _RowBlocks,
    memory_budget_bytes: int,
    query_codes: Tensor,
    gallery_codes: NDArray[np.int64],
    gallery: _GalleryByClass,
    depth: _TopDepth,
) -> _PositionStats:
    """Position statistics of every query (``[Q]`` each; ``average_precision`` left at 0) from the top of
    each ranking only, on CPU.

    Each worker thread scores a range of queries itself (torch runs one thread per worker meanwhile) and
    ranks it at once: the block is still in cache when it is read back (at D = 128 writing the scores to
    memory and reading them again costs as much as computing them), and no OpenMP barrier is shared between
    workers. The budget is split between the workers' blocks; a range is small enough to stay cache-sized
    where the GEMM stays efficient."""
    num_queries = query_codes.numel()
    first_rank = np.full(num_queries, -1, dtype=np.int64)
    map_at_r, r_precision = np.zeros(num_queries), np.zeros(num_queries)
    relevant = (gallery.count[query_codes] - int(depth.excludes_self)).numpy()
    codes = query_codes.numpy()
    with _tile_workers(torch.device("cpu")) as workers, _torch_threads(1 if workers.size > 1 else None):
        budget_rows = rows_per_chunk(blocks.num_columns, blocks.element_size, memory_budget_bytes // workers.size)
        cache_rows = max(_MIN_SCORE_ROWS, _SCORE_TILE_ELEMENTS // blocks.num_columns)
        rows = _STREAM_QUERY_ROWS if blocks.candidates is not None else max(1, min(budget_rows, cache_rows))

        def rank(start: int) -> tuple[int, NDArray[np.int64], NDArray[np.float64], NDArray[np.float64]]:
            stop = min(start + rows, num_queries)
            if blocks.candidates is None:
                scores = blocks.block(start, stop).numpy()
                queries = np.arange(start, stop)
                return start, *_top_positions(
                    scores, queries, codes[start:stop], gallery_codes, relevant[start:stop], depth
                )
            out = (np.full(stop - start, -1, dtype=np.int64), np.zeros(stop - start), np.zeros(stop - start))
            todo = start + np.flatnonzero(relevant[start:stop] > 0)
            if todo.size:
                found = blocks.candidates(todo, depth.of(relevant[todo]) + int(depth.excludes_self))
                ranked = _rank_candidates(*found, todo, codes[todo], gallery_codes, relevant[todo], depth)
                for target, values in zip(out, ranked, strict=True):
                    target[todo - start] = values
            return start, *out

        for start, *ranked in workers.map(rank, range(0, num_queries, rows)):
            for target, values in zip((first_rank, map_at_r, r_precision), ranked, strict=True):
                target[start : start + len(values)] = values
    return _PositionStats(
        torch.from_numpy(first_rank), torch.zeros(num_queries, dtype=torch.float64),
        torch.from_numpy(map_at_r), torch.from_numpy(r_precision),
    )  # fmt: skip


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` for the duration (None: left alone), then restored."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _top_positions(
    scores: NDArray[Any],
    rows: NDArray[np.int64],
    codes: NDArray[np.int64],
    gallery_codes: NDArray[np.int64],
    relevant: NDArray[np.int64],
    depth: _TopDepth,
) -> tuple[NDArray[np.int64], NDArray[np.float64], NDArray[np.float64]]:
    """First rank, MAP@R and R-precision (each ``[b]``) of queries ``rows`` ``[b]`` with class ``codes``
    ``[b]`` and ``relevant`` ``[b]`` relevant items, from their scores ``[b, G]``.

    Queries without a relevant item keep first rank -1. Rows are taken a cache tile at a time, so that the
    candidates are gathered from the core's cache rather than from memory."""
    step = max(1, _TILE_ELEMENTS // scores.shape[1])
    if len(rows) > step:
        parts = [
            _top_positions(scores[s : s + step], rows[s : s + step], codes[s : s + step], gallery_codes,
                           relevant[s : s + step], depth)
            for s in range(0, len(rows), step)
        ]  # fmt: skip
        first_rank, map_at_r, r_precision = (np.concatenate(columns) for columns in zip(*parts, strict=True))
        return first_rank, map_at_r, r_precision
    out = (np.full(len(rows), -1, dtype=np.int64), np.zeros(len(rows)), np.zeros(len(rows)))
    todo = np.flatnonzero(relevant > 0)
    if todo.size:
        some = scores if todo.size == len(rows) else scores[todo]
        ranked = _rank_top(some, rows[todo], codes[todo], gallery_codes, relevant[todo], depth)
        for target, values in zip(out, ranked, strict=True):
            target[todo] = values
    return out


def _top_candidates(scores: NDArray[Any], need: NDArray[np.int64]) -> NDArray[np.int64]:
    """Flat indices into ``scores`` ``[b, G]`` of every score at or above a per-row bound that at least
    ``need`` scores of the row reach (and few more: about need·(1 + need·h/2G)).

    The bound: view each row as h stripes of w = G/h columns; the column maxima ``[b, w]`` are w distinct
    scores of the row, so their ``need``-th largest is at most the row's ``need``-th largest — exact, no
    sampling. Only the ~need columns that reach it have their h scores read again. One SIMD max over the row
    replaces a compare pass plus a scan of its mask."""
    num_rows, width_all = scores.shape
    deepest = int(need.max())
    height = _stripe_height(width_all, deepest)
    width = width_all // height
    stripes = scores[:, : height * width].reshape(num_rows, height, width)
    column_max = np.concatenate([stripes.max(axis=1), scores[:, height * width :]], axis=1)
    if deepest >= column_max.shape[1]:
        return np.arange(scores.size)
    bound = _kth_largest_of_maxima(column_max, deepest)
    row, column = np.divmod(np.flatnonzero(column_max >= bound[:, None]), column_max.shape[1])
    in_stripes = column < width
    stripe_row, stripe_column = row[in_stripes], column[in_stripes]
    flat = (stripe_row * width_all + stripe_column)[:, None] + np.arange(height) * width
    flat = flat[np.take(scores, flat) >= bound[stripe_row][:, None]]
    tail = row[~in_stripes] * width_all + height * width + column[~in_stripes] - width
    return np.concatenate([flat, tail])


def _stripe_height(width: int, deepest: int) -> int:
    """Stripes per row for :func:`_top_candidates`: partitioning the G/h column maxima costs ~G/h, reading
    the candidate columns again ~need·h (at about twice the cost per score), so h = sqrt(G / (2·need))."""
    return max(1, min(width, round(math.sqrt(width / (2 * deepest)))))


def _stream_top(score: Callable[[Tensor], NDArray[Any]], gallery: Tensor, need: NDArray[np.int64]) -> Candidates:
    """Candidates of b queries for :func:`_rank_candidates`, scored against the gallery ``[G, D]`` one
    stripe of columns at a time (``score(gallery_stripe [w, D]) -> [b, w]``), so that no ``[b, G]`` row
    block is ever written to memory and read back.

    Each stripe's scores ``[b, w]`` are still in cache while they update the running column maxima and while
    those at or above each query's bound are kept. The bound is the ``need``-th largest column maximum so
    far (raised after stripes 1, 2, 4, 8, ...): ``need`` distinct scores reach it, and column maxima only
    grow, so it never exceeds the final bound — every score at or above the final bound was kept when its
    stripe went by. Rows are indexed 0 .. b-1 in the result."""
    deepest = int(need.max())
    num_columns, stripe = gallery.shape[0], max(_STRIPE_COLUMNS, _STRIPE_COLUMNS_PER_NEEDED * deepest)
    column_max = bound = np.empty(0)
    kept: list[tuple[NDArray[np.int64], NDArray[np.int64], NDArray[Any]]] = []
    for index, start in enumerate(range(0, num_columns, stripe)):
        tile = score(gallery[start : start + stripe])
        if index == 0:
            column_max, bound = tile.copy(), np.full(tile.shape[0], -np.inf, dtype=tile.dtype)
        else:
            np.maximum(column_max[:, : tile.shape[1]], tile, out=column_max[:, : tile.shape[1]])
        if index & (index + 1) == 0:
            bound = np.maximum(bound, _kth_largest_of_maxima(column_max, deepest))
        mask = _scratch_mask(tile.shape)
        flat = np.flatnonzero(np.greater_equal(tile, bound[:, None], out=mask))
        query, column = np.divmod(flat, tile.shape[1])
        kept.append((query, column + start, np.take(tile, flat)))
    query, column, values = (np.concatenate(parts) for parts in zip(*kept, strict=True))
    stays = values >= np.maximum(bound, _kth_largest_of_maxima(column_max, deepest))[query]
    return query[stays], column[stays], values[stays]


def _kth_largest_of_maxima(column_max: NDArray[Any], deepest: int) -> NDArray[Any]:
    """``[b, w] -> [b]``: each row's ``deepest``-th largest, -inf where the row has fewer entries."""
    if deepest > column_max.shape[1]:
        return np.full(column_max.shape[0], -np.inf, dtype=column_max.dtype)
    kth = column_max.shape[1] - deepest
    return np.partition(column_max, kth, axis=1)[:, kth]


def _rank_top(
    scores: NDArray[Any],
    rows: NDArray[np.int64],
    codes: NDArray[np.int64],
    gallery_codes: NDArray[np.int64],
    relevant: NDArray[np.int64],
    depth: _TopDepth,
) -> tuple[NDArray[np.int64], NDArray[np.float64], NDArray[np.float64]]:
    """First rank, MAP@R and R-precision (each ``[b]``) of queries with at least one relevant item.

    Only the top candidates (:func:`_top_candidates`) are ranked: by score, a non-relevant item before a
    relevant one on ties; the query's own column is no candidate in self-retrieval (so one more is kept).
    Every candidate that scores higher than one of them is one of them, so their positions are exact. A query
    whose relevant items all fall below them gets a first rank of at least its depth: no hit at any cut-off.
    """
    flat = _top_candidates(scores, depth.of(relevant) + int(depth.excludes_self))
    query, column = np.divmod(flat, scores.shape[1])
    return _rank_candidates(query, column, np.take(scores, flat), rows, codes, gallery_codes, relevant, depth)


def _rank_candidates(
    query: NDArray[np.int64],
    column: NDArray[np.int64],
    values: NDArray[Any],
    rows: NDArray[np.int64],
    codes: NDArray[np.int64],
    gallery_codes: NDArray[np.int64],
    relevant: NDArray[np.int64],
    depth: _TopDepth,
) -> tuple[NDArray[np.int64], NDArray[np.float64], NDArray[np.float64]]:
    """:func:`_rank_top` from its candidates: ``query`` (0 .. b-1), gallery ``column`` and score ``values``,
    each ``[C]``, which must hold every score of each query at or above some bound that at least its depth
    (+1 in self-retrieval) of its scores reach."""
    if depth.excludes_self:
        other = column != rows[query]
        query, column, values = query[other], column[other], values[other]
    candidates = np.bincount(query, minlength=len(rows))
    query, hit = _ranked_candidates(query, values, gallery_codes[column] == codes[query])
    start = np.cumsum(candidates) - candidates
    position = np.arange(len(query)) - start[query] + 1
    hits_so_far = np.cumsum(hit)
    hit_number = hits_so_far - np.concatenate([[0], hits_so_far])[start][query]
    first_rank = candidates.copy()
    hit_query, hit_position = query[hit], position[hit]
    first_hit = np.flatnonzero(np.diff(hit_query, prepend=-1) != 0)
    first_rank[hit_query[first_hit]] = hit_position[first_hit] - 1
    in_top_r = hit & (position <= relevant[query])
    precision = hit_number[in_top_r] / position[in_top_r]
    map_at_r = np.bincount(query[in_top_r], weights=precision, minlength=len(rows)) / relevant
    return first_rank, map_at_r, np.bincount(query[in_top_r], minlength=len(rows)) / relevant


def _ranked_candidates(
    query: NDArray[np.int64], values: NDArray[Any], relevant: NDArray[np.bool_]
) -> tuple[NDArray[np.int64], NDArray[np.bool_]]:
    """Candidates ``[C]`` ordered by query, then score descending, then non-relevant first (the tie rule);
    returns their queries and relevance in that order.

    float32 (and float16) scores: one uint64 key per candidate (query, the score's bits made order-preserving
    and inverted, relevance) and numpy's SIMD sort of the keys themselves, several times faster than a
    three-key lexsort; everything needed afterwards is read back from the sorted keys."""
    if values.dtype.itemsize > 4:
        order = np.lexsort((relevant, -values, query))
        return query[order], relevant[order]
    bits = np.ascontiguousarray(values, dtype=np.float32) + np.float32(0)  # -0.0 becomes +0.0: a tie
    negative = (bits.view(np.int32) >> 31).view(np.uint32)
    descending = ~(bits.view(np.uint32) ^ (negative | np.uint32(1 << 31)))
    key = (query.astype(np.uint64) << np.uint64(33)) | (descending.astype(np.uint64) << np.uint64(1))
    key = np.sort(key | relevant.astype(np.uint64))
    return (key >> np.uint64(33)).astype(np.int64), (key & np.uint64(1)).astype(bool)


def _label_summary(stats: _PositionStats, cutoffs: tuple[int, ...], full_map: bool) -> dict[str, float]:
    evaluated = stats.first_rank >= 0
    if not bool(evaluated.any()):
        raise RetrievalInputError("no query has a relevant gallery item (same label): nothing to evaluate")
    first_rank = stats.first_rank[evaluated]
    out: dict[str, float] = {f"r_at_{k}": float((first_rank < k).double().mean().item()) for k in cutoffs}
    out["precision_at_1"] = float((first_rank == 0).double().mean().item())
    if full_map:
        out["map"] = float(stats.average_precision[evaluated].mean().item())
    out["map_at_r"] = float(stats.map_at_r[evaluated].mean().item())
    out["r_precision"] = float(stats.r_precision[evaluated].mean().item())
    out["num_queries"] = evaluated.numel()
    out["num_skipped"] = int((~evaluated).sum().item())
    return out
