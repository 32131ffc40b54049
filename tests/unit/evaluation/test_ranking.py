"""gssf_cli.evaluation.ranking against slow, obviously-correct references (a full stable sort per query with the tie
rule, in plain Python), hand-computed fixtures, chunking invariance, protocols and input errors."""

from __future__ import annotations

import math
import statistics
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gssf_cli.evaluation import crossmodal
from gssf_cli.evaluation import labels as label_metrics
from gssf_cli.evaluation import ranking as retrieval
from gssf_cli.evaluation.crossmodal import cross_modal_ranks, evaluate_cross_modal
from gssf_cli.evaluation.ranking import RetrievalInputError, iter_score_chunks

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------------------------------------
# Reference implementations: sort every row completely, ties broken with non-relevant items first.


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
# Strategies


@st.composite
def cross_modal_matrices(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    """Small score matrices; integer values in a narrow range force many ties."""
    n = draw(st.integers(1, 6))
    k = draw(st.integers(1, 11))
    values: st.SearchStrategy[float] = st.integers(-2, 2) if draw(st.booleans()) else st.floats(-1, 1, width=32)
    scores = draw(st.lists(values, min_size=n * n * k, max_size=n * n * k))
    return np.asarray(scores, dtype=np.float32).reshape(n, n * k), k


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


small_int_embeddings = st.integers(-2, 2)


# ----------------------------------------------------------------------------------------------------------
# Cross-modal: hand-computed fixtures


def test_two_images_two_captions_by_hand() -> None:
    s = np.array([[0.75, 0.25], [0.75, 0.5]], dtype=np.float32)
    got = evaluate_cross_modal(scores=s, captions_per_image=1)
    expected = {
        "i2t_r1": 50.0, "i2t_r5": 100.0, "i2t_r10": 100.0,
        "t2i_r1": 50.0, "t2i_r5": 100.0, "t2i_r10": 100.0,
        "rsum": 500.0, "i2t_medr": 1.0, "t2i_medr": 1.0, "i2t_meanr": 1.5, "t2i_meanr": 1.5,
        "i2t_map": 75.0,
    }  # fmt: skip
    assert metrics_only(got) == expected
    assert list(metrics_only(got)) == list(expected)


def test_two_images_four_captions_by_hand() -> None:
    s = np.array([[5, 1, 5, 3], [2, 6, 4, 0]], dtype=np.float32)
    ranks = cross_modal_ranks(scores=s, captions_per_image=2)
    assert ranks.i2t.tolist() == [1, 1]
    assert ranks.t2i.tolist() == [0, 1, 1, 1]
    assert ranks.i2t_ap.tolist() == [0.5, 0.5]
    got = evaluate_cross_modal(scores=s, captions_per_image=2)
    assert metrics_only(got) == {
        "i2t_r1": 0.0, "i2t_r5": 100.0, "i2t_r10": 100.0,
        "t2i_r1": 25.0, "t2i_r5": 100.0, "t2i_r10": 100.0,
        "rsum": 425.0, "i2t_medr": 2.0, "t2i_medr": 2.0, "i2t_meanr": 2.0, "t2i_meanr": 1.75,
        "i2t_map": 50.0,
    }  # fmt: skip


def test_rsum_is_the_true_sum_for_custom_ks() -> None:
    s = np.array([[5, 1, 5, 3], [2, 6, 4, 0]], dtype=np.float32)
    got = evaluate_cross_modal(scores=s, captions_per_image=2, ks=(2, 1))
    assert [k for k in got if k.endswith(("r1", "r2"))] == ["i2t_r1", "i2t_r2", "t2i_r1", "t2i_r2"]
    assert got["rsum"] == got["i2t_r1"] + got["i2t_r2"] + got["t2i_r1"] + got["t2i_r2"] == 0 + 100 + 25 + 100


def test_constant_scores_get_no_recall_at_1() -> None:
    got = evaluate_cross_modal(scores=np.zeros((4, 20)), captions_per_image=5)
    assert got["i2t_r1"] == got["t2i_r1"] == 0.0
    assert got["i2t_medr"] == 16.0
    assert got["t2i_medr"] == 4.0


def test_one_image_is_always_found() -> None:
    got = evaluate_cross_modal(scores=np.zeros((1, 5)), captions_per_image=5)
    assert got["i2t_r1"] == got["t2i_r1"] == 100.0
    assert got["i2t_map"] == 100.0
    assert got["rsum"] == 600.0


def test_perfect_embeddings_score_600() -> None:
    images = torch.eye(8)
    texts = images.repeat_interleave(5, dim=0)
    got = evaluate_cross_modal(images, texts, captions_per_image=5)
    assert got["rsum"] == 600.0
    assert got["i2t_map"] == 100.0
    assert got["i2t_medr"] == got["t2i_medr"] == 1.0


# ----------------------------------------------------------------------------------------------------------
# Cross-modal: against the reference


@FAST
@given(cross_modal_matrices())
def test_cross_modal_matches_reference(problem: tuple[np.ndarray, int]) -> None:
    s, k = problem
    got = evaluate_cross_modal(scores=s, captions_per_image=k)
    assert_metrics_equal(metrics_only(got), reference_cross_modal(s, k))


@FAST
@given(cross_modal_matrices(), st.lists(st.integers(1, 12), min_size=1, max_size=4))
def test_cross_modal_matches_reference_for_any_ks(problem: tuple[np.ndarray, int], ks: list[int]) -> None:
    s, k = problem
    got = evaluate_cross_modal(scores=s, captions_per_image=k, ks=ks)
    assert_metrics_equal(metrics_only(got), reference_cross_modal(s, k, sorted(set(ks))))


@FAST
@given(
    st.integers(1, 5),
    st.integers(1, 10),
    st.integers(1, 4),
    st.data(),
)
def test_asymmetric_score_fn_matches_reference_on_its_matrix(n: int, k: int, d: int, data: st.DataObject) -> None:
    """Integer-valued embeddings and weights make every score exact, so chunked and one-shot agree bitwise."""
    images = torch.tensor(data.draw(st.lists(small_int_embeddings, min_size=n * d, max_size=n * d)))
    texts = torch.tensor(data.draw(st.lists(small_int_embeddings, min_size=n * k * d, max_size=n * k * d)))
    w = torch.tensor(data.draw(st.lists(st.integers(-3, 3), min_size=d, max_size=d)), dtype=torch.float32)
    images, texts = images.reshape(n, d).float(), texts.reshape(n * k, d).float()

    def score_fn(q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return (q * w) @ g.T

    budget = data.draw(st.sampled_from([1, 64, retrieval.DEFAULT_MEMORY_BUDGET_BYTES]))
    got = evaluate_cross_modal(images, texts, captions_per_image=k, score_fn=score_fn, memory_budget_bytes=budget)
    s = score_fn(images, texts).numpy()
    assert_metrics_equal(metrics_only(got), reference_cross_modal(s, k))
    assert metrics_only(got) == metrics_only(evaluate_cross_modal(scores=s, captions_per_image=k))


def test_asymmetric_score_uses_columns_of_the_same_matrix_for_t2i() -> None:
    s = np.array([[1.0, 0.0], [3.0, 2.0]], dtype=np.float32)
    ranks = cross_modal_ranks(scores=s, captions_per_image=1)
    assert ranks.i2t.tolist() == [0, 1]
    assert ranks.t2i.tolist() == [1, 0]


# ----------------------------------------------------------------------------------------------------------
# Chunking


@FAST
@given(cross_modal_matrices(), st.integers(1, 2048))
def test_cross_modal_chunked_equals_unchunked(problem: tuple[np.ndarray, int], budget: int) -> None:
    s, k = problem
    whole = evaluate_cross_modal(scores=s, captions_per_image=k)
    assert evaluate_cross_modal(scores=s, captions_per_image=k, memory_budget_bytes=budget) == whole


@pytest.mark.parametrize("numpy_passes", [True, False])
@pytest.mark.parametrize("partial_sort_max_fraction", [0.0, 1.0])
@pytest.mark.parametrize("tile_elements", [1, 7, 64, 2**20])
@pytest.mark.parametrize("budget", [1, 100, 10_000])
def test_tiles_chunks_and_sorting_strategies_do_not_change_results(
    monkeypatch: pytest.MonkeyPatch,
    tile_elements: int,
    budget: int,
    partial_sort_max_fraction: float,
    numpy_passes: bool,
) -> None:
    """Every tiling, and both ways of counting: numpy passes (CPU) and torch ops (other devices, bfloat16)."""
    rng = np.random.default_rng(0)
    s = rng.integers(-3, 4, size=(9, 27)).astype(np.float32)
    query_labels, gallery_labels = rng.integers(0, 2, size=9), rng.integers(0, 2, size=27)
    expected = reference_cross_modal(s, 3)
    expected_self = reference_labels(s[:, :9], list(query_labels), list(query_labels), exclude_self=True)
    expected_gallery = reference_labels(s, list(query_labels), list(gallery_labels), exclude_self=False)
    assert expected_self is not None
    assert expected_gallery is not None
    monkeypatch.setattr(retrieval, "TILE_ELEMENTS", tile_elements)
    monkeypatch.setattr(retrieval, "_PARALLEL_SORT_ELEMENTS", 1)
    if not numpy_passes:
        monkeypatch.setattr(retrieval, "numpy_ok", lambda _: False)
    monkeypatch.setattr(retrieval, "_PARTIAL_SORT_MAX_FRACTION", partial_sort_max_fraction)
    got = evaluate_cross_modal(scores=s, captions_per_image=3, memory_budget_bytes=budget)
    assert_metrics_equal(metrics_only(got), expected)
    got_self = evaluate_labels(None, query_labels, scores=s[:, :9], memory_budget_bytes=budget)
    assert_metrics_equal(got_self, expected_self)
    got_gallery = evaluate_labels(
        None, query_labels, scores=s, gallery_labels=gallery_labels, memory_budget_bytes=budget
    )
    assert_metrics_equal(got_gallery, expected_gallery)


def released_block(s: np.ndarray, start: int, stop: int, held: list[weakref.ref[torch.Tensor]]) -> torch.Tensor:
    """Rows of ``s`` that fail the test if an earlier block is still referenced when this one is made."""
    assert all(ref() is None for ref in held), "the previous score block is still alive"
    block = torch.from_numpy(s[start:stop].copy())
    held.append(weakref.ref(block))
    return block


def released_chunks(
    s: np.ndarray, rows: int, held: list[weakref.ref[torch.Tensor]]
) -> Iterator[tuple[int, torch.Tensor]]:
    for start in range(0, s.shape[0], rows):
        block = released_block(s, start, start + rows, held)
        yield start, block
        del block


@pytest.mark.parametrize("ranking", ["cross-modal", "labels top", "labels full"])
def test_one_score_block_alive_at_a_time(ranking: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory stays at one block per worker (here one worker): each block is released, with every view of
    it, before the next is scored."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    rng = np.random.default_rng(7)
    s = rng.normal(size=(12, 36)).astype(np.float32)
    held: list[weakref.ref[torch.Tensor]] = []
    chunks = released_chunks(s, 5, held)
    codes, gallery_codes = torch.from_numpy(np.arange(12) % 3), torch.from_numpy(np.arange(36) % 3)
    by_class = label_metrics._group_by_class(gallery_codes.numpy(), 3, torch.device("cpu"))
    if ranking == "cross-modal":
        positives = torch.from_numpy(s[np.arange(36) // 3, np.arange(36)])
        crossmodal._rank_cross_modal_chunks(chunks, positives, 12, 3)
    elif ranking == "labels full":
        label_metrics._label_stats(chunks, codes, by_class, False)
    else:
        blocks = retrieval.RowBlocks(12, 36, 4, lambda start, stop: released_block(s, start, stop, held))
        monkeypatch.setattr(retrieval, "SCORE_TILE_ELEMENTS", 5 * 36)
        monkeypatch.setattr(retrieval, "MIN_SCORE_ROWS", 1)
        depth = label_metrics._TopDepth(10, 36, False)
        label_metrics._label_stats_top(blocks, 2**20, codes, gallery_codes.numpy(), by_class, depth)
    assert len(held) == 3


@pytest.mark.parametrize("budget", [1, 4 * 40 * 3, 4 * 40 * 7 + 1, 2**30])
def test_iter_score_chunks_covers_rows_once_within_budget(budget: int) -> None:
    rng = np.random.default_rng(1)
    q, g = rng.normal(size=(10, 3)), rng.normal(size=(40, 3))
    from_embeddings = list(iter_score_chunks(q, g, memory_budget_bytes=budget))
    full = torch.as_tensor(q, dtype=torch.float32) @ torch.as_tensor(g, dtype=torch.float32).T
    from_matrix = list(iter_score_chunks(scores=full.numpy(), memory_budget_bytes=budget))
    for chunks in (from_embeddings, from_matrix):
        assert [start for start, _ in chunks] == list(range(0, 10, chunks[0][1].shape[0]))
        assert all(block.shape[0] * 40 * 4 <= max(budget, 40 * 4) for _, block in chunks)
        torch.testing.assert_close(torch.cat([block for _, block in chunks]), full)


def test_numpy_torch_and_float64_inputs_agree() -> None:
    rng = np.random.default_rng(2)
    images = rng.normal(size=(6, 4))
    texts = rng.normal(size=(12, 4))
    a = evaluate_cross_modal(images, texts, captions_per_image=2)
    b = evaluate_cross_modal(torch.from_numpy(images), torch.from_numpy(texts), captions_per_image=2)
    c = evaluate_cross_modal(images, texts, captions_per_image=2, dtype=torch.float64)
    assert a == b
    assert metrics_only(c) == pytest.approx(metrics_only(a))


# ----------------------------------------------------------------------------------------------------------
# Protocols


def test_coco_1k_is_the_mean_of_five_folds_each_equal_to_all_on_its_slice() -> None:
    gen = torch.Generator().manual_seed(3)
    images = torch.nn.functional.normalize(torch.randn(5000, 4, generator=gen), dim=1)
    texts = torch.nn.functional.normalize(images.repeat_interleave(5, 0) + torch.randn(25000, 4, generator=gen), dim=1)
    got = evaluate_cross_modal(images, texts, captions_per_image=5, protocol="coco-1k")
    assert got["protocol"] == "coco-1k"
    assert len(got["folds"]) == 5
    for f, fold in enumerate(got["folds"]):
        alone = evaluate_cross_modal(
            images[1000 * f : 1000 * f + 1000], texts[5000 * f : 5000 * f + 5000], captions_per_image=5
        )
        assert fold == metrics_only(alone)
    for key, value in metrics_only(got).items():
        assert value == pytest.approx(np.mean([fold[key] for fold in got["folds"]]))
    recalls = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
    assert got["rsum"] == pytest.approx(sum(got[key] for key in recalls))


@pytest.mark.parametrize("protocol", ["f30k-1k", "coco-5k"])
def test_whole_split_protocols_equal_all(monkeypatch: pytest.MonkeyPatch, protocol: str) -> None:
    """Run at a small stand-in size: a 5,000-image evaluation would dominate the test time."""
    monkeypatch.setitem(crossmodal.PROTOCOL_IMAGES, protocol, 40)
    rng = np.random.default_rng(6)
    s = rng.integers(-3, 4, size=(40, 200)).astype(np.float32)
    got = evaluate_cross_modal(scores=s, captions_per_image=5, protocol=protocol)
    assert got["protocol"] == protocol
    assert got["folds"] == [metrics_only(got)]
    assert metrics_only(got) == metrics_only(evaluate_cross_modal(scores=s, captions_per_image=5))
    with pytest.raises(RetrievalInputError, match="needs 40 images, got 39"):
        evaluate_cross_modal(scores=s[:39, :195], captions_per_image=5, protocol=protocol)


@pytest.mark.parametrize(
    ("protocol", "n", "message"),
    [
        ("coco-1k", 1000, "protocol coco-1k needs 5,000 images, got 1,000; use --protocol all"),
        ("coco-5k", 4999, "protocol coco-5k needs 5,000 images, got 4,999"),
        ("f30k-1k", 5000, "protocol f30k-1k needs 1,000 images, got 5,000"),
    ],
)
def test_protocol_that_does_not_fit_is_an_input_error(protocol: str, n: int, message: str) -> None:
    with pytest.raises(RetrievalInputError, match=message):
        evaluate_cross_modal(scores=np.zeros((n, n)), captions_per_image=1, protocol=protocol)
    with pytest.raises(RetrievalInputError, match="unknown protocol"):
        evaluate_cross_modal(scores=np.zeros((2, 2)), captions_per_image=1, protocol="coco")


# ----------------------------------------------------------------------------------------------------------
# Label-based


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
# Input errors


TWO_BY_TWO = {"images": np.ones((2, 2)), "texts": np.ones((2, 2)), "captions_per_image": 1}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"images": np.zeros((2, 3)), "texts": np.zeros((4, 2)), "captions_per_image": 2}, "different embedding dims"),
        ({"images": np.zeros((2, 3)), "texts": np.zeros((5, 3)), "captions_per_image": 2}, "not a multiple"),
        ({"images": np.zeros((2, 3)), "texts": np.zeros((6, 3)), "captions_per_image": 2}, "expected 2 captions"),
        ({"scores": np.zeros((2, 5)), "captions_per_image": 2}, "not a multiple"),
        ({"scores": np.zeros((2, 6)), "captions_per_image": 2}, r"scores has shape \[2, 6\]"),
        ({"scores": np.zeros((2, 2, 1)), "captions_per_image": 1}, "2-D"),
        ({"scores": np.array([[0.0, np.nan]]), "captions_per_image": 2}, "NaN or Inf"),
        ({"scores": np.array([[0.0, 1.0], [np.inf, 0.0]]), "captions_per_image": 1}, r"NaN or Inf \(rows 0\.\.1\)"),
        ({"images": np.array([[np.nan]]), "texts": np.zeros((1, 1)), "captions_per_image": 1}, "images contains NaN"),
        ({"images": np.zeros((0, 3)), "texts": np.zeros((0, 3)), "captions_per_image": 1}, "empty"),
        ({"scores": np.zeros((0, 0)), "captions_per_image": 1}, "empty"),
        ({"scores": np.zeros((1, 1)), "captions_per_image": 0}, "captions_per_image must be >= 1"),
        ({"scores": np.zeros((1, 1)), "captions_per_image": 1, "ks": (0,)}, "ks must be"),
        ({"scores": np.zeros((1, 1)), "captions_per_image": 1, "ks": ()}, "ks must be"),
        ({"scores": np.zeros((1, 1)), "captions_per_image": 1, "memory_budget_bytes": 0}, "memory_budget_bytes"),
        ({"captions_per_image": 1}, "give images and texts or a ready score matrix"),
        ({"images": np.zeros((1, 1)), "scores": np.zeros((1, 1)), "captions_per_image": 1}, "not both"),
        ({"images": np.zeros((1, 1)), "captions_per_image": 1}, "give both images and texts"),
        ({**TWO_BY_TWO, "score_fn": lambda q, g: q.sum(1)}, r"score_fn returned \[2\], expected shape \[2, 2\]"),
        ({**TWO_BY_TWO, "score_fn": lambda q, g: (q @ g.T) / 0.0}, "score_fn output contain NaN or Inf"),
        ({"images": np.full((2, 2), 3e19), "texts": np.full((2, 2), 3e19), "captions_per_image": 1}, "NaN or Inf"),
    ],
)
def test_cross_modal_input_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(RetrievalInputError, match=message) as info:
        evaluate_cross_modal(**kwargs)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


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
