"""Shared by the tests of gssf_cli.evaluation (crossmodal, labels, ranking, comparison): slow, obviously-correct
references that sort every row completely in plain Python (ties broken with non-relevant items first), the
checks that compare with them, and the small problems they are run on. Not a test module."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from gssf_cli.evaluation import labels as label_metrics
from gssf_cli.evaluation import ranking as retrieval

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------------------------------------
# Reference implementations: sort every row completely, ties broken with non-relevant items first


def ranked_relevance(scores: Sequence[float], relevant: Sequence[bool]) -> list[bool]:
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], relevant[j]))
    return [relevant[j] for j in order]


def reference_cross_modal(s: np.ndarray, k: int, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    n, m = s.shape
    i2t, aps = [], []
    for i in range(n):
        rel = ranked_relevance(list(s[i]), [j // k == i for j in range(m)])
        positions = [p for p, r in enumerate(rel) if r]
        i2t.append(positions[0])
        aps.append(sum((h + 1) / (p + 1) for h, p in enumerate(positions)) / len(positions))
    t2i = []
    for j in range(m):
        rel = ranked_relevance(list(s[:, j]), [i == j // k for i in range(n)])
        t2i.append(rel.index(True))
    out: dict[str, float] = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for cutoff in ks:
            out[f"{name}_r{cutoff}"] = 100.0 * sum(r < cutoff for r in ranks) / len(ranks)
    out["rsum"] = sum(out.values())
    out["i2t_medr"] = math.floor(statistics.median(i2t)) + 1
    out["t2i_medr"] = math.floor(statistics.median(t2i)) + 1
    out["i2t_meanr"] = sum(i2t) / len(i2t) + 1
    out["t2i_meanr"] = sum(t2i) / len(t2i) + 1
    out["i2t_map"] = 100.0 * sum(aps) / len(aps)
    return out


def reference_labels(
    s: np.ndarray, query_labels: Sequence[int], gallery_labels: Sequence[int], exclude_self: bool, ks=(1, 5, 10)
) -> dict[str, float] | None:
    per_query: list[dict[str, float]] = []
    for q in range(s.shape[0]):
        columns = [j for j in range(s.shape[1]) if not (exclude_self and j == q)]
        rel = ranked_relevance([s[q, j] for j in columns], [gallery_labels[j] == query_labels[q] for j in columns])
        r = sum(rel)
        if r == 0:
            continue
        hits, ap, ap_at_r = 0, 0.0, 0.0
        for position, is_relevant in enumerate(rel, start=1):
            if is_relevant:
                hits += 1
                ap += hits / position
                if position <= r:
                    ap_at_r += hits / position
        first = rel.index(True)
        metrics = {f"r_at_{cutoff}": float(first < cutoff) for cutoff in ks}
        metrics |= {
            "precision_at_1": float(rel[0]),
            "map": ap / r,
            "map_at_r": ap_at_r / r,
            "r_precision": sum(rel[:r]) / r,
        }
        per_query.append(metrics)
    if not per_query:
        return None
    out = {key: sum(m[key] for m in per_query) / len(per_query) for key in per_query[0]}
    out["num_queries"] = s.shape[0]
    out["num_skipped"] = s.shape[0] - len(per_query)
    return out


def assert_metrics_equal(got: dict[str, Any], expected: dict[str, float]) -> None:
    assert set(expected) <= set(got)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


def evaluate_labels(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Both ways of evaluating labels: from the top of each ranking (the default) and from the full ranking
    (``full_map=True``). They must agree on every metric but ``map``, which only the full ranking has; the
    full result is returned, for the tests to compare with their references."""
    full = label_metrics.evaluate_labels(*args, full_map=True, **kwargs)
    top = label_metrics.evaluate_labels(*args, **kwargs)
    assert "map" not in top
    assert top == pytest.approx({key: value for key, value in full.items() if key != "map"}, abs=1e-12)
    return full


def metrics_only(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k not in ("protocol", "folds")}


# ----------------------------------------------------------------------------------------------------------
# Per-query references (comparison's units): every row sorted in plain Python


def _order(scores: Sequence[float], relevant: Sequence[bool]) -> list[bool]:
    return [relevant[j] for j in sorted(range(len(scores)), key=lambda j: (-scores[j], relevant[j]))]


def reference_cross_modal_ranks(s: np.ndarray, k: int) -> tuple[list[int], list[int], list[float]]:
    n, m = s.shape
    i2t, aps, t2i = [], [], []
    for i in range(n):
        ranked = _order(list(s[i]), [j // k == i for j in range(m)])
        positions = [p for p, r in enumerate(ranked) if r]
        i2t.append(positions[0])
        aps.append(sum((h + 1) / (p + 1) for h, p in enumerate(positions)) / len(positions))
    for j in range(m):
        t2i.append(_order(list(s[:, j]), [i == j // k for i in range(n)]).index(True))
    return i2t, t2i, aps


def reference_label_stats(s: np.ndarray, labels: Sequence[int]) -> list[tuple[int, float, float, float] | None]:
    """Per query (self-retrieval): first rank, MAP@R, R-precision, AP; None without a relevant item."""
    out: list[tuple[int, float, float, float] | None] = []
    for q in range(s.shape[0]):
        columns = [j for j in range(s.shape[1]) if j != q]
        ranked = _order([s[q, j] for j in columns], [labels[j] == labels[q] for j in columns])
        r = sum(ranked)
        if r == 0:
            out.append(None)
            continue
        hits, ap, ap_at_r = 0, 0.0, 0.0
        for position, relevant in enumerate(ranked, start=1):
            if relevant:
                hits += 1
                ap += hits / position
                ap_at_r += hits / position if position <= r else 0.0
        out.append((ranked.index(True), ap_at_r / r, sum(ranked[:r]) / r, ap / r))
    return out


# ----------------------------------------------------------------------------------------------------------
# Small problems


small_int_embeddings = st.integers(-2, 2)


def _pairs(n: int, k: int, d: int = 6, noise: float = 0.8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n, d))
    texts = np.repeat(images, k, axis=0) + noise * rng.normal(size=(n * k, d))
    return images.astype(np.float32), texts.astype(np.float32)


def _asymmetric(seed: int = 3, d: int = 6) -> retrieval.ScoreFn:
    w = torch.from_numpy(np.random.default_rng(seed).normal(size=(d, d)).astype(np.float32))
    return lambda q, g: (q @ w) @ g.T


def _labelled(n: int = 50, classes: int = 6, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=n)
    labels[-1] = classes + 5  # one query with no relevant item: counts in no metric
    feats = np.eye(classes + 6, 8)[labels] + 0.9 * rng.normal(size=(n, 8))
    return feats.astype(np.float32), labels
