"""Cross-modal retrieval metrics (image→text and text→image R@K, medr, meanr, rsum, i2t mAP) and the
field's test protocols (Flickr30K 1K, COCO 1K folds, COCO 5K), on the bounded-memory engine of
:mod:`gssf_cli.evaluation.ranking`.

Cross-modal (:func:`evaluate_cross_modal`): N images, k·N captions in image order (captions ``k*i ..
k*i+k-1`` belong to image i), S ``[N, kN]``. 0-based ranks:

- i2t rank of image i = #non-positive captions j with ``S[i, j] >= max of S over i's k positives``;
- t2i rank of caption j = #images i' != img(j) with ``S[i', j] >= S[img(j), j]`` (same S, its columns, so an
  asymmetric score is handled as in the literature);
- R@K = 100·mean(rank < K); medr = floor(median(rank)) + 1; meanr = mean(rank) + 1; rsum = the true sum of
  all i2t and t2i R@K (600 at most for ks = (1, 5, 10));
- i2t_map = 100·mean over images of AP over the k positives, in the tie-broken order (negatives before
  positives on ties). Percent, like the recalls next to it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gssf_cli.core.limits import PROTOCOLS
from gssf_cli.evaluation import ranking  # its stripe sizes read at call time: one value to tune or patch
from gssf_cli.evaluation.ranking import (
    DEFAULT_MEMORY_BUDGET_BYTES,
    ArrayLike,
    RetrievalInputError,
    ScoreFn,
    as_tensor,
    call_score_fn,
    check_budget,
    check_dtype,
    check_ks,
    check_one_source,
    check_same_dim,
    compare_counts,
    count_true,
    embedding_blocks,
    embeddings,
    inner_product,
    iter_matrix_chunks,
    numpy_ok,
    position_stats,
    score_matrix_shape,
    tile_workers,
    torch_threads,
    worker_parts,
)

CROSS_MODAL_PROTOCOLS = PROTOCOLS
PROTOCOL_IMAGES = {"f30k-1k": 1_000, "coco-1k": 5_000, "coco-5k": 5_000}
"""Images in each protocol's test split."""
RANKING_PROTOCOLS = ("all", *PROTOCOL_IMAGES)
"""The protocols ranked here. The others (``eccv``, ``cxc``) rank a COCO test split by its COCO ids through the
``eccv_caption`` package: :mod:`gssf_cli.evaluation.coco_protocols`, for ``gssf evaluate --run`` alone."""
COCO_1K_FOLD_IMAGES = 1_000
POSITIVE_PASS_IMAGES = 32


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
    """Both directions' ranks from ONE pass over S ``[N, kN]``.

    Why one pass: t2i needs columns of S, and a second pass over caption chunks would double the scoring
    cost. Instead each image-row block adds its column counts, compared against the positive score of each
    caption, which is known before the pass: gathered from ``scores``, or computed by a cheap pass over
    matching ``[32, 32k]`` image/caption blocks with ``score_fn``. (With a score_fn that positive score may
    differ from the value inside the big block in the last bit; the self-comparison is subtracted exactly,
    so only a tie within one ulp could be judged differently from a one-shot matrix.)

    Embeddings on CPU are scored a ``[b, w]`` stripe at a time by worker threads that reduce each stripe to
    counts while it is in cache (:func:`_rank_cross_modal_stream`): no score block makes a round trip through
    memory, and the memory budget is not needed. A ready matrix, or another device, goes by row chunks of the
    budget's size.

    images ``[N, D]``, texts ``[kN, D]`` with caption rows ``k*i .. k*i+k-1`` belonging to image i;
    ``score_fn(images_chunk [b, D], texts [kN, D]) -> [b, kN]`` (default inner product); or ``scores``
    ``[N, kN]``.
    """
    check_dtype(dtype)
    check_budget(memory_budget_bytes)
    k = _check_captions_per_image(captions_per_image)
    check_one_source("images and texts", images is not None or texts is not None, score_fn, scores)
    if scores is not None:
        n, m = score_matrix_shape(scores)
        _check_caption_count(n, m, k, f"scores has shape [{n}, {m}]")
        positive_scores = _positive_scores_from_matrix(scores, k, dtype)
        chunks = iter_matrix_chunks(scores, memory_budget_bytes, dtype)
    else:
        if images is None or texts is None:
            raise RetrievalInputError("give both images and texts embeddings (or a ready score matrix scores=)")
        img = embeddings(images, "images", dtype)
        txt = embeddings(texts, "texts", dtype, img.device)
        check_same_dim(img, txt, "images", "texts")
        n, m = img.shape[0], txt.shape[0]
        _check_caption_count(n, m, k, f"{n} images and {m} captions")
        fn = score_fn or inner_product
        if numpy_ok(img):
            return _rank_cross_modal_stream(img, txt, k, fn)
        positive_scores = _positive_scores_from_embeddings(img, txt, k, fn)
        chunks = embedding_blocks(img, txt, fn).chunks(memory_budget_bytes)
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
    return as_tensor(scores[captions // k, captions], "scores", dtype)


def _positive_scores_from_embeddings(images: Tensor, texts: Tensor, k: int, score_fn: ScoreFn) -> Tensor:
    """``[kN]``: each caption scored against its own image, through small diagonal blocks of S so that the
    extra work is ~32/N of the full scoring (an interaction scores every pair it is given, so this pass costs
    it that share too)."""
    starts = range(0, images.shape[0], POSITIVE_PASS_IMAGES)
    return torch.cat([_positive_block(images, texts, k, score_fn, start) for start in starts])


def _positive_block(images: Tensor, texts: Tensor, k: int, score_fn: ScoreFn, start: int) -> Tensor:
    """``[k·b]``: the positive scores of the captions of images ``start .. start + b - 1`` (b =
    :data:`POSITIVE_PASS_IMAGES` or fewer at the end), from their ``[b, k·b]`` diagonal block of S."""
    stop = min(start + POSITIVE_PASS_IMAGES, images.shape[0])
    block = call_score_fn(score_fn, images[start:stop], texts[k * start : k * stop])
    b = stop - start
    return torch.diagonal(block.reshape(b, b, k), dim1=0, dim2=1).T.reshape(-1)


def _rank_cross_modal_chunks(
    chunks: Iterator[tuple[int, Tensor]], positive_scores: Tensor, n: int, k: int
) -> CrossModalRanks:
    """Fill per-image counts and per-caption column counts range by range, then turn them into ranks once
    (:func:`_ranks_from_counts`). Chunks are ``(first_row, block [rows, kN])``."""
    device = positive_scores.device
    positives = torch.empty(n, k, dtype=positive_scores.dtype, device=device)
    thresholds = torch.empty(n, k, dtype=positive_scores.dtype, device=device)
    at_or_above = torch.empty(n, k, dtype=torch.long, device=device)
    t2i_at_or_above = torch.zeros(n * k, dtype=torch.long, device=device)
    offsets = torch.arange(k, device=device)
    with tile_workers(device) as workers:
        for chunk_start, block in chunks:
            rows = slice(chunk_start, chunk_start + block.shape[0])
            images = torch.arange(rows.start, rows.stop, device=device)
            positives[rows] = block.gather(1, (images * k).unsqueeze(1) + offsets)
            thresholds[rows] = positives[rows].sort(dim=1, descending=True).values
            parts = worker_parts(block, workers.size)
            counted = workers.map(
                lambda part: compare_counts(part[1], thresholds[part[0] : part[0] + part[1].shape[0]], positive_scores),
                [(chunk_start + start, part) for start, part in parts],
            )
            for (start, part), (row_counts, column_counts) in zip(parts, counted, strict=True):
                at_or_above[chunk_start + start : chunk_start + start + part.shape[0]] = row_counts
                t2i_at_or_above += column_counts
            del block, parts, part  # release this chunk (and its views) before the next is scored: one alive
    return _ranks_from_counts(positives, thresholds, at_or_above, t2i_at_or_above, positive_scores)


def _rank_cross_modal_stream(images: Tensor, texts: Tensor, k: int, score_fn: ScoreFn) -> CrossModalRanks:
    """:func:`_rank_cross_modal_chunks` without the row chunks: each worker thread takes a range of b images
    and scores it against the captions a stripe of w columns at a time (torch on one thread per worker), and
    counts each ``[b, w]`` stripe while it is still in cache.

    Why: with the whole ``[b, kN]`` rows written to memory and read back for the compare passes, the
    evaluation measured 1.18x the bare GEMM; reduced in cache, only the compare work itself is added. The
    stripes of a range start at its own captions' columns (``k*start``) and wrap around, so that the first
    stripe holds the range's positives: its thresholds are known before any score is counted, and they are
    the very values of the stripes they are compared with. The positive pass
    (:func:`_positive_scores_from_embeddings`) runs in the same workers: its blocks are too small for an
    OpenMP team, whose every barrier waits for a thread that another process has descheduled.

    images ``[N, D]``, texts ``[kN, D]``, ``score_fn(images [b, D], texts [w, D]) -> [b, w]``."""
    n, m = images.shape[0], texts.shape[0]
    rows, width = _stream_shape(k)
    positives = torch.empty(n, k, dtype=images.dtype)
    thresholds = torch.empty(n, k, dtype=images.dtype)
    at_or_above = torch.empty(n, k, dtype=torch.long)
    t2i_at_or_above = torch.zeros(m, dtype=torch.long)

    with tile_workers(torch.device("cpu")) as workers, torch_threads(1 if workers.size > 1 else None):
        positive = partial(_positive_block, images, texts, k, score_fn)
        positive_scores = torch.cat(list(workers.map(positive, range(0, n, POSITIVE_PASS_IMAGES))))
        stripe = embedding_blocks(images, texts, score_fn, reuse=True).stripe
        assert stripe is not None

        def rank(start: int) -> tuple[int, Tensor, Tensor, Tensor, Tensor]:
            stop = min(start + rows, n)
            row_counts = torch.zeros(stop - start, k, dtype=torch.long)
            column_counts = torch.zeros(m, dtype=torch.long)
            for first, last in _wrapped_stripes(k * start, m, width):
                scores = stripe(start, stop, first, last)
                if first == k * start:
                    own = scores.gather(1, (torch.arange(stop - start) * k).unsqueeze(1) + torch.arange(k))
                    descending = own.sort(dim=1, descending=True).values
                counted_rows, counted_columns = compare_counts(scores, descending, positive_scores[first:last])
                row_counts += counted_rows
                column_counts[first:last] += counted_columns
            return start, own, descending, row_counts, column_counts

        for start, own, descending, row_counts, column_counts in workers.map(rank, range(0, n, rows)):
            stop = start + own.shape[0]
            positives[start:stop], thresholds[start:stop], at_or_above[start:stop] = own, descending, row_counts
            t2i_at_or_above += column_counts
    return _ranks_from_counts(positives, thresholds, at_or_above, t2i_at_or_above, positive_scores)


def _stream_shape(k: int) -> tuple[int, int]:
    """``(b, w)``: images per worker range and captions per stripe, the stripe ``[b, w]`` cache-sized and at
    least as wide as the range's own ``k·b`` captions (so that its first stripe holds all its positives)."""
    rows = max(1, min(ranking.STREAM_IMAGE_ROWS, ranking.STRIPE_COLUMNS // k))
    return rows, max(ranking.STRIPE_COLUMNS, k * rows)


def _wrapped_stripes(first: int, num_columns: int, width: int) -> Iterator[tuple[int, int]]:
    """Column ranges ``(first, last)`` of at most ``width`` columns covering ``0 .. num_columns - 1`` once,
    starting at column ``first`` and wrapping around to 0."""
    for start in range(first, num_columns, width):
        yield start, min(start + width, num_columns)
    for start in range(0, first, width):
        yield start, min(start + width, first)


def _ranks_from_counts(
    positives: Tensor, thresholds: Tensor, at_or_above: Tensor, t2i_at_or_above: Tensor, positive_scores: Tensor
) -> CrossModalRanks:
    """Ranks from the raw counts of one pass over S: positives ``[N, k]`` (each image's own captions' scores
    in caption order), thresholds ``[N, k]`` (the same, descending), at_or_above ``[N, k]`` (captions scoring
    >= each threshold), t2i_at_or_above ``[kN]`` (images scoring >= each caption's positive score
    ``positive_scores`` ``[kN]``). The rank and AP arithmetic runs once over all N images here, so that the
    work per range is the compare passes and nothing else."""
    n, k = positives.shape
    positives_at_or_above = count_true(positives.unsqueeze(1) >= thresholds.unsqueeze(2), dim=2)
    stats = position_stats(at_or_above - positives_at_or_above, torch.full((n,), k, device=positives.device))
    t2i_self = (positives >= positive_scores.view(n, k)).reshape(-1).long()
    return CrossModalRanks(i2t=stats.first_rank, t2i=t2i_at_or_above - t2i_self, i2t_ap=stats.average_precision)


def cross_modal_metrics(ranks: CrossModalRanks, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Summary of :class:`CrossModalRanks`: ``i2t_r{K}``, ``t2i_r{K}`` (percent), ``rsum`` (their true sum),
    ``i2t_medr``, ``t2i_medr``, ``i2t_meanr``, ``t2i_meanr`` (1-based), ``i2t_map`` (percent)."""
    cutoffs = check_ks(ks)
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
    check_ks(ks)
    if protocol not in CROSS_MODAL_PROTOCOLS:
        raise RetrievalInputError(f"unknown protocol {protocol!r}; choose one of {', '.join(CROSS_MODAL_PROTOCOLS)}")
    k = _check_captions_per_image(captions_per_image)
    check_one_source("images and texts", images is not None or texts is not None, score_fn, scores)
    if scores is not None:
        n, m = score_matrix_shape(scores)
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


def check_ranking_protocol(protocol: str) -> None:
    """Refuse a protocol that is unknown, or that is not a ranking of the split (ECCV, CxC: COCO ids)."""
    if protocol not in CROSS_MODAL_PROTOCOLS:
        raise RetrievalInputError(f"unknown protocol {protocol!r}; choose one of {', '.join(CROSS_MODAL_PROTOCOLS)}")
    if protocol not in RANKING_PROTOCOLS:
        raise RetrievalInputError(
            f"protocol {protocol} ranks COCO test images by their COCO ids, which only `gssf evaluate --run` reads (with "
            f"no --shortlist); here use one of {', '.join(RANKING_PROTOCOLS)}"
        )


def protocol_folds(num_images: int, protocol: str) -> list[tuple[int, int]]:
    """The image ranges ``[(start, stop), ...]`` a protocol evaluates separately: five folds of 1,000 for
    ``coco-1k``, the whole split otherwise. A protocol that names a test set size refuses any other
    (:class:`RetrievalInputError`); ``all`` takes any."""
    check_ranking_protocol(protocol)
    expected = PROTOCOL_IMAGES.get(protocol)
    if expected is not None and num_images != expected:
        raise RetrievalInputError(
            f"protocol {protocol} needs {expected:,} images, got {num_images:,}; use --protocol all to evaluate the "
            "whole split"
        )
    fold_images = COCO_1K_FOLD_IMAGES if protocol == "coco-1k" else num_images
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
