"""Retrieval metrics for cross-modal (image-text) and label-based evaluation, exact and in bounded memory.

Why this module exists: the usual evaluation code (VSE++, SCAN, VSE∞) materialises the whole score matrix
and argsorts every query's row, which needs O(N·M) memory and costs more than computing the scores. A rank
only needs *counts* of gallery items scoring at or above each positive of the query:

- cross-modal (few positives: the k captions of an image, the one image of a caption): k + 1 vectorised
  compare-and-count passes over cache-sized tiles, no sorting at all; from embeddings on CPU each tile is a
  stripe of scores counted as soon as it is computed (:attr:`RowBlocks.stripe`);
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

The metrics on top of it: :mod:`gssf_cli.evaluation.crossmodal` (image-text) and
:mod:`gssf_cli.evaluation.labels` (label-based).
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

from gssf_cli.core.errors import UserInputError

ArrayLike = NDArray[Any] | Tensor
LabelsLike = NDArray[Any] | Tensor | Sequence[Any]
ScoreFn = Callable[[Tensor, Tensor], Tensor]

DEFAULT_MEMORY_BUDGET_BYTES = 256 * 2**20

TILE_ELEMENTS = 2**20
_PARTS_PER_WORKER = 4
SCORE_TILE_ELEMENTS = 2**22
MIN_SCORE_ROWS = 64
STRIPE_COLUMNS = 4096
STREAM_QUERY_ROWS = 256
STREAM_IMAGE_ROWS = 512
STRIPE_COLUMNS_PER_NEEDED = 8
_MAX_COMPARE_PASSES = 8
_PARALLEL_SORT_ELEMENTS = 2**18
_PARTIAL_SORT_MAX_FRACTION = 0.5


class RetrievalInputError(UserInputError):
    """Inputs that cannot be evaluated as asked: a :class:`UserInputError` (one line, exit 2) wherever it is
    raised; callers that know the file or split it came from prefix it, others let it through."""


def inner_product(queries: Tensor, gallery: Tensor) -> Tensor:
    """Default score: ``[Bq, D] x [Bg, D] -> [Bq, Bg]``; cosine similarity for L2-normalised embeddings."""
    return queries @ gallery.T


# ----------------------------------------------------------------------------------------------------------
# Input conversion and validation


def as_tensor(x: ArrayLike, name: str, dtype: torch.dtype, device: torch.device | None = None) -> Tensor:
    """numpy or torch -> detached tensor of ``dtype`` (on ``device`` if given, else where it already is)."""
    try:
        t = torch.as_tensor(x).detach()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise RetrievalInputError(f"{name} must be a numeric array or tensor ({exc})") from None
    if t.is_complex() or t.dtype == torch.bool:
        raise RetrievalInputError(f"{name} must be real-valued, got dtype {t.dtype}")
    return t.to(device=device if device is not None else t.device, dtype=dtype)


def embeddings(x: ArrayLike, name: str, dtype: torch.dtype, device: torch.device | None = None) -> Tensor:
    """Validated embedding matrix ``[N, D]`` with N, D >= 1 and only finite values."""
    t = as_tensor(x, name, dtype, device)
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


def check_dtype(dtype: torch.dtype) -> None:
    if not dtype.is_floating_point:
        raise RetrievalInputError(f"dtype must be a floating-point torch dtype, got {dtype}")


def check_budget(memory_budget_bytes: int) -> None:
    if memory_budget_bytes < 1:
        raise RetrievalInputError(f"memory_budget_bytes must be >= 1, got {memory_budget_bytes}")


def check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    """Distinct cut-offs in increasing order (duplicates would double-count in rsum)."""
    try:
        values = [int(k) for k in ks]
    except (TypeError, ValueError):
        raise RetrievalInputError(f"ks must be positive integers, got {ks!r}") from None
    if not values or any(k < 1 or k != kk for k, kk in zip(values, ks, strict=True)):
        raise RetrievalInputError(f"ks must be a non-empty list of positive integers, got {list(ks)!r}")
    return tuple(sorted(set(values)))


def score_matrix_shape(scores: ArrayLike) -> tuple[int, int]:
    shape = tuple(scores.shape)
    if len(shape) != 2:
        raise RetrievalInputError(f"scores must be a 2-D matrix, got shape {list(shape)}")
    if shape[0] == 0 or shape[1] == 0:
        raise RetrievalInputError(f"scores is empty (shape {list(shape)})")
    return int(shape[0]), int(shape[1])


def check_one_source(what: str, embeddings_given: bool, score_fn: ScoreFn | None, scores: ArrayLike | None) -> None:
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
    check_dtype(dtype)
    check_budget(memory_budget_bytes)
    if scores is not None:
        check_one_source("queries and gallery", queries is not None or gallery is not None, score_fn, scores)
        yield from iter_matrix_chunks(scores, memory_budget_bytes, dtype)
        return
    if queries is None or gallery is None:
        raise RetrievalInputError("give queries and gallery embeddings, or a ready score matrix scores=")
    q = embeddings(queries, "queries", dtype)
    g = embeddings(gallery, "gallery", dtype, q.device)
    check_same_dim(q, g, "queries", "gallery")
    yield from iter_embedding_chunks(q, g, score_fn or inner_product, memory_budget_bytes)


def check_same_dim(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise RetrievalInputError(f"{name_a} and {name_b} have different embedding dims: {a.shape[1]} vs {b.shape[1]}")


Candidates = tuple[NDArray[np.int64], NDArray[np.int64], NDArray[Any]]
"""``(query, column, value)``, each ``[C]``: scores of a few (query, gallery) pairs."""


@dataclass(frozen=True)
class RowBlocks:
    """Rows of the ``[N, M]`` query-by-gallery score matrix on demand: ``block(start, stop)`` is rows
    ``start .. stop - 1``, ``[stop - start, M]``, checked for NaN/Inf. Blocks may be views of a ready matrix:
    do not modify them."""

    num_rows: int
    num_columns: int
    element_size: int
    block: Callable[[int, int], Tensor]
    candidates: Callable[[NDArray[np.int64], NDArray[np.int64]], Candidates] | None = None
    """Given query rows ``[b]`` and their depths ``[b]``: their top candidates (:func:`stream_top`) without
    materialising their rows; None where rows are cheaper read from a ready matrix."""
    stripe: Callable[[int, int, int, int], Tensor] | None = None
    """``stripe(start, stop, first_column, last_column)``: the scores of rows ``start .. stop - 1`` against
    gallery columns ``first_column .. last_column - 1``, ``[stop - start, last_column - first_column]``, computed
    on demand so that a caller can reduce them while they are in cache; None for a ready matrix. With
    ``reuse`` the block is overwritten by the calling thread's next one."""

    def chunks(self, memory_budget_bytes: int) -> Iterator[tuple[int, Tensor]]:
        """``(first_row, block)`` top to bottom, each as many rows as fit the budget."""
        rows = rows_per_chunk(self.num_columns, self.element_size, memory_budget_bytes)
        for start in range(0, self.num_rows, rows):
            block = self.block(start, min(start + rows, self.num_rows))
            yield start, block
            del block


def matrix_blocks(scores: ArrayLike, dtype: torch.dtype) -> RowBlocks:
    """Row blocks of a ready matrix, converted block by block so that a float64 or integer matrix is never
    copied whole."""
    n, m = score_matrix_shape(scores)

    def block(start: int, stop: int) -> Tensor:
        rows = as_tensor(scores[start:stop], "scores", dtype)
        _check_block_finite(rows, start, "scores")
        return rows

    return RowBlocks(n, m, torch.empty((), dtype=dtype).element_size(), block)


def embedding_blocks(queries: Tensor, gallery: Tensor, score_fn: ScoreFn, reuse: bool = False) -> RowBlocks:
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
            block = call_score_fn(score_fn, rows, columns)
        if check:
            _check_block_finite(block, first_row, "score_fn output", NonFiniteScoresError)
        return block

    def candidates(rows: NDArray[np.int64], need: NDArray[np.int64]) -> Candidates:
        return stream_top(lambda g: scores(queries[rows], g, int(rows[0])).numpy(), gallery, need)

    return RowBlocks(
        queries.shape[0],
        gallery.shape[0],
        queries.element_size(),
        lambda start, stop: scores(queries[start:stop], gallery, start),
        candidates if reuse else None,
        lambda start, stop, first, last: scores(queries[start:stop], gallery[first:last], start),
    )


def iter_matrix_chunks(scores: ArrayLike, memory_budget_bytes: int, dtype: torch.dtype) -> Iterator[tuple[int, Tensor]]:
    return matrix_blocks(scores, dtype).chunks(memory_budget_bytes)


def iter_embedding_chunks(
    queries: Tensor, gallery: Tensor, score_fn: ScoreFn, memory_budget_bytes: int
) -> Iterator[tuple[int, Tensor]]:
    return embedding_blocks(queries, gallery, score_fn).chunks(memory_budget_bytes)


def _inner_products_stay_finite(queries: Tensor, gallery: Tensor) -> bool:
    """Whether no inner product of these (finite) rows can overflow, so that checking every score block for
    Inf is unnecessary (a pass as long as the ranking's own at 100,000 x 500,000).

    By Cauchy-Schwarz every partial sum of ``q . g`` is at most ``|q| |g|`` in magnitude; a factor 4 covers
    rounding in any summation order."""
    bound = torch.linalg.vector_norm(queries, dim=1).max() * torch.linalg.vector_norm(gallery, dim=1).max()
    return bool(bound * 4 < torch.finfo(queries.dtype).max)


def call_score_fn(score_fn: ScoreFn, queries: Tensor, gallery: Tensor) -> Tensor:
    """``[b, D] x [m, D] -> [b, m]`` without autograd (evaluation must not build a graph through W)."""
    with torch.no_grad():
        block = score_fn(queries, gallery)
    expected = (queries.shape[0], gallery.shape[0])
    if not isinstance(block, Tensor) or tuple(block.shape) != expected:
        got = list(block.shape) if isinstance(block, Tensor) else type(block).__name__
        raise RetrievalInputError(f"score_fn returned {got}, expected shape {list(expected)}")
    return block.detach().to(queries.dtype)


class NonFiniteScoresError(RetrievalInputError):
    """A score function gave NaN or Inf for finite inputs: the scorer (a model's head) is at fault, not the data."""


def _check_block_finite(
    block: Tensor, start: int, what: str, error: type[RetrievalInputError] = RetrievalInputError
) -> None:
    if not _all_finite(block):
        raise error(f"{what} contain NaN or Inf (rows {start}..{start + block.shape[0] - 1})")


def tiles(block: Tensor) -> Iterator[tuple[int, Tensor]]:
    """Row tiles of a block small enough to stay in cache: the counting passes re-read each tile a few
    times, which is several times faster from cache than from memory."""
    rows = max(1, TILE_ELEMENTS // max(1, block.shape[1]))
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


def count_true(mask: Tensor, dim: int) -> Tensor:
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
        counts = [count_true(tile >= thresholds[:, p : p + 1], dim=1) for p in range(thresholds.shape[1])]
        return torch.stack(counts, dim=1).long()
    thresholds = thresholds.contiguous()
    lowest = torch.where(thresholds.isfinite(), thresholds, float("inf")).amin(1, keepdim=True)

    def count_in(part: Tensor) -> Tensor:
        keep = int(count_true(part >= lowest, dim=1).max())
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


def compare_counts(part: Tensor, row_thresholds: Tensor, column_thresholds: Tensor) -> tuple[Tensor, Tensor]:
    """Counts at or above thresholds along both axes of a row range ``[r, M]`` of a score block.

    Returns ``(rows [r, P], columns [M])``: ``#{j : part[i, j] >= row_thresholds[i, p]}`` and
    ``#{i : part[i, j] >= column_thresholds[j]}``. On CPU the compare passes run in numpy, single-threaded in
    the calling worker: a torch op on a tile is one OpenMP parallel region, and when another process holds a
    core every region waits for the descheduled thread (measured: 26x slower under load). All P + 1 passes
    over a tile are two broadcast ufunc calls and two reductions, all of which release the GIL; tiles of ~1M
    scores keep the GIL hand-overs between the workers rare (smaller, cache-sized tiles measured slower with
    two workers than with one)."""
    if row_thresholds.shape[1] > _MAX_COMPARE_PASSES or not numpy_ok(part):
        rows = _count_at_or_above(part, row_thresholds, None)
        return rows, count_true(part >= column_thresholds, dim=0).long()
    values, thresholds, column_values = part.numpy(), row_thresholds.numpy(), column_thresholds.numpy()
    rows_np = np.empty(thresholds.shape, dtype=np.int64)
    columns_np = np.zeros(values.shape[1], dtype=np.int64)
    num_thresholds, step = thresholds.shape[1], max(1, TILE_ELEMENTS // values.shape[1])
    for start in range(0, values.shape[0], step):
        tile = values[start : start + step]
        masks = scratch_mask((tile.shape[0], num_thresholds + 1, tile.shape[1]))
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


def worker_parts(block: Tensor, workers: int) -> list[tuple[int, Tensor]]:
    """Row ranges of a block, a few per worker: enough for a worker that loses its core to leave the rest to
    the others, few enough that handing them out costs nothing."""
    rows = max(1, -(-block.shape[0] // (workers * _PARTS_PER_WORKER)))
    return [(start, block[start : start + rows]) for start in range(0, block.shape[0], rows)]


def numpy_ok(x: Tensor) -> bool:
    """A CPU tensor numpy can read without conversion (numpy has no bfloat16)."""
    return x.device.type == "cpu" and x.dtype != torch.bfloat16


_thread_scratch = threading.local()


def scratch_mask(shape: Sequence[int]) -> NDArray[np.bool_]:
    """A boolean buffer of ``shape`` reused by the calling thread: a fresh tile-sized array per pass would be
    a fresh mmap and page faults each time."""
    size = int(np.prod(shape))
    buffer = getattr(_thread_scratch, "mask", None)
    if buffer is None or buffer.size < size:
        buffer = np.empty(size, dtype=bool)
        _thread_scratch.mask = buffer
    return buffer[:size].reshape(tuple(shape))


def _scratch_scores(shape: tuple[int, int], dtype: torch.dtype) -> Tensor:
    """A ``shape`` tensor reused by the calling thread (see :func:`embedding_blocks`)."""
    size = shape[0] * shape[1]
    buffer = getattr(_thread_scratch, "scores", None)
    if buffer is None or buffer.numel() < size or buffer.dtype != dtype:
        buffer = torch.empty(size, dtype=dtype)
        _thread_scratch.scores = buffer
    return buffer[:size].view(shape)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` for the duration (None: left alone), then restored.

    Why: worker threads that each run their own small GEMM must not also each start an OpenMP team."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Workers:
    """``map`` over a thread pool, or in the calling thread when ``pool`` is None (one thread, or a device
    where torch already runs in parallel); ``size`` threads."""

    def __init__(self, pool: ThreadPoolExecutor | None, size: int) -> None:
        self.pool, self.size = pool, size

    def map(self, fn: Callable[..., Any], items: Sequence[Any]) -> Iterator[Any]:
        return self.pool.map(fn, items) if self.pool is not None else map(fn, items)


@contextlib.contextmanager
def tile_workers(device: torch.device) -> Iterator[_Workers]:
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


def negatives_at_or_above(
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
class PositionStats:
    """Per-query quantities from the positions of the ranked positives (each ``[queries]``)."""

    first_rank: Tensor
    average_precision: Tensor
    map_at_r: Tensor
    r_precision: Tensor


def position_stats(negatives: Tensor, num_ranked: Tensor) -> PositionStats:
    """negatives ``[b, Q]`` and num_ranked ``[b]`` (all >= 1) from :func:`negatives_at_or_above`.

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
    return PositionStats(
        first_rank=negatives[:, 0],
        average_precision=precision.sum(1) / r_float,
        map_at_r=torch.where(in_top_r, precision, 0.0).sum(1) / r_float,
        r_precision=in_top_r.sum(1) / r_float,
    )


def stripe_height(width: int, deepest: int) -> int:
    """Stripes per row for :func:`_top_candidates`: partitioning the G/h column maxima costs ~G/h, reading
    the candidate columns again ~need·h (at about twice the cost per score), so h = sqrt(G / (2·need))."""
    return max(1, min(width, round(math.sqrt(width / (2 * deepest)))))


def stream_top(score: Callable[[Tensor], NDArray[Any]], gallery: Tensor, need: NDArray[np.int64]) -> Candidates:
    """Candidates of b queries for :func:`_rank_candidates`, scored against the gallery ``[G, D]`` one
    stripe of columns at a time (``score(gallery_stripe [w, D]) -> [b, w]``), so that no ``[b, G]`` row
    block is ever written to memory and read back.

    Each stripe's scores ``[b, w]`` are still in cache while they update the running column maxima and while
    those at or above each query's bound are kept. The bound is the ``need``-th largest column maximum so
    far (raised after stripes 1, 2, 4, 8, ...): ``need`` distinct scores reach it, and column maxima only
    grow, so it never exceeds the final bound — every score at or above the final bound was kept when its
    stripe went by. Rows are indexed 0 .. b-1 in the result."""
    deepest = int(need.max())
    num_columns, stripe = gallery.shape[0], max(STRIPE_COLUMNS, STRIPE_COLUMNS_PER_NEEDED * deepest)
    column_max = bound = np.empty(0)
    kept: list[tuple[NDArray[np.int64], NDArray[np.int64], NDArray[Any]]] = []
    for index, start in enumerate(range(0, num_columns, stripe)):
        tile = score(gallery[start : start + stripe])
        if index == 0:
            column_max, bound = tile.copy(), np.full(tile.shape[0], -np.inf, dtype=tile.dtype)
        else:
            np.maximum(column_max[:, : tile.shape[1]], tile, out=column_max[:, : tile.shape[1]])
        if index & (index + 1) == 0:
            bound = np.maximum(bound, kth_largest_of_maxima(column_max, deepest))
        mask = scratch_mask(tile.shape)
        flat = np.flatnonzero(np.greater_equal(tile, bound[:, None], out=mask))
        query, column = np.divmod(flat, tile.shape[1])
        kept.append((query, column + start, np.take(tile, flat)))
    query, column, values = (np.concatenate(parts) for parts in zip(*kept, strict=True))
    stays = values >= np.maximum(bound, kth_largest_of_maxima(column_max, deepest))[query]
    return query[stays], column[stays], values[stays]


def kth_largest_of_maxima(column_max: NDArray[Any], deepest: int) -> NDArray[Any]:
    """``[b, w] -> [b]``: each row's ``deepest``-th largest, -inf where the row has fewer entries."""
    if deepest > column_max.shape[1]:
        return np.full(column_max.shape[0], -np.inf, dtype=column_max.dtype)
    kth = column_max.shape[1] - deepest
    return np.partition(column_max, kth, axis=1)[:, kth]
