"""The parity gate's verdict on rankings: an exported model must rank a split as PyTorch does.

Why ranks and not only numbers: an export can drift by less than any sensible tolerance and still reorder items,
which changes what a user retrieves (peers have shipped such exports). So beside the per-graph checks
(:func:`allclose_report`), the gate scores the whole test split both ways and demands:

- every score within ``atol + rtol·|torch|``;
- each query's top 10 the same, where order differences only between items whose torch scores are within
  ``2·atol`` count as equal (:func:`near_tie`);
- every relevant item at the same rank, up to the same near ties (:func:`rank_changes`): so every rank-based
  metric (:data:`~gssf_cli.core.metrics.RANK_METRICS`: R@K, rSum, median and mean rank, mAP) is identical, except
  where two items' torch scores lie within float32 noise of each other — then no scorer, torch on another device
  included, could promise their order, and the metric may move in its last digits (the report lists which).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from gssf_cli.core import metrics as registry

if TYPE_CHECKING:
    from gssf_cli.data.dataset import Split

TOP = 10


def allclose_report(got: np.ndarray, expected: np.ndarray, atol: float, rtol: float) -> dict[str, Any]:
    """``|got - expected| <= atol + rtol·|expected|`` elementwise, with the largest absolute and relative gaps."""
    diff = np.abs(got - expected)
    rel = diff / np.maximum(np.abs(expected), 1e-12)
    return {
        "max_abs_diff": float(diff.max()) if diff.size else 0.0,
        "max_rel_diff": float(rel.max()) if rel.size else 0.0,
        "passed": bool(np.all(diff <= atol + rtol * np.abs(expected))),
    }


def rank_parity(
    split: Split, torch_scores: np.ndarray, ort_scores: np.ndarray, atol: float, rtol: float
) -> dict[str, Any]:
    """The rank-level gate on a whole split's scores ``[N, M]`` (images × captions, or items × items): see the
    module docstring. ``passed`` needs the scores within tolerance, the top 10 equal up to near ties and no
    relevant item's rank changed beyond a near tie."""
    from gssf_cli.evaluation import crossmodal
    from gssf_cli.evaluation import labels as label_metrics

    task = split.task
    torch_scores, ort_scores = np.array(torch_scores, dtype=np.float32), np.array(ort_scores, dtype=np.float32)
    if task == "cross_modal":
        torch_metrics = crossmodal.evaluate_cross_modal(scores=torch_scores, captions_per_image=split.k)
        ort_metrics = crossmodal.evaluate_cross_modal(scores=ort_scores, captions_per_image=split.k)
        relevant = np.arange(torch_scores.shape[1])[None, :] // split.k == np.arange(torch_scores.shape[0])[:, None]
        changes = [rank_changes(torch_scores, ort_scores, relevant, atol),
                   rank_changes(torch_scores.T, ort_scores.T, relevant.T, atol)]  # fmt: skip
    else:
        torch_metrics = label_metrics.evaluate_labels(None, split.labels, scores=torch_scores)
        ort_metrics = label_metrics.evaluate_labels(None, split.labels, scores=ort_scores)
        np.fill_diagonal(torch_scores, -np.inf)
        np.fill_diagonal(ort_scores, -np.inf)
        labels = np.asarray(split.labels)
        relevant = labels[:, None] == labels[None, :]
        np.fill_diagonal(relevant, False)
        changes = [rank_changes(torch_scores, ort_scores, relevant, atol)]
    keys = registry.RANK_METRICS[task]
    finite = np.isfinite(torch_scores)
    scores = allclose_report(ort_scores[finite], torch_scores[finite], atol, rtol)
    top_torch = np.argsort(-torch_scores, axis=1, kind="stable")[:, :TOP]
    top_ort = np.argsort(-ort_scores, axis=1, kind="stable")[:, :TOP]
    identical = (top_torch == top_ort).all(axis=1)
    explained = np.array([
        same or near_tie(torch_scores[i], top_torch[i], top_ort[i], atol)
        for i, same in enumerate(identical)
    ])  # fmt: skip
    changed, beyond_ties = (sum(c[i] for c in changes) for i in (0, 1))
    return {
        "queries": len(identical),
        "top10_identical": float(identical.mean()),
        "top10_equal_up_to_ties": float(explained.mean()),
        "metrics_torch": {k: torch_metrics[k] for k in keys},
        "metrics_onnx": {k: ort_metrics[k] for k in keys},
        "metrics_different": [k for k in keys if abs(torch_metrics[k] - ort_metrics[k]) >= 1e-9],
        "relevant_ranks_changed": changed,
        "relevant_ranks_changed_beyond_ties": beyond_ties,
        "max_abs_score_diff": scores["max_abs_diff"],
        "passed": bool(scores["passed"] and explained.all() and beyond_ties == 0),
    }


def rank_changes(
    torch_scores: np.ndarray, ort_scores: np.ndarray, relevant: np.ndarray, atol: float
) -> tuple[int, int]:
    """How many relevant items (``relevant [Q, M]``) have a non-relevant item ahead of them under one scorer and
    not the other — ahead by evaluation's tie rule (:mod:`gssf_cli.evaluation.ranking`: a non-relevant item scoring
    at least as high), so these are exactly the changes that can move a metric: ``(all such items, those where
    some such item's torch score is more than 2·atol from theirs)``. The second is what the gate forbids: a swap
    between items further apart than the tolerance is a real reordering."""
    changed = beyond = 0
    for query in range(torch_scores.shape[0]):
        items = np.flatnonzero(relevant[query])
        if items.size == 0:
            continue
        t, o, other = torch_scores[query], ort_scores[query], ~relevant[query][None, :]
        swapped = ((t[None, :] >= t[items, None]) ^ (o[None, :] >= o[items, None])) & other
        far = np.abs(t[None, :] - t[items, None]) > 2 * atol
        changed += int(swapped.any(axis=1).sum())
        beyond += int((swapped & far).any(axis=1).sum())
    return changed, beyond


def near_tie(scores: np.ndarray, a: np.ndarray, b: np.ndarray, atol: float) -> bool:
    """Two top-K lists differ only in the order (or at the cut) of items whose scores are within ``atol``."""
    if set(a.tolist()) != set(b.tolist()):
        boundary = scores[a[-1]]
        outsiders = set(a.tolist()) ^ set(b.tolist())
        if any(abs(scores[i] - boundary) > 2 * atol for i in outsiders):
            return False
    mismatch = a != b
    return bool(np.all(np.abs(scores[a[mismatch]] - scores[b[mismatch]]) <= 2 * atol))
