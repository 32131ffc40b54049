"""Significance testing between retrieval systems: per-query values and paired tests over queries.

Why: two trained runs that differ by a point of R@1 on a test split of a few hundred images may differ by
chance alone — chance in *which* queries the test split happens to hold. The standard answer in IR evaluation
is a paired test with the query as the sampling unit: both systems answer the same queries, so each query
gives one paired difference, and the test asks whether the mean of those differences is distinguishable from
zero given how much they vary from query to query (Smucker, Allan & Carterette, "A comparison of statistical
significance tests for information retrieval evaluation", CIKM 2007, who recommend the randomization test and
find the bootstrap to agree with it; the paired bootstrap as in Koehn, "Statistical significance tests for
machine translation evaluation", EMNLP 2004, and Berg-Kirkpatrick, Burkett & Klein, "An empirical
investigation of statistical significance in NLP", EMNLP 2012).

Units. Every metric compared here is the mean over *units* of a per-unit value, a matrix ``U [N, M]``
(:class:`Units`); its column means are exactly what :mod:`~gssf_cli.evaluation.crossmodal` and :mod:`~gssf_cli.evaluation.labels`
report for the same embeddings.

- Cross-modal (N images, k captions each): the unit is an image together with its k captions, so that the
  image→text and text→image metrics share one sampling unit and stay paired (the k captions of an image are
  not independent queries: they describe one picture, and resampling them apart would understate the
  variance). Per unit i: ``i2t_rK`` = 100·[rank of its best caption < K]; ``t2i_rK`` = 100·(mean over its k
  captions of [rank of the image < K]); ``rsum`` = the sum of those; ``i2t_map`` = 100·AP of its k captions;
  ``i2t_meanr`` = its 1-based rank, ``t2i_meanr`` = the mean 1-based rank of its captions. Medians
  (``i2t_medr``, ``t2i_medr``) are not means over units and are left out of the tests (reported as such).
  Under ``coco-1k`` each unit is ranked within its fold of 1,000 images; the folds are equally large, so the
  mean over units is the mean over folds that the protocol reports.
- Label-based: the unit is the query (an item with at least one relevant gallery item; the others count in no
  metric): ``precision_at_1``, ``map_at_r``, ``r_precision``, ``r_at_K`` (and ``map`` with the full ranking).

Tests, for each metric and each compared system against the baseline, on the per-unit differences
``d_i = U_other[i] - U_baseline[i]``:

- the difference of the means, ``mean(d)``;
- a paired bootstrap confidence interval: units are resampled with replacement B times, the same resample for
  both systems (and for every metric and system: common random numbers), and the interval is the percentile
  interval of the resampled mean differences. Resamples are drawn as counts per unit, ``W [B, N]``, so that
  all B means of all metrics are one matrix product ``W @ d / N`` (never a ``B x N x M`` gather);
- a p-value from the paired randomization test (sign flips): under the null hypothesis that the two systems
  are exchangeable on every unit, each ``d_i`` is as likely to have the opposite sign; the two-sided p-value
  is the share of sign assignments whose ``|sum|`` is at least the observed one. It is exact (all ``2^n``
  assignments of the n non-zero differences) when ``2^n`` is at most the number of permutations asked for,
  and otherwise estimated from that many random assignments as ``(1 + hits) / (1 + permutations)``, which
  never reports 0 (Phipson & Smyth 2010).

Both are seeded (``seed``) and deterministic: the draws do not depend on the machine or on the number of
metrics or systems compared. What they assume: the test queries are a random sample from the queries the
systems are meant for, and units are independent of each other. They do *not* capture the variance from
training (another seed gives another model): to compare configurations rather than two trained models,
compare groups of runs (several seeds each), whose per-unit values are averaged over the group's runs
(:func:`average_units`) before the test. No correction for testing many metrics at once is applied: the
metrics are strongly correlated, and the p-values are reported as they are.

numpy only at import; embedding and ranking import torch when they are called.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from gssf_cli.core import metrics as registry
from gssf_cli.core.errors import UserInputError

if TYPE_CHECKING:
    from pathlib import Path

    from gssf_cli.data.dataset import Dataset
    from gssf_cli.evaluation.ranking import ArrayLike, LabelsLike, ScoreFn
    from gssf_cli.modeling.model import RetrievalModel

__all__ = [
    "CITATIONS",
    "NOT_TESTED",
    "Comparison",
    "MetricComparison",
    "Units",
    "average_units",
    "bootstrap_means",
    "check_paired",
    "compare_units",
    "cross_modal_units",
    "embedding_units",
    "format_p",
    "format_value",
    "label_units",
    "markdown_table",
    "sign_flip_pvalues",
    "trained_units",
]

CITATIONS: tuple[str, ...] = (
    "Smucker, Allan & Carterette. A comparison of statistical significance tests for information retrieval "
    "evaluation. CIKM 2007.",
    "Koehn. Statistical significance tests for machine translation evaluation. EMNLP 2004.",
    "Berg-Kirkpatrick, Burkett & Klein. An empirical investigation of statistical significance in NLP. EMNLP 2012.",
)
NOT_TESTED: dict[str, str] = {
    "i2t_medr": "a median rank is not a mean over units: not tested (i2t_meanr is)",
    "t2i_medr": "a median rank is not a mean over units: not tested (t2i_meanr is)",
}
"""Cross-modal metrics of ``gssf evaluate`` that the paired tests leave out, and why."""

RESAMPLE_ROWS = 256
"""Resamples (or sign assignments) drawn per block: a constant, so that the draws, and so the results, are the
same on every machine whatever its memory."""
_COUNT_ROWS = 32
"""Resamples counted per ``np.bincount`` call: 32 x N counters stay in cache (the whole block's measured ~2x
slower)."""
_TIE_TOLERANCE = 1e-9
"""Relative tolerance when comparing a permuted |sum| with the observed one: the same sum added in another
order must count as a tie (identical systems get p = 1)."""


# ---------------------------------------------------------------------------------------------------------
# Units: the per-unit values whose means are the metrics


@dataclass(frozen=True)
class Units:
    """Per-unit values ``values [N, M]`` (float64) of metrics ``metrics`` (the columns), for units ``ids``
    ``[N]`` (image or query indices in the split), of task ``task``; ``unit`` says what a unit is."""

    task: str
    metrics: tuple[str, ...]
    values: NDArray[np.float64]
    ids: NDArray[np.int64]
    unit: str

    def __post_init__(self) -> None:
        if self.values.shape != (len(self.ids), len(self.metrics)):
            raise ValueError(f"values {self.values.shape} do not match {len(self.ids)} units x {len(self.metrics)}")

    @property
    def size(self) -> int:
        return len(self.ids)

    def means(self) -> dict[str, float]:
        """The metrics themselves: the mean of each column."""
        return {name: float(value) for name, value in zip(self.metrics, self.values.mean(axis=0), strict=True)}


def cross_modal_units(
    i2t: ArrayLike, t2i: ArrayLike, i2t_ap: ArrayLike, captions_per_image: int, ks: Sequence[int] = (1, 5, 10)
) -> Units:
    """Units of cross-modal ranks (0-based, as :class:`gssf_cli.evaluation.crossmodal.CrossModalRanks` holds them: ``i2t``
    ``[N]``, ``t2i`` ``[kN]`` in image order, ``i2t_ap`` ``[N]`` in 0..1): one unit per image with its k captions.

    Columns: ``rsum``, ``i2t_r{K}``, ``t2i_r{K}``, ``i2t_map``, ``i2t_meanr``, ``t2i_meanr`` (see the module
    docstring); their means are :func:`gssf_cli.evaluation.crossmodal.cross_modal_metrics`' values."""
    cutoffs = sorted({int(k) for k in ks})
    i2t_rank = _numpy(i2t).astype(np.float64)
    n, k = len(i2t_rank), int(captions_per_image)
    t2i_rank = _numpy(t2i).astype(np.float64)
    if t2i_rank.shape != (n * k,):
        raise ValueError(f"t2i has {t2i_rank.shape[0]} ranks, expected {n} images x {k} captions")
    t2i_rank = t2i_rank.reshape(n, k)
    columns: dict[str, NDArray[np.float64]] = {}
    for cutoff in cutoffs:
        columns[f"i2t_r{cutoff}"] = np.where(i2t_rank < cutoff, 100.0, 0.0)
    for cutoff in cutoffs:
        columns[f"t2i_r{cutoff}"] = np.where(t2i_rank < cutoff, 100.0, 0.0).mean(axis=1)
    rsum = np.sum([columns[name] for name in columns], axis=0)
    columns = {"rsum": rsum, **columns}
    columns["i2t_map"] = 100.0 * _numpy(i2t_ap).astype(np.float64)
    columns["i2t_meanr"] = i2t_rank + 1.0
    columns["t2i_meanr"] = t2i_rank.mean(axis=1) + 1.0
    names = tuple(columns)
    values = np.stack([columns[name] for name in names], axis=1)
    return Units("cross_modal", names, values, np.arange(n, dtype=np.int64), f"image with its {k} captions")


def label_units(
    first_rank: ArrayLike,
    map_at_r: ArrayLike,
    r_precision: ArrayLike,
    ks: Sequence[int] = (1, 5, 10),
    average_precision: ArrayLike | None = None,
) -> Units:
    """Units of label-based per-query values (:class:`gssf_cli.evaluation.labels.LabelQueryStats`): one per query with
    a relevant gallery item (``first_rank >= 0``); the others count in no metric and are left out.

    Columns: ``map_at_r``, ``precision_at_1``, ``r_precision``, ``r_at_{K}``, and ``map`` when
    ``average_precision`` is given; their means are :func:`gssf_cli.evaluation.labels.evaluate_labels`' values."""
    first = _numpy(first_rank).astype(np.int64)
    ids = np.flatnonzero(first >= 0).astype(np.int64)
    if ids.size == 0:
        raise UserInputError("no query has a relevant gallery item (same label): nothing to compare")
    first = first[ids]
    columns: dict[str, NDArray[np.float64]] = {
        "map_at_r": _numpy(map_at_r).astype(np.float64)[ids],
        "precision_at_1": (first == 0).astype(np.float64),
        "r_precision": _numpy(r_precision).astype(np.float64)[ids],
    }
    for cutoff in sorted({int(k) for k in ks}):
        columns[f"r_at_{cutoff}"] = (first < cutoff).astype(np.float64)
    if average_precision is not None:
        columns["map"] = _numpy(average_precision).astype(np.float64)[ids]
    names = tuple(columns)
    return Units("labels", names, np.stack([columns[n] for n in names], axis=1), ids, "query")


def _numpy(x: Any) -> NDArray[Any]:
    """A numpy array of a numpy array or a (CPU or device) torch tensor."""
    if hasattr(x, "detach"):
        return np.asarray(x.detach().cpu().numpy())
    return np.asarray(x)


def embedding_units(
    task: str,
    images: ArrayLike,
    texts: ArrayLike | None = None,
    labels: LabelsLike | None = None,
    *,
    captions_per_image: int = 1,
    protocol: str = "all",
    score_fn: ScoreFn | None = None,
    ks: Sequence[int] = (1, 5, 10),
    memory_budget_bytes: int = 256 * 2**20,
    full_map: bool = False,
) -> Units:
    """Units of embeddings: cross-modal ``images [N, D]`` and ``texts [kN, D]`` under ``protocol``, or
    label-based ``images`` (the items, searched against themselves) with ``labels``; scored by ``score_fn``
    (default inner product). Ranks come from :mod:`gssf_cli.evaluation.ranking`'s chunked passes: no score matrix is
    held whole, however large the split."""
    from gssf_cli.evaluation import crossmodal
    from gssf_cli.evaluation import labels as label_metrics

    if task == "cross_modal":
        if texts is None:
            raise UserInputError("cross-modal units need texts beside the images")
        ranks = crossmodal.cross_modal_fold_ranks(
            images,
            texts,
            captions_per_image=captions_per_image,
            protocol=protocol,
            score_fn=score_fn,
            memory_budget_bytes=memory_budget_bytes,
        )
        return cross_modal_units(ranks.i2t, ranks.t2i, ranks.i2t_ap, captions_per_image, ks)
    if labels is None:
        raise UserInputError("label-based units need labels")
    stats = label_metrics.label_query_stats(
        images, labels, score_fn=score_fn, ks=ks, memory_budget_bytes=memory_budget_bytes, full_map=full_map
    )
    return label_units(stats.first_rank, stats.map_at_r, stats.r_precision, ks, stats.average_precision)


def trained_units(
    model: RetrievalModel,
    dataset: Dataset,
    split_name: str,
    *,
    protocol: str = "all",
    ks: Sequence[int] = (1, 5, 10),
    memory_budget_bytes: int = 256 * 2**20,
    full_map: bool = False,
) -> Units:
    """Units of a trained model on a split of its dataset: the split embedded on the CPU as ``gssf evaluate
    --run`` embeds it (:func:`gssf_cli.modeling.model.split_scorer`) and scored as the model scores (its metric
    head, or its interaction over every pair)."""
    import torch

    from gssf_cli.modeling.model import split_scorer

    split = dataset.split(split_name)
    with torch.no_grad():
        scorer = split_scorer(model, split, torch.device("cpu"))
    try:
        units = embedding_units(
            split.task,
            scorer.images,
            scorer.texts,
            split.labels if split.task == "labels" else None,
            captions_per_image=split.k,
            protocol=protocol,
            score_fn=scorer.score_fn,
            ks=ks,
            memory_budget_bytes=memory_budget_bytes,
            full_map=full_map,
        )
    except UserInputError as exc:
        raise UserInputError(f"{dataset.folder} ({split_name} split): {exc}") from None
    if split.task != "cross_modal" or units.size != split.num_images:
        return units
    return with_intra_modal(units, dataset.folder, split_name, scorer.pooled, split.k)


def with_intra_modal(units: Units, folder: Path, split: str, pooled: tuple[Any, Any], captions_per_image: int) -> Units:
    """``units`` (one per image) with the split's intra-modal columns beside the cross-modal ones
    (:func:`gssf_cli.evaluation.intramodal.unit_columns`), so that compare tests them like the others."""
    from gssf_cli.evaluation.intramodal import split_intra_modal, unit_columns

    images, texts = (_numpy(side) for side in pooled)
    _, found, _ = split_intra_modal(folder, split, images, texts, captions_per_image)
    columns = unit_columns(found, len(images), captions_per_image)
    if not columns:
        return units
    values = np.hstack([units.values, np.stack(list(columns.values()), axis=1)])
    return Units(units.task, (*units.metrics, *columns), values, units.ids, units.unit)


def average_units(group: Sequence[Units]) -> Units:
    """The per-unit mean over a group of runs (several seeds of one configuration): the group's metrics are
    then the means of its runs' metrics, and the paired test compares configurations on the same units."""
    first = group[0]
    for other in group[1:]:
        check_paired(first, other)
    if len(group) == 1:
        return first
    values = np.mean([units.values for units in group], axis=0)
    return Units(first.task, first.metrics, values, first.ids, first.unit)


def check_paired(a: Units, b: Units) -> None:
    """Two systems' units can be paired: same task, metrics and units (a mismatch is a bug or a changed
    split, never a user's choice)."""
    if a.task != b.task or a.metrics != b.metrics or not np.array_equal(a.ids, b.ids):
        raise UserInputError(
            f"the runs were not measured on the same units ({a.task}, {a.size} units vs {b.task}, {b.size}): "
            "compare runs on the same dataset, split and protocol"
        )


# ---------------------------------------------------------------------------------------------------------
# The statistics


def _check_differences(differences: NDArray[Any]) -> NDArray[np.float64]:
    d = np.asarray(differences, dtype=np.float64)
    if d.ndim == 1:
        d = d[:, None]
    if d.ndim != 2 or d.shape[0] == 0:
        raise ValueError(f"differences must be [N, C] with N >= 1, got shape {list(d.shape)}")
    if not np.isfinite(d).all():
        raise ValueError("differences contain NaN or Inf")
    return np.ascontiguousarray(d)


BOOTSTRAP_COPIES = 3
"""Arrays of ``[resamples, columns]`` float64 alive at once at the bootstrap's peak: the means, and the sorted
copy and the deviations that the quantiles and the standard error make of them."""


def check_bootstrap_fits(resamples: int, columns: int, available: int | None = None) -> None:
    """Refuse a bootstrap whose resample means (``[resamples, columns]`` float64, :data:`BOOTSTRAP_COPIES` at
    once) would not fit in the memory available now (``available`` bytes, by default read from the machine), with
    what it needs, instead of dying in the allocation."""
    from gssf_cli.core.files import available_memory, format_bytes

    available = available_memory() if available is None else available
    needed = resamples * columns * 8 * BOOTSTRAP_COPIES
    if available is not None and needed > available:
        raise UserInputError(
            f"compare: {resamples:,} bootstrap resamples of {columns} differences need {format_bytes(needed)} of "
            f"memory, but this machine has {format_bytes(available)} available; lower --bootstrap"
        )


def bootstrap_means(differences: NDArray[Any], resamples: int, rng: np.random.Generator) -> NDArray[np.float64]:
    """``[resamples, C]``: the mean of each column of ``differences`` ``[N, C]`` over ``resamples`` bootstrap
    resamples of its rows (rows drawn with replacement, N per resample; one resample for all columns).

    Each block of resamples is a matrix of counts per row, ``W [b, N]`` (how often each unit was drawn), so the
    means of every column are ``W @ d / N``: one GEMM, memory ``b x N`` at a time (``b`` =
    :data:`RESAMPLE_ROWS`)."""
    d = _check_differences(differences)
    n = d.shape[0]
    out = np.empty((resamples, d.shape[1]))
    counts = np.empty((RESAMPLE_ROWS, n))
    offsets = (np.arange(_COUNT_ROWS) * n)[:, None]
    for start in range(0, resamples, RESAMPLE_ROWS):
        rows = min(RESAMPLE_ROWS, resamples - start)
        picks = rng.integers(0, n, size=(rows, n), dtype=np.int32)
        for first in range(0, rows, _COUNT_ROWS):  # a few rows per bincount: its table stays in cache
            part = picks[first : first + _COUNT_ROWS]
            flat = (part + offsets[: len(part)]).ravel()
            counts[first : first + len(part)] = np.bincount(flat, minlength=len(part) * n).reshape(len(part), n)
        np.matmul(counts[:rows], d, out=out[start : start + rows])
    out /= n
    return out


EXACT_MOST = 20
"""The most non-zero differences a column may have for its sign-flip test to be enumerated (2^20 sign vectors,
160 MiB of ±1 at most); beyond, ``permutations`` random ones are drawn, however many are asked for."""


def sign_flip_pvalues(
    differences: NDArray[Any], permutations: int, rng: np.random.Generator
) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """Two-sided p-values of the paired randomization (sign-flip) test for each column of ``differences``
    ``[N, C]``, and whether each is exact.

    The statistic is ``|sum(d)|`` (equivalently ``|mean(d)|``). A column with m non-zero differences and
    ``2^m <= permutations`` is enumerated: p = (assignments with ``|sum| >= observed``) / 2^m, exact (zeros
    do not change under a flip; an all-zero column gets p = 1). The others share ``permutations`` random
    assignments of signs to the N units: p = (1 + hits) / (1 + permutations)."""
    d = _check_differences(differences)
    n, columns = d.shape
    observed = np.abs(d.sum(axis=0))
    tolerance = _TIE_TOLERANCE * np.abs(d).sum(axis=0)
    p = np.ones(columns)
    exact = np.zeros(columns, dtype=bool)
    exact_limit = min(math.floor(math.log2(permutations)), EXACT_MOST) if permutations >= 1 else 0
    sampled: list[int] = []
    for column in range(columns):
        nonzero = d[:, column][d[:, column] != 0]
        if nonzero.size <= exact_limit:
            sums = np.abs(_all_signs(nonzero.size) @ nonzero)
            p[column] = float(np.mean(sums >= observed[column] - tolerance[column]))
            exact[column] = True
        else:
            sampled.append(column)
    if sampled:
        sub = d[:, sampled]
        total = sub.sum(axis=0)
        hits = np.zeros(len(sampled), dtype=np.int64)
        flips = np.empty((RESAMPLE_ROWS, n))
        for start in range(0, permutations, RESAMPLE_ROWS):
            rows = min(RESAMPLE_ROWS, permutations - start)
            random_bytes = rng.integers(0, 256, size=(rows, (n + 7) // 8), dtype=np.uint8)
            flips[:rows] = np.unpackbits(random_bytes, axis=1, count=n)  # one random bit per unit
            # signs s = 2·flip - 1, so s @ d = 2·(flip @ d) - sum(d): one GEMM on a 0/1 matrix
            sums = np.abs(2.0 * (flips[:rows] @ sub) - total)
            hits += (sums >= observed[sampled] - tolerance[sampled]).sum(axis=0)
        p[sampled] = (1.0 + hits) / (1.0 + permutations)
    return p, exact


def _all_signs(m: int) -> NDArray[np.float64]:
    """``[2^m, m]``: every assignment of signs ±1 to m values."""
    bits = (np.arange(2**m)[:, None] >> np.arange(m)[None, :]) & 1
    return (2.0 * bits - 1.0).astype(np.float64)


@dataclass(frozen=True)
class MetricComparison:
    """One metric of one compared system against the baseline: both means, their difference (other minus
    baseline), its bootstrap interval at ``confidence`` and standard error, the sign-flip p-value (``p_exact``:
    enumerated, not sampled), and the verdict at level ``alpha`` = 1 - confidence."""

    metric: str
    compared: str
    baseline: float
    other: float
    difference: float
    ci_low: float
    ci_high: float
    std_error: float
    p_value: float
    p_exact: bool
    higher_is_better: bool
    alpha: float

    @property
    def significant(self) -> bool:
        return self.p_value < self.alpha

    @property
    def verdict(self) -> str:
        """``better`` / ``worse`` (significant at ``alpha``, in the metric's own direction) or ``n.s.``."""
        if not self.significant or self.difference == 0:
            return "n.s."
        return "better" if (self.difference > 0) == self.higher_is_better else "worse"

    def to_json(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "compared": self.compared,
            "baseline": self.baseline,
            "other": self.other,
            "difference": self.difference,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "std_error": self.std_error,
            "p_value": self.p_value,
            "p_exact": self.p_exact,
            "significant": self.significant,
            "verdict": self.verdict,
            "higher_is_better": self.higher_is_better,
        }


@dataclass(frozen=True)
class Comparison:
    """Every compared system against the baseline, metric by metric (rows grouped by system, metrics in the
    units' order), and the settings that produced them."""

    rows: list[MetricComparison]
    units: int
    bootstrap: int
    permutations: int
    confidence: float
    seed: int
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def compare_units(
    baseline: Units,
    others: Mapping[str, Units],
    *,
    bootstrap: int = 10_000,
    permutations: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Comparison:
    """Paired tests of every system in ``others`` (label -> units) against ``baseline`` on every metric.

    The bootstrap and the permutations draw from two independent streams of ``np.random.SeedSequence(seed)``
    and are shared by every metric and system (common random numbers), so the result for one system does not
    depend on which others are compared beside it."""
    import time

    if not 0.0 < confidence < 1.0:
        raise UserInputError(f"confidence must be between 0 and 1, got {confidence}")
    if bootstrap < 1 or permutations < 1:
        raise UserInputError("bootstrap resamples and permutations must be at least 1")
    if not others:
        raise UserInputError("nothing to compare: give the baseline and at least one other run")
    check_bootstrap_fits(bootstrap, len(baseline.metrics) * len(others))
    started = time.perf_counter()
    for units in others.values():
        check_paired(baseline, units)
    labels = list(others)
    m = len(baseline.metrics)
    differences = np.concatenate([others[label].values - baseline.values for label in labels], axis=1)
    boot_stream, perm_stream = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    means = bootstrap_means(differences, bootstrap, boot_stream)
    alpha = 1.0 - confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2], axis=0)
    std_error = means.std(axis=0, ddof=1) if bootstrap > 1 else np.zeros(differences.shape[1])
    p_values, exact = sign_flip_pvalues(differences, permutations, perm_stream)
    base_means = baseline.values.mean(axis=0)
    rows: list[MetricComparison] = []
    for index, label in enumerate(labels):
        other_means = others[label].values.mean(axis=0)
        for j, metric in enumerate(baseline.metrics):
            column = index * m + j
            rows.append(
                MetricComparison(
                    metric=metric,
                    compared=label,
                    baseline=float(base_means[j]),
                    other=float(other_means[j]),
                    difference=float(differences[:, column].mean()),
                    ci_low=float(low[column]),
                    ci_high=float(high[column]),
                    std_error=float(std_error[column]),
                    p_value=float(p_values[column]),
                    p_exact=bool(exact[column]),
                    higher_is_better=registry.get(metric).higher_is_better,
                    alpha=alpha,
                )
            )
    seconds = round(time.perf_counter() - started, 3)
    return Comparison(rows, baseline.size, bootstrap, permutations, confidence, seed, seconds)


# ---------------------------------------------------------------------------------------------------------
# How a comparison reads


def format_value(metric: str, value: float) -> str:
    """Fractions with 4 decimals, percentages, their sums and ranks with 2."""
    try:
        unit = registry.get(metric).unit
    except KeyError:
        unit = ""
    return f"{value:.4f}" if unit == "fraction" else f"{value:.2f}"


def format_p(p: float) -> str:
    return "<0.0001" if p < 1e-4 else f"{p:.4f}"


def markdown_table(payload: dict[str, Any]) -> str:
    """The comparison as a Markdown table (``comparison.md``); a label's ``|`` (``--name`` allows one) is escaped,
    so that it stays in its cell."""
    confidence = round(100 * payload["settings"]["confidence"])
    protocol = f", protocol {payload['protocol']}" if payload.get("protocol") else ""
    lines = [
        f"# gssf compare: {payload['dataset']['name']}, {payload['split']} split{protocol}",
        "",
        f"Baseline: {payload['baseline']['label']} "
        f"({', '.join(run['run_id'] for run in payload['baseline']['runs'])}). "
        f"{payload['units']:,} units ({payload['unit']}); paired bootstrap with "
        f"{payload['settings']['bootstrap']:,} resamples, sign-flip test with "
        f"{payload['settings']['permutations']:,} permutations, seed {payload['settings']['seed']}.",
        "",
        f"| metric | compared | baseline | compared value | difference | {confidence}% CI | p-value | verdict |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in payload["rows"]:
        metric, compared = row["metric"], row["compared"].replace("|", "\\|")
        lines.append(
            f"| {metric} | {compared} | {format_value(metric, row['baseline'])} | "
            f"{format_value(metric, row['other'])} | {format_value(metric, row['difference'])} | "
            f"[{format_value(metric, row['ci_low'])}, {format_value(metric, row['ci_high'])}] | "
            f"{format_p(row['p_value'])} | {row['verdict']} |"
        )
    if payload.get("not_tested"):
        lines += ["", "Not tested: " + "; ".join(f"{k}: {v}" for k, v in payload["not_tested"].items()) + "."]
    return "\n".join(lines) + "\n"


def units_arrays(averaged: Sequence[Units], per_run: Mapping[str, Units]) -> dict[str, NDArray[Any]]:
    """What ``units.npz`` holds (plain arrays, read with ``allow_pickle=False``; see :func:`units_readme`)."""
    return {
        "metrics": np.array(averaged[0].metrics, dtype=np.str_),
        "unit_ids": averaged[0].ids,
        **{f"system_{i}": units.values for i, units in enumerate(averaged)},
        **{f"run_{run_id}": units.values for run_id, units in per_run.items()},
    }


def units_readme(systems: Sequence[tuple[str, Sequence[str]]]) -> str:
    """A text beside ``units.npz`` naming its arrays; ``systems``: (label, run ids) per argument, baseline first."""
    lines = [
        "units.npz (numpy.load(path, allow_pickle=False)):",
        "  metrics      [M] metric names, the columns of every matrix",
        "  unit_ids     [N] the units' indices in the split (images, or queries with a relevant item)",
        "  system_<i>   [N, M] per-unit values of argument i (0 = the baseline; a group: its runs' mean)",
        "  run_<run id> [N, M] per-unit values of one run",
        "",
        *(f"system_{i}: {label} = {', '.join(runs)}" for i, (label, runs) in enumerate(systems)),
    ]
    return "\n".join(lines) + "\n"


METHOD: dict[str, Any] = {
    "unit": "the query (cross-modal: an image with its captions), resampled and permuted as a whole",
    "difference": "mean over units of (compared - baseline)",
    "interval": "paired bootstrap, percentile interval, units resampled with replacement",
    "p_value": "paired randomization test (sign flips of the per-unit differences), two-sided; "
    "exact when 2^n <= permutations, else (1 + hits) / (1 + permutations)",
    "groups": "a comma-separated group of runs is averaged per unit before the test",
    "multiple_testing": "none: p-values are per metric and per compared run",
    "citations": list(CITATIONS),
}
"""What the tests assume and do, in words (the ``method`` of every comparison's JSON)."""
