"""The export gate's verdict on rankings (:mod:`gssf_cli.deploy.rank_gate`) on hand-made score matrices: which rank
changes count (:func:`rank_changes`: a relevant item with a non-relevant one ahead under one scorer only, beyond
ties when their torch scores lie more than 2·atol apart), and :func:`rank_parity` on small fake splits — no model,
no export (the gate inside a real export: ``tests/behaviour/test_token_deploy.py``)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gssf_cli.core.metrics import RANK_METRICS
from gssf_cli.deploy.rank_gate import near_tie, rank_changes, rank_parity

PROPS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ATOL, RTOL = 1e-5, 1e-4
"""The export's default tolerances."""


def _row(*values: float) -> np.ndarray:
    return np.array([values], dtype=np.float64)


def _relevant(*flags: bool) -> np.ndarray:
    return np.array([flags], dtype=bool)


# ---------------------------------------------------------------------------------------------------------
# rank_changes


@PROPS
@given(
    queries=st.integers(1, 6),
    items=st.integers(1, 12),
    levels=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_identical_scores_change_no_rank(queries: int, items: int, levels: int, seed: int) -> None:
    """Whatever the scores (ties included: few score levels) and whichever items are relevant."""
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, levels, size=(queries, items)).astype(np.float32)
    relevant = rng.random((queries, items)) < 0.4
    assert rank_changes(scores, scores.copy(), relevant, ATOL) == (0, 0)


def test_a_relevant_item_overtaken_by_a_far_non_relevant_one_counts_beyond_ties() -> None:
    torch_scores, relevant = _row(0.9, 0.1, 0.5), _relevant(True, False, False)
    onnx_scores = _row(0.1, 0.9, 0.5)  # the relevant item and the first non-relevant one swap places
    assert rank_changes(torch_scores, onnx_scores, relevant, ATOL) == (1, 1)


def test_a_swap_within_two_atol_is_a_change_but_not_beyond_ties() -> None:
    torch_scores, relevant = _row(0.5 + 1.5 * ATOL, 0.5, 0.1), _relevant(True, False, False)
    onnx_scores = _row(0.5, 0.5 + 1.5 * ATOL, 0.1)
    assert rank_changes(torch_scores, onnx_scores, relevant, ATOL) == (1, 0)
    just_beyond = _row(0.5 + 2.5 * ATOL, 0.5, 0.1)  # the same swap between items 2.5·atol apart
    assert rank_changes(just_beyond, onnx_scores, relevant, ATOL) == (1, 1)


def test_relevant_items_swapping_among_themselves_never_count() -> None:
    torch_scores, relevant = _row(0.9, 0.8, 0.7, 0.1), _relevant(True, True, True, False)
    onnx_scores = _row(0.7, 0.9, 0.8, 0.1)
    assert rank_changes(torch_scores, onnx_scores, relevant, ATOL) == (0, 0)
    non_relevant_swap = _row(0.9, 0.1, 0.2, 0.05), _relevant(True, False, False, False)
    assert rank_changes(non_relevant_swap[0], _row(0.9, 0.2, 0.1, 0.05), non_relevant_swap[1], ATOL) == (0, 0)


def test_the_tie_rule_is_pessimistic() -> None:
    """A non-relevant item scoring exactly as high as a relevant one is ahead of it (evaluation's rule), so a tie
    that appears under one scorer only is a change, and beyond ties when the torch scores were far apart; a tie
    under both scorers is no change."""
    relevant = _relevant(True, False)
    assert rank_changes(_row(0.5, 0.4), _row(0.5, 0.5), relevant, ATOL) == (1, 1)
    assert rank_changes(_row(0.5, 0.5 - ATOL / 2), _row(0.5, 0.5), relevant, ATOL) == (1, 0)
    assert rank_changes(_row(0.5, 0.5), _row(0.5, 0.4), relevant, ATOL) == (1, 0), "torch's own tie: noise"
    assert rank_changes(_row(0.5, 0.5), _row(0.7, 0.7), relevant, ATOL) == (0, 0)


def test_each_relevant_item_counts_once_and_queries_without_relevant_items_none() -> None:
    torch_scores = np.array([[0.9, 0.8, 0.1, 0.2], [0.9, 0.8, 0.1, 0.2]])
    onnx_scores = np.array([[0.1, 0.2, 0.9, 0.8], [0.1, 0.2, 0.9, 0.8]])
    relevant = np.array([[True, True, False, False], [False, False, False, False]])
    assert rank_changes(torch_scores, onnx_scores, relevant, ATOL) == (2, 2)


@PROPS
@given(
    queries=st.integers(1, 5),
    items=st.integers(2, 14),
    spread=st.sampled_from([1e-4, 1e-3, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_noise_below_atol_never_changes_a_rank_beyond_ties(queries: int, items: int, spread: float, seed: int) -> None:
    """Scores moved by less than atol each can only swap items whose torch scores lie within 2·atol; a small
    spread makes many such near ties."""
    atol = 1e-4
    rng = np.random.default_rng(seed)
    torch_scores = rng.uniform(0.0, spread, size=(queries, items))
    onnx_scores = torch_scores + rng.uniform(-atol, atol, size=torch_scores.shape) * 0.99
    relevant = rng.random((queries, items)) < 0.3
    changed, beyond = rank_changes(torch_scores, onnx_scores, relevant, atol)
    assert beyond == 0 and 0 <= changed <= int(relevant.sum())


@PROPS
@given(
    queries=st.integers(1, 5),
    items=st.integers(2, 12),
    levels=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_a_strictly_increasing_map_of_the_scores_changes_nothing(
    queries: int, items: int, levels: int, seed: int
) -> None:
    """Ranks depend on the order alone: ``2·s + 1`` (exact on small integers, so ties stay ties) changes none."""
    rng = np.random.default_rng(seed)
    torch_scores = rng.integers(0, levels, size=(queries, items)).astype(np.float64)
    relevant = rng.random((queries, items)) < 0.5
    assert rank_changes(torch_scores, 2 * torch_scores + 1, relevant, ATOL) == (0, 0)


def test_near_tie_explains_order_differences_only_between_close_items() -> None:
    scores = np.array([0.9, 0.5, 0.5 + ATOL, 0.1, 0.1 + ATOL / 2])
    assert near_tie(scores, np.array([0, 2, 1]), np.array([0, 1, 2]), ATOL)
    assert not near_tie(scores, np.array([0, 2, 1]), np.array([2, 0, 1]), ATOL)
    assert near_tie(scores, np.array([0, 2, 1, 4]), np.array([0, 2, 1, 3]), ATOL), "a near tie at the cut"
    assert not near_tie(scores, np.array([0, 2, 1]), np.array([0, 2, 3]), ATOL), "a far item crossed the cut"


# ---------------------------------------------------------------------------------------------------------
# rank_parity on fake splits: what the gate reads of a split is its task and k (cross-modal) or labels


def _cross_modal(images: int = 6, k: int = 2) -> Any:
    return SimpleNamespace(task="cross_modal", k=k, num_images=images)


def _labels(labels: list[int]) -> Any:
    return SimpleNamespace(task="labels", k=1, labels=np.array(labels))


def _matched_scores(images: int = 6, k: int = 2, seed: int = 0) -> np.ndarray:
    """``[N, kN]`` float32: every caption of image i scores 0.8..0.9 with it, every other pair 0..0.5 — all
    metrics perfect, every pair far from every other."""
    rng = np.random.default_rng(seed)
    scores = rng.uniform(0.0, 0.5, size=(images, k * images))
    for i in range(images):
        scores[i, k * i : k * i + k] = rng.uniform(0.8, 0.9, size=k)
    return scores.astype(np.float32)


def _label_scores(labels: list[int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    same = np.equal.outer(labels, labels)
    return np.where(same, rng.uniform(0.6, 0.9, same.shape), rng.uniform(0.0, 0.5, same.shape)).astype(np.float32)


LABELS = [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]


@pytest.mark.parametrize("task", ["cross_modal", "labels"])
def test_equal_scores_pass_with_identical_metrics(task: str) -> None:
    split, scores = (
        (_cross_modal(), _matched_scores()) if task == "cross_modal" else (_labels(LABELS), _label_scores(LABELS))
    )
    report = rank_parity(split, scores, scores.copy(), ATOL, RTOL)
    assert report["passed"] is True
    assert report["metrics_torch"] == report["metrics_onnx"] and report["metrics_different"] == []
    assert list(report["metrics_torch"]) == list(RANK_METRICS[task])
    assert report["relevant_ranks_changed"] == report["relevant_ranks_changed_beyond_ties"] == 0
    assert report["top10_identical"] == report["top10_equal_up_to_ties"] == 1.0
    assert report["max_abs_score_diff"] == 0.0 and report["queries"] == len(scores)


def test_the_gate_does_not_edit_the_callers_scores() -> None:
    scores = _label_scores(LABELS)
    before = scores.copy()
    rank_parity(_labels(LABELS), scores, scores, ATOL, RTOL)
    np.testing.assert_array_equal(scores, before)


def test_moving_a_relevant_caption_fails_and_names_the_metrics() -> None:
    torch_scores = _matched_scores()
    onnx_scores = torch_scores.copy()
    onnx_scores[0, 0:2] = 0.0  # image 0's captions now rank below every other caption
    report = rank_parity(_cross_modal(), torch_scores, onnx_scores, ATOL, RTOL)
    assert report["passed"] is False
    assert report["metrics_torch"]["i2t_r1"] == 100.0 and report["metrics_onnx"]["i2t_r1"] < 100.0
    assert {"i2t_r1", "t2i_r1", "rsum", "i2t_map", "i2t_meanr"} <= set(report["metrics_different"])
    assert report["relevant_ranks_changed_beyond_ties"] >= 3  # image 0 (i2t), captions 0 and 1 (t2i)


def test_moving_a_relevant_item_fails_a_labels_split() -> None:
    torch_scores = _label_scores(LABELS)
    onnx_scores = torch_scores.copy()
    onnx_scores[2, [3, 4]] = 0.0  # item 2's relevant items fall below every other item
    report = rank_parity(_labels(LABELS), torch_scores, onnx_scores, ATOL, RTOL)
    assert report["passed"] is False and report["relevant_ranks_changed_beyond_ties"] == 2
    assert {"precision_at_1", "map_at_r", "r_precision"} <= set(report["metrics_different"])


def test_a_real_reordering_fails_even_when_every_score_is_within_tolerance() -> None:
    """rtol lets scores near 0.5 drift by ~6e-5, so the scores pass, but two items 4e-5 apart (> 2·atol) swapping
    is a reordering of items no float32 noise ties: the gate fails on the ranks."""
    torch_scores = _matched_scores()
    torch_scores[0, 0], torch_scores[0, 5] = 0.50004, 0.5  # caption 0 (relevant) just ahead of caption 5
    torch_scores[0, 1] = 0.6
    onnx_scores = torch_scores.copy()
    onnx_scores[0, 0], onnx_scores[0, 5] = 0.50001, 0.50003
    report = rank_parity(_cross_modal(), torch_scores, onnx_scores, ATOL, RTOL)
    assert report["max_abs_score_diff"] <= ATOL + RTOL * 0.5
    assert report["relevant_ranks_changed_beyond_ties"] == 1 and report["passed"] is False


def test_noise_that_reorders_only_near_ties_passes() -> None:
    """Two non-relevant captions within atol swap in the top 10, and a relevant caption trades places with a
    non-relevant one 0.5·atol below it: changes, all within float32 ties, so the gate passes."""
    torch_scores = _matched_scores()
    torch_scores[0, 4], torch_scores[0, 6] = 0.45, 0.45 + ATOL / 2
    torch_scores[1, 2] = 0.7  # caption 2 (image 1's) just ahead of caption 9 there
    torch_scores[1, 9] = 0.7 - ATOL / 2
    onnx_scores = torch_scores.copy()
    onnx_scores[0, 4], onnx_scores[0, 6] = torch_scores[0, 6], torch_scores[0, 4]
    onnx_scores[1, 2], onnx_scores[1, 9] = torch_scores[1, 9], torch_scores[1, 2]
    report = rank_parity(_cross_modal(), torch_scores, onnx_scores, ATOL, RTOL)
    assert report["passed"] is True, report
    assert report["top10_identical"] < 1.0 and report["top10_equal_up_to_ties"] == 1.0
    assert report["relevant_ranks_changed"] >= 1 and report["relevant_ranks_changed_beyond_ties"] == 0


@PROPS
@given(
    images=st.integers(2, 12),
    k=st.integers(1, 3),
    spread=st.sampled_from([1e-3, 0.05, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_noise_below_atol_passes_the_gate(images: int, k: int, spread: float, seed: int) -> None:
    """ONNX scores within atol/2 of torch's pass, however many near ties the noise reorders (a small spread
    packs the scores within a few atol of each other)."""
    atol = 1e-3
    rng = np.random.default_rng(seed)
    torch_scores = rng.uniform(0.0, spread, size=(images, k * images)).astype(np.float32)
    onnx_scores = (torch_scores + rng.uniform(-atol / 2, atol / 2, size=torch_scores.shape)).astype(np.float32)
    report = rank_parity(_cross_modal(images, k), torch_scores, onnx_scores, atol, 0.0)
    assert report["passed"] is True, report
    assert report["relevant_ranks_changed_beyond_ties"] == 0


@PROPS
@given(
    images=st.integers(2, 8),
    k=st.integers(1, 3),
    levels=st.integers(2, 6),
    moved=st.integers(0, 4),
    seed=st.integers(0, 2**16),
)
def test_no_relevant_rank_changed_means_every_rank_metric_identical(
    images: int, k: int, levels: int, moved: int, seed: int
) -> None:
    """The gate's promise: a relevant item's rank is what ``rank_changes`` watches, so when it reports none, every
    metric of :data:`RANK_METRICS` is identical — ties (few score levels) included."""
    rng = np.random.default_rng(seed)
    torch_scores = rng.integers(0, levels, size=(images, k * images)).astype(np.float32)
    onnx_scores = torch_scores.copy()
    cells = rng.integers(0, torch_scores.size, size=moved)
    onnx_scores.flat[cells] += rng.integers(-1, 2, size=moved)
    report = rank_parity(_cross_modal(images, k), torch_scores, onnx_scores, ATOL, RTOL)
    if report["relevant_ranks_changed"] == 0:
        assert report["metrics_different"] == [], report


@PROPS
@given(
    labels=st.lists(st.integers(0, 3), min_size=3, max_size=12),
    levels=st.integers(2, 6),
    moved=st.integers(0, 4),
    seed=st.integers(0, 2**16),
)
def test_no_relevant_rank_changed_means_identical_label_metrics(
    labels: list[int], levels: int, moved: int, seed: int
) -> None:
    labels = [*labels, labels[0]]  # one relevant pair at least: the metrics need a query to evaluate
    rng = np.random.default_rng(seed)
    n = len(labels)
    torch_scores = rng.integers(0, levels, size=(n, n)).astype(np.float32)
    onnx_scores = torch_scores.copy()
    cells = rng.integers(0, torch_scores.size, size=moved)
    onnx_scores.flat[cells] += rng.integers(-1, 2, size=moved)
    report = rank_parity(_labels(labels), torch_scores, onnx_scores, ATOL, RTOL)
    if report["relevant_ranks_changed"] == 0:
        assert report["metrics_different"] == [], report
