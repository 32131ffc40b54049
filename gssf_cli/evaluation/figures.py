"""The plots an evaluation logs: positive vs negative score distributions and the R@K curve, drawn from a
bounded sample of queries of an :class:`~gssf_cli.evaluation.evaluate.Evaluation` (its arrays and its score
function, whichever family scored it), so a figure costs a fraction of the evaluation at any split size; and
the score sample of a trained run on a split that ``gssf compare --plots`` sets side by side.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from gssf_cli.evaluation.evaluate import Evaluation

if TYPE_CHECKING:
    from gssf_cli.data.dataset import Dataset
    from gssf_cli.evaluation.plots import ScoreSample
    from gssf_cli.modeling.model import RetrievalModel

CURVE_KS = (1, 2, 5, 10, 20, 50, 100)
PLOT_SAMPLE = 2000
"""Columns (captions, gallery items) scored per sample; rows (images, queries) are a quarter of that."""


Curves = tuple[dict[str, dict[int, float]], str]
"""R@K curves by name, and their y label."""


def figures(evaluation: Evaluation, memory_budget_mb: int) -> dict[str, Any]:
    """Score distributions (positives vs negatives) and the R@K curve, on a bounded sample of queries, as
    ``{artifact file: matplotlib figure}`` (the caller closes them with :func:`gssf_cli.evaluation.plots.close`)."""
    from gssf_cli.evaluation import plots

    budget = memory_budget_mb * 2**20
    positives, negatives = score_samples(
        evaluation.layout, evaluation.arrays, evaluation.score_fn, np.random.default_rng(0)
    )
    curve = _cross_modal_curves if evaluation.layout == "cross_modal" else _label_curves
    curves, ylabel = curve(evaluation, budget)
    out: dict[str, Any] = {}
    if len(positives) and len(negatives):
        info = evaluation.result.dataset_info
        sample = plots.ScoreSample(_system(evaluation), positives, negatives, f"score ({evaluation.score_label})")
        split = f", {info['split']} split" if info.get("split") else ""
        out["plots/score_distributions.png"] = plots.similarity_distributions(
            [sample], f"{info.get('name', 'evaluation')}{split}: positive vs negative pairs"
        )
    out["plots/recall_at_k.png"] = plots.recall_curve(curves, "retrieval quality against K", ylabel)
    return out


def _system(evaluation: Evaluation) -> str:
    """What the evaluated scores came from, for a panel's title: the train run, or the metric head, or the score."""
    from gssf_cli.core.limits import model_label

    info = evaluation.result.model_info
    if "metric_head" not in info:
        return evaluation.score_label
    label = model_label(info["metric_head"], info.get("block_size"), info.get("interaction", {}).get("kind", "none"))
    return f"{info['train_run_name']} ({label})" if info.get("train_run_name") else label


def trained_score_sample(model: RetrievalModel, dataset: Dataset, split_name: str, label: str) -> ScoreSample:
    """A trained model's scores on a sample of ``split_name``'s pairs (its metric head over pooled embeddings, or
    its interaction), the split embedded on the CPU as ``gssf evaluate --run`` embeds it; ``label`` names the
    system in the figure. The same rows are drawn for every model of one split (a fixed seed), so the panels of
    a comparison show the same pairs."""
    import torch

    from gssf_cli.evaluation import plots
    from gssf_cli.modeling.model import split_scorer

    split = dataset.split(split_name)
    with torch.no_grad():
        scorer = split_scorer(model, split, torch.device("cpu"))
    if split.task == "cross_modal":
        layout, arrays = "cross_modal", {"images": scorer.images.numpy(), "texts": scorer.texts.numpy()}
    else:
        layout, arrays = "labels", {"features": scorer.images.numpy(), "labels": np.asarray(split.labels)}
    positives, negatives = score_samples(layout, arrays, scorer.score_fn, np.random.default_rng(0))
    return plots.ScoreSample(label, positives, negatives, f"score ({model.label()})")


def score_samples(
    layout: str, arrays: Mapping[str, np.ndarray], score_fn: Callable[..., Any] | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Scores of positive and negative pairs ``([P], [M])`` among a sample of rows, in a layout of
    :func:`gssf_cli.evaluation.evaluate.load_embeddings`: cross-modal, up to ``PLOT_SAMPLE / 4`` images against
    their own captions (positives) and up to ``PLOT_SAMPLE`` others (negatives, with the other images' own);
    label-based, up to ``PLOT_SAMPLE / 4`` queries against up to ``PLOT_SAMPLE`` gallery items, positive where
    the labels agree (an item never paired with itself)."""
    score = _scorer(score_fn)
    if layout == "cross_modal":
        images, texts = arrays["images"], arrays["texts"]
        k = len(texts) // len(images)
        pick = np.sort(rng.choice(len(images), size=min(PLOT_SAMPLE // 4, len(images)), replace=False))
        own = (pick[:, None] * k + np.arange(k)).ravel()
        others = rng.choice(len(texts), size=min(PLOT_SAMPLE, len(texts)), replace=False)
        columns = np.union1d(own, others)
        block = score(images[pick], texts[columns])
        same = (columns[None, :] // k) == pick[:, None]
        return block[same], block[~same]
    one_set = layout == "labels"
    feats = arrays["features" if one_set else "queries"]
    labels = np.asarray(arrays["labels" if one_set else "query_labels"])
    gallery = feats if one_set else arrays["gallery"]
    gallery_labels = labels if one_set else np.asarray(arrays["gallery_labels"])
    rows = np.sort(rng.choice(len(feats), size=min(PLOT_SAMPLE // 4, len(feats)), replace=False))
    cols = np.sort(rng.choice(len(gallery), size=min(PLOT_SAMPLE, len(gallery)), replace=False))
    block = score(feats[rows], gallery[cols])
    same = labels[rows][:, None] == gallery_labels[cols][None, :]
    valid = rows[:, None] != cols[None, :] if one_set else np.ones_like(same)
    same &= valid
    return block[same], block[valid & ~same]


def _scorer(score_fn: Callable[..., Any] | None) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """``[Bq, D] x [Bg, D] -> [Bq, Bg]`` on numpy arrays: the evaluated metric, or the inner product."""
    import torch

    def score(q: np.ndarray, g: np.ndarray) -> np.ndarray:
        q_t, g_t = torch.from_numpy(np.ascontiguousarray(q)), torch.from_numpy(np.ascontiguousarray(g))
        with torch.no_grad():
            return (score_fn(q_t, g_t) if score_fn is not None else q_t @ g_t.T).numpy()

    return score


def _cross_modal_curves(evaluation: Evaluation, budget: int) -> Curves:
    from gssf_cli.evaluation import crossmodal

    images, texts = evaluation.arrays["images"], evaluation.arrays["texts"]
    ranks = crossmodal.cross_modal_ranks(
        images, texts, captions_per_image=len(texts) // len(images), score_fn=evaluation.score_fn,
        memory_budget_bytes=budget,
    )  # fmt: skip
    i2t, t2i = ranks.i2t.numpy(), ranks.t2i.numpy()
    curves = {
        "image→text": {c: 100.0 * float(np.mean(i2t < c)) for c in CURVE_KS if c <= len(texts)},
        "text→image": {c: 100.0 * float(np.mean(t2i < c)) for c in CURVE_KS if c <= len(images)},
    }
    return curves, "R@K (%)"


def _label_curves(evaluation: Evaluation, budget: int) -> Curves:
    from gssf_cli.evaluation import labels as label_metrics

    arrays, one_set = evaluation.arrays, evaluation.layout == "labels"
    feats = arrays["features" if one_set else "queries"]
    labels = np.asarray(arrays["labels" if one_set else "query_labels"])
    gallery = feats if one_set else arrays["gallery"]
    gallery_labels = labels if one_set else np.asarray(arrays["gallery_labels"])
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
    return curves, "R@K: queries with a relevant item in the top K (%)"
