"""gssf_cli.evaluation.labels against slow, obviously-correct references (tests/unit/evaluation/references.py):
hand-computed fixtures, the top-of-ranking candidates (column maxima, streamed gallery stripes) kept exact, the
sorting path for many positives, per-query stats, and input errors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gssf_cli.evaluation import labels as label_metrics
from gssf_cli.evaluation import ranking as retrieval
from gssf_cli.evaluation.ranking import RetrievalInputError
from tests.unit.evaluation.references import (
    FAST,
    _labelled,
    assert_metrics_equal,
    evaluate_labels,
    reference_label_stats,
    reference_labels,
    small_int_embeddings,
)

# ----------------------------------------------------------------------------------------------------------
# Strategies


@st.composite
def label_problems(draw: st.DrawFn) -> tuple[np.ndarray, list[int], list[int] | None]:
    """A score matrix with labels; None gallery labels means the query set is its own gallery. Few classes
    and up to 40 gallery items so that some queries have more positives than the compare-pass limit."""
    q = draw(st.integers(1, 12))
    self_retrieval = draw(st.booleans())
    g = q if self_retrieval else draw(st.integers(1, 40))
    num_classes = draw(st.integers(1, 4))
    labels = st.integers(0, num_classes - 1)
    query_labels = draw(st.lists(labels, min_size=q, max_size=q))
    gallery_labels = None if self_retrieval else draw(st.lists(labels, min_size=g, max_size=g))
    values: st.SearchStrategy[float] = st.integers(-2, 2) if draw(st.booleans()) else st.floats(-1, 1, width=32)
    scores = draw(st.lists(values, min_size=q * g, max_size=q * g))
    return np.asarray(scores, dtype=np.float32).reshape(q, g), query_labels, gallery_labels


# ----------------------------------------------------------------------------------------------------------
# Hand-computed fixtures


def test_three_queries_against_a_gallery_by_hand() -> None:
    s = np.array([[3, 5, 1, 3, 0], [2, 4, 4, 1, 4], [1, 1, 1, 1, 1]], dtype=np.float32)
    got = evaluate_labels(None, [0, 1, 2], scores=s, gallery_labels=[0, 1, 0, 1, 1])
    expected = {
        "r_at_1": 0.0, "r_at_5": 1.0, "r_at_10": 1.0, "precision_at_1": 0.0,
        "map": 181 / 360, "map_at_r": 7 / 36, "r_precision": 1 / 3, "num_queries": 3, "num_skipped": 1,
    }  # fmt: skip
    assert got == pytest.approx(expected)
    assert list(got) == list(expected)


def test_self_retrieval_by_hand_excludes_each_query_from_its_gallery() -> None:
    s = np.array([[9, 2, 5], [2, 9, 1], [5, 1, 9]], dtype=np.float32)
    got = evaluate_labels(None, ["a", "a", "b"], scores=s)
    expected = {
        "r_at_1": 0.5, "r_at_5": 1.0, "r_at_10": 1.0, "precision_at_1": 0.5,
        "map": 0.75, "map_at_r": 0.5, "r_precision": 0.5, "num_queries": 3, "num_skipped": 1,
    }  # fmt: skip
    assert got == pytest.approx(expected)
    embeddings = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1]])
    got = evaluate_labels(embeddings, [0, 0, 1])
    assert got["num_skipped"] == 1
    assert got["r_at_1"] == 0.0


def test_constant_scores_give_no_precision_at_1_unless_only_one_candidate() -> None:
    got = evaluate_labels(None, [0, 0, 1, 1], scores=np.ones((4, 4)))
    assert got["precision_at_1"] == got["r_at_1"] == 0.0
    assert got["r_at_5"] == 1.0
    alone = evaluate_labels(None, [7, 7], scores=np.ones((2, 1)), gallery_labels=[7])
    assert alone["precision_at_1"] == alone["map"] == alone["map_at_r"] == 1.0


# ----------------------------------------------------------------------------------------------------------
# Against the reference


@FAST
@given(label_problems())
def test_labels_match_reference(problem: tuple[np.ndarray, list[int], list[int] | None]) -> None:
    s, query_labels, gallery_labels = problem
    exclude_self = gallery_labels is None
    expected = reference_labels(s, query_labels, gallery_labels or query_labels, exclude_self)
    if expected is None:
        with pytest.raises(RetrievalInputError, match="no query has a relevant"):
            evaluate_labels(None, query_labels, scores=s, gallery_labels=gallery_labels)
        return
    got = evaluate_labels(None, query_labels, scores=s, gallery_labels=gallery_labels)
    assert_metrics_equal(got, expected)


@FAST
@given(
    label_problems(),
    st.sampled_from([1, 2, 7, 40]),
    st.sampled_from([1, 5, 2**18]),
    st.sampled_from([(1,), (1, 5, 10)]),
)
def test_top_candidates_from_column_maxima_keep_the_top_exact(
    problem: tuple[np.ndarray, list[int], list[int] | None], height: int, tile: int, ks: tuple[int, ...]
) -> None:
    """Tall stripes (many scores per column maximum, ties among them, a tail of leftover scores) and tiny
    tiles (one query at a time) keep every metric exact."""
    s, query_labels, gallery_labels = problem
    expected = reference_labels(s, query_labels, gallery_labels or query_labels, gallery_labels is None, ks=ks)
    if expected is None:
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(retrieval, "stripe_height", lambda width, deepest: min(width, height))
        patch.setattr(retrieval, "TILE_ELEMENTS", tile)
        got = label_metrics.evaluate_labels(None, query_labels, scores=s, gallery_labels=gallery_labels, ks=ks)
    expected.pop("map")
    assert_metrics_equal(got, expected)
    assert "map" not in got


@pytest.mark.parametrize("need", [1, 3, 10, 40])
@pytest.mark.parametrize("height", [None, 1, 2, 7, 203])
def test_top_candidates_are_exactly_the_scores_at_or_above_a_bound_below_the_needed_depth(
    need: int, height: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if height is not None:
        monkeypatch.setattr(retrieval, "stripe_height", lambda width, deepest: height)
    rng = np.random.default_rng(need)
    scores = rng.integers(-20, 20, size=(6, 203)).astype(np.float32)
    flat = label_metrics._top_candidates(scores, np.full(6, need))
    chosen = np.zeros(scores.size, dtype=bool)
    chosen[flat] = True
    chosen = chosen.reshape(scores.shape)
    assert len(flat) == chosen.sum()
    for row, picked in zip(scores, chosen, strict=True):
        assert picked.sum() >= need
        assert row[picked].min() <= np.sort(row)[::-1][need - 1]
        assert not (row[~picked] >= row[picked].min()).any()


@FAST
@given(st.integers(1, 8), st.integers(1, 30), st.integers(1, 3), st.integers(1, 3), st.data())
def test_labels_with_embeddings_and_score_fn_match_reference(
    q: int, g: int, d: int, num_classes: int, data: st.DataObject
) -> None:
    queries = torch.tensor(data.draw(st.lists(small_int_embeddings, min_size=q * d, max_size=q * d))).float()
    gallery = torch.tensor(data.draw(st.lists(small_int_embeddings, min_size=g * d, max_size=g * d))).float()
    queries, gallery = queries.reshape(q, d), gallery.reshape(g, d)
    query_labels = data.draw(st.lists(st.integers(0, num_classes - 1), min_size=q, max_size=q))
    gallery_labels = data.draw(st.lists(st.integers(0, num_classes - 1), min_size=g, max_size=g))
    w = torch.arange(1, d + 1, dtype=torch.float32)

    def score_fn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a * w) @ b.T

    budget = data.draw(st.sampled_from([1, 50, retrieval.DEFAULT_MEMORY_BUDGET_BYTES]))
    stripe = data.draw(st.sampled_from([1, 3, 4096]))
    s = score_fn(queries, gallery).numpy()
    expected = reference_labels(s, query_labels, gallery_labels, exclude_self=False)
    run: Callable[[], dict[str, float]] = lambda: evaluate_labels(  # noqa: E731
        queries, query_labels, gallery, gallery_labels, score_fn=score_fn, memory_budget_bytes=budget
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(retrieval, "STRIPE_COLUMNS", stripe)
        patch.setattr(retrieval, "STRIPE_COLUMNS_PER_NEEDED", 0)
        patch.setattr(retrieval, "STREAM_QUERY_ROWS", data.draw(st.sampled_from([1, 3, 256])))
        if expected is None:
            with pytest.raises(RetrievalInputError):
                run()
            return
        assert_metrics_equal(run(), expected)


@FAST
@given(label_problems(), st.sampled_from([1, 2, 5, 4096]), st.sampled_from([(1,), (1, 5, 10)]))
def test_streamed_gallery_stripes_keep_the_top_exact(
    problem: tuple[np.ndarray, list[int], list[int] | None], stripe: int, ks: tuple[int, ...]
) -> None:
    """Self-retrieval and separate galleries scored a few columns at a time (integer embeddings whose inner
    products are the problem's scores: one-hot queries against score-valued gallery columns)."""
    s, query_labels, gallery_labels = problem
    expected = reference_labels(s, query_labels, gallery_labels or query_labels, gallery_labels is None, ks=ks)
    if expected is None or gallery_labels is None:
        return
    queries = torch.eye(s.shape[0])
    gallery = torch.from_numpy(s.T.copy())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(retrieval, "STRIPE_COLUMNS", stripe)
        patch.setattr(retrieval, "STRIPE_COLUMNS_PER_NEEDED", 0)
        got = label_metrics.evaluate_labels(queries, query_labels, gallery, gallery_labels, ks=ks)
    expected.pop("map")
    assert_metrics_equal(got, expected)


@pytest.mark.parametrize("partial_sort_max_fraction", [0.0, 1.0])
@pytest.mark.parametrize("parallel_sort_elements", [1, 2**40])
def test_labels_many_positives_use_the_sorting_path_and_stay_exact(
    monkeypatch: pytest.MonkeyPatch, parallel_sort_elements: int, partial_sort_max_fraction: float
) -> None:
    monkeypatch.setattr(retrieval, "_PARALLEL_SORT_ELEMENTS", parallel_sort_elements)
    monkeypatch.setattr(retrieval, "_PARTIAL_SORT_MAX_FRACTION", partial_sort_max_fraction)
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, size=60)
    s = rng.integers(-3, 4, size=(60, 60)).astype(np.float32)
    expected = reference_labels(s, list(labels), list(labels), exclude_self=True, ks=(1, 2, 30))
    assert expected is not None
    assert_metrics_equal(evaluate_labels(None, labels, scores=s, ks=(1, 2, 30)), expected)


def test_labels_accept_torch_labels_and_chunk_invariance() -> None:
    rng = np.random.default_rng(5)
    q, g = rng.normal(size=(30, 5)), rng.normal(size=(70, 5))
    ql, gl = rng.integers(0, 4, size=30), rng.integers(0, 4, size=70)
    base = evaluate_labels(q, ql, g, gl)
    for budget in (1, 333, 10_000):
        assert evaluate_labels(q, torch.from_numpy(ql), g, torch.from_numpy(gl), memory_budget_bytes=budget) == base


# ----------------------------------------------------------------------------------------------------------
# Per-query stats (chunked) against the slow reference


@pytest.mark.parametrize("full_map", [False, True])
@pytest.mark.parametrize("budget", [100, 2**20])
def test_label_query_stats_equal_the_slow_reference(full_map: bool, budget: int) -> None:
    feats, labels = _labelled()
    ks = (1, 3)
    stats = label_metrics.label_query_stats(feats, labels, ks=ks, memory_budget_bytes=budget, full_map=full_map)
    s = feats.astype(np.float32) @ feats.astype(np.float32).T
    expected = reference_label_stats(s, labels.tolist())
    depth_bound = 0
    for q, reference in enumerate(expected):
        if reference is None:
            assert stats.first_rank[q] == -1 and not stats.evaluated[q]
            continue
        first, map_at_r, r_precision, ap = reference
        relevant = int((labels == labels[q]).sum()) - 1
        depth = max(relevant, max(ks))
        if first < depth:  # exact inside the depth the ranking is known to, a lower bound past it
            assert stats.first_rank[q] == first
        else:
            assert stats.first_rank[q] >= depth
            depth_bound += 1
        assert stats.map_at_r[q] == pytest.approx(map_at_r, rel=1e-12)
        assert stats.r_precision[q] == pytest.approx(r_precision, rel=1e-12)
        if full_map:
            assert stats.average_precision is not None
            assert stats.average_precision[q] == pytest.approx(ap, rel=1e-12)
    assert stats.evaluated.sum() == len(labels) - 1
    assert (stats.average_precision is None) is not full_map


# ----------------------------------------------------------------------------------------------------------
# Input errors


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((np.zeros((3, 2)), None), {}, "query_labels are missing"),
        ((np.zeros((3, 2)), [0, 1]), {}, "query_labels has 2 entries but there are 3"),
        ((np.zeros((3, 2)), [[0, 1, 2]]), {}, "query_labels must be 1-D"),
        ((np.zeros((3, 2)), [0, 1, 2], np.zeros((4, 2))), {}, "gallery embeddings given without gallery_labels"),
        ((np.zeros((3, 2)), [0, 1, 2], None, [0]), {}, "gallery_labels given without gallery"),
        ((np.zeros((3, 2)), [0, 1, 2], np.zeros((4, 2)), [0, 1]), {}, "gallery_labels has 2 entries"),
        ((np.zeros((3, 2)), [0, 1, 2], np.zeros((4, 3)), [0, 1, 2, 3]), {}, "different embedding dims"),
        ((np.zeros((3, 2)), [0, 1, 2]), {}, "no query has a relevant gallery item"),
        ((np.zeros((0, 2)), []), {}, "queries is empty"),
        ((np.full((2, 2), np.inf), [0, 0]), {}, "queries contains NaN or Inf"),
        ((None, [0, 0]), {"scores": np.zeros((2, 3))}, "must be square"),
        ((None, [0, 0]), {"scores": np.zeros((2, 3)), "gallery_labels": [0, 1]}, "gallery_labels has 2 entries"),
        ((None, [0, 0]), {"scores": np.array([[0, np.nan], [0, 0]])}, "scores contain NaN or Inf"),
        ((None, [0, 0]), {}, "give queries or a ready score matrix"),
        ((np.zeros((2, 2)), [0, 0]), {"ks": (1, -5)}, "ks must be"),
        ((np.zeros((2, 2)), [0, 0]), {"dtype": torch.int64}, "dtype must be a floating-point"),
        ((np.zeros((2, 2)), [0, 0]), {"memory_budget_bytes": -1}, "memory_budget_bytes must be >= 1"),
        ((None, [0, 0]), {"scores": np.zeros((2, 2)), "gallery": np.zeros((2, 2))}, "gallery_labels only"),
    ],
)
def test_label_input_errors(args: tuple[Any, ...], kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(RetrievalInputError, match=message) as info:
        evaluate_labels(*args, **kwargs)
    assert "\n" not in str(info.value)
