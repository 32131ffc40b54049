"""Label-based retrieval metrics (MAP@R, R-precision, P@1, R@K, full mAP) on the bounded-memory engine of
:mod:`gssf_cli.evaluation.ranking`.

Label-based (:func:`evaluate_labels`), as pytorch-metric-learning's AccuracyCalculator but exact over the
whole gallery: fractions in [0, 1] for ``r_at_K`` (a relevant item in the top K), ``precision_at_1``,
``map_at_r`` and ``r_precision`` (R = #relevant items of the query), and with ``full_map=True`` ``map`` (AP
over the full ranking).
When the gallery is the query set, each query is removed from its own gallery. Queries with no relevant
gallery item are skipped: they count in no mean, and are reported as ``num_skipped``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from gssf_cli.evaluation import ranking  # its tile and stripe sizes read at call time: one value to tune or patch
from gssf_cli.evaluation.ranking import (
    DEFAULT_MEMORY_BUDGET_BYTES,
    ArrayLike,
    LabelsLike,
    PositionStats,
    RetrievalInputError,
    RowBlocks,
    ScoreFn,
    check_budget,
    check_dtype,
    check_ks,
    check_one_source,
    check_same_dim,
    embedding_blocks,
    embeddings,
    inner_product,
    kth_largest_of_maxima,
    matrix_blocks,
    negatives_at_or_above,
    position_stats,
    rows_per_chunk,
    score_matrix_shape,
    tile_workers,
    tiles,
    torch_threads,
)


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
) -> tuple[PositionStats, tuple[int, ...]]:
    """The work of :func:`evaluate_labels` up to its summary: every query's position statistics, and the
    checked cut-offs."""
    check_dtype(dtype)
    check_budget(memory_budget_bytes)
    cutoffs = check_ks(ks)
    if query_labels is None:
        raise RetrievalInputError("query_labels are missing")
    check_one_source("queries", queries is not None, score_fn, scores)
    if scores is not None:
        if gallery is not None:
            raise RetrievalInputError("with scores= give gallery_labels only, not gallery embeddings")
        num_queries, num_gallery = score_matrix_shape(scores)
        excludes_self = gallery_labels is None
        if excludes_self and num_queries != num_gallery:
            raise RetrievalInputError(
                f"scores has shape [{num_queries}, {num_gallery}]: without gallery_labels the gallery is the "
                "query set, so scores must be square"
            )
        blocks = matrix_blocks(scores, dtype)
        device = torch.device("cpu") if not isinstance(scores, Tensor) else scores.device
    else:
        assert queries is not None
        q = embeddings(queries, "queries", dtype)
        excludes_self = gallery is None
        if excludes_self and gallery_labels is not None:
            raise RetrievalInputError("gallery_labels given without gallery embeddings")
        if not excludes_self and gallery_labels is None:
            raise RetrievalInputError("gallery embeddings given without gallery_labels")
        g = q if gallery is None else embeddings(gallery, "gallery", dtype, q.device)
        check_same_dim(q, g, "queries", "gallery")
        num_queries, num_gallery = q.shape[0], g.shape[0]
        blocks = embedding_blocks(q, g, score_fn or inner_product, reuse=not full_map)
        device = q.device
    query_codes, gallery_codes = _label_codes(query_labels, gallery_labels, num_queries, num_gallery)
    num_classes = int(max(query_codes.max(), gallery_codes.max())) + 1
    by_class = _group_by_class(gallery_codes, num_classes, device)
    codes = torch.from_numpy(query_codes).to(device)
    if full_map or not ranking.numpy_ok(torch.empty(0, dtype=dtype, device=device)):
        stats = _label_stats(blocks.chunks(memory_budget_bytes), codes, by_class, excludes_self)
    else:
        depth = _TopDepth(max(cutoffs), num_gallery - int(excludes_self), excludes_self)
        stats = _label_stats_top(blocks, memory_budget_bytes, codes, gallery_codes, by_class, depth)
    return stats, cutoffs


def _label_stats(
    chunks: Iterator[tuple[int, Tensor]], query_codes: Tensor, gallery: _GalleryByClass, excludes_self: bool
) -> PositionStats:
    """Position statistics of every query, ``[Q]`` each, filled chunk by chunk into preallocated tensors (a
    small tensor per tile would cost far more memory than its values). Queries without a relevant gallery
    item keep ``first_rank = -1``."""
    num_queries, device = query_codes.numel(), query_codes.device
    stats = PositionStats(
        first_rank=torch.full((num_queries,), -1, dtype=torch.long, device=device),
        average_precision=torch.zeros(num_queries, dtype=torch.float64, device=device),
        map_at_r=torch.zeros(num_queries, dtype=torch.float64, device=device),
        r_precision=torch.zeros(num_queries, dtype=torch.float64, device=device),
    )
    with tile_workers(device) as workers:
        for chunk_start, block in chunks:
            for tile_start, tile in tiles(block):
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
                negatives, num_ranked = negatives_at_or_above(tile, relevant, valid, ranked, workers.pool)
                tile_stats = position_stats(negatives, num_ranked)
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
    blocks: RowBlocks,
    memory_budget_bytes: int,
    query_codes: Tensor,
    gallery_codes: NDArray[np.int64],
    gallery: _GalleryByClass,
    depth: _TopDepth,
) -> PositionStats:
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
    with tile_workers(torch.device("cpu")) as workers, torch_threads(1 if workers.size > 1 else None):
        budget_rows = rows_per_chunk(blocks.num_columns, blocks.element_size, memory_budget_bytes // workers.size)
        cache_rows = max(ranking.MIN_SCORE_ROWS, ranking.SCORE_TILE_ELEMENTS // blocks.num_columns)
        rows = ranking.STREAM_QUERY_ROWS if blocks.candidates is not None else max(1, min(budget_rows, cache_rows))

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
    return PositionStats(
        torch.from_numpy(first_rank), torch.zeros(num_queries, dtype=torch.float64),
        torch.from_numpy(map_at_r), torch.from_numpy(r_precision),
    )  # fmt: skip


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
    step = max(1, ranking.TILE_ELEMENTS // scores.shape[1])
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
    height = ranking.stripe_height(width_all, deepest)
    width = width_all // height
    stripes = scores[:, : height * width].reshape(num_rows, height, width)
    column_max = np.concatenate([stripes.max(axis=1), scores[:, height * width :]], axis=1)
    if deepest >= column_max.shape[1]:
        return np.arange(scores.size)
    bound = kth_largest_of_maxima(column_max, deepest)
    row, column = np.divmod(np.flatnonzero(column_max >= bound[:, None]), column_max.shape[1])
    in_stripes = column < width
    stripe_row, stripe_column = row[in_stripes], column[in_stripes]
    flat = (stripe_row * width_all + stripe_column)[:, None] + np.arange(height) * width
    flat = flat[np.take(scores, flat) >= bound[stripe_row][:, None]]
    tail = row[~in_stripes] * width_all + height * width + column[~in_stripes] - width
    return np.concatenate([flat, tail])


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


def _label_summary(stats: PositionStats, cutoffs: tuple[int, ...], full_map: bool) -> dict[str, float]:
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
