"""The plots an evaluation logs: positive vs negative score distributions and the R@K curve, drawn from a
bounded sample of queries of an :class:`~gssf_cli.evaluation.evaluate.Evaluation` (its arrays and its score
function, whichever family scored it), so a figure costs a fraction of the evaluation at any split size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from gssf_cli.evaluation.evaluate import Evaluation

CURVE_KS = (1, 2, 5, 10, 20, 50, 100)
PLOT_SAMPLE = 2000


Samples = tuple[np.ndarray, np.ndarray, dict[str, dict[int, float]], str]
"""Positive scores, negative scores, R@K curves by name, and the curves' y label."""


def figures(evaluation: Evaluation, memory_budget_mb: int) -> dict[str, Any]:
    """Score distributions (positives vs negatives) and the R@K curve, on a bounded sample of queries, as
    ``{artifact file: matplotlib figure}`` (the caller closes them with :func:`gssf_cli.evaluation.plots.close`)."""
    from gssf_cli.evaluation import plots

    budget = memory_budget_mb * 2**20
    sample = _cross_modal_samples if evaluation.layout == "cross_modal" else _label_samples
    positives, negatives, curves, ylabel = sample(evaluation, np.random.default_rng(0), budget)
    out: dict[str, Any] = {}
    if len(positives) and len(negatives):
        out["plots/score_distributions.png"] = plots.score_distributions(
            positives, negatives, f"{evaluation.score_label} scores"
        )
    out["plots/recall_at_k.png"] = plots.recall_curve(curves, "retrieval quality against K", ylabel)
    return out


def _scorer(score_fn: Callable[..., Any] | None) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """``[Bq, D] x [Bg, D] -> [Bq, Bg]`` on numpy arrays: the evaluated metric, or the inner product."""
    import torch

    def score(q: np.ndarray, g: np.ndarray) -> np.ndarray:
        q_t, g_t = torch.from_numpy(np.ascontiguousarray(q)), torch.from_numpy(np.ascontiguousarray(g))
        with torch.no_grad():
            return (score_fn(q_t, g_t) if score_fn is not None else q_t @ g_t.T).numpy()

    return score


def _cross_modal_samples(evaluation: Evaluation, rng: np.random.Generator, budget: int) -> Samples:
    from gssf_cli.evaluation import crossmodal

    images, texts = evaluation.arrays["images"], evaluation.arrays["texts"]
    k = len(texts) // len(images)
    pick = np.sort(rng.choice(len(images), size=min(PLOT_SAMPLE // 4, len(images)), replace=False))
    own = (pick[:, None] * k + np.arange(k)).ravel()
    others = rng.choice(len(texts), size=min(PLOT_SAMPLE, len(texts)), replace=False)
    columns = np.union1d(own, others)
    block = _scorer(evaluation.score_fn)(images[pick], texts[columns])
    same = (columns[None, :] // k) == pick[:, None]
    ranks = crossmodal.cross_modal_ranks(
        images, texts, captions_per_image=k, score_fn=evaluation.score_fn, memory_budget_bytes=budget
    )
    i2t, t2i = ranks.i2t.numpy(), ranks.t2i.numpy()
    curves = {
        "image→text": {c: 100.0 * float(np.mean(i2t < c)) for c in CURVE_KS if c <= len(texts)},
        "text→image": {c: 100.0 * float(np.mean(t2i < c)) for c in CURVE_KS if c <= len(images)},
    }
    return block[same], block[~same], curves, "R@K (%)"


def _label_samples(evaluation: Evaluation, rng: np.random.Generator, budget: int) -> Samples:
    from gssf_cli.evaluation import labels as label_metrics

    arrays, one_set = evaluation.arrays, evaluation.layout == "labels"
    feats = arrays["features" if one_set else "queries"]
    labels = np.asarray(arrays["labels" if one_set else "query_labels"])
    gallery = feats if one_set else arrays["gallery"]
    gallery_labels = labels if one_set else np.asarray(arrays["gallery_labels"])
    rows = np.sort(rng.choice(len(feats), size=min(PLOT_SAMPLE // 4, len(feats)), replace=False))
    cols = np.sort(rng.choice(len(gallery), size=min(PLOT_SAMPLE, len(gallery)), replace=False))
    block = _scorer(evaluation.score_fn)(feats[rows], gallery[cols])
    same = labels[rows][:, None] == gallery_labels[cols][None, :]
    valid = rows[:, None] != cols[None, :] if one_set else np.ones_like(same)
    same &= valid
    curve = label_metrics.evaluate_labels(
        feats,
        labels,
        None if one_set else gallery,
        None if one_set else gallery_labels,
        score_fn=evaluation.score_fn,
        ks=[c for c in CURVE_KS if c <= len(gallery) - 1],
        memory_budget_bytes=budget,
    )
    curves = {"hit rate": {c: 100.0 * curve[f"r_at_{c}"] for c in CURVE_KS if f"r_at_{c}" in curve}}
    return block[same], block[valid & ~same], curves, "R@K: queries with a relevant item in the top K (%)"
