"""gssf_cli.evaluation.crossmodal against slow, obviously-correct references (tests/unit/evaluation/references.py):
hand-computed fixtures, any ks, asymmetric score functions, chunking invariance, per-query fold ranks, the
COCO/Flickr protocols and input errors."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gssf_cli.evaluation import crossmodal
from gssf_cli.evaluation import ranking as retrieval
from gssf_cli.evaluation.crossmodal import cross_modal_ranks, evaluate_cross_modal
from gssf_cli.evaluation.ranking import RetrievalInputError
from tests.unit.evaluation.references import (
    FAST,
    _asymmetric,
    _pairs,
    assert_metrics_equal,
    metrics_only,
    reference_cross_modal,
    reference_cross_modal_ranks,
    small_int_embeddings,
)

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


# ----------------------------------------------------------------------------------------------------------
# Hand-computed fixtures


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
# Against the reference


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


@FAST
@given(cross_modal_matrices(), st.sampled_from([1, 2, 3, 512]), st.sampled_from([1, 2, 3, 5, 4096]))
def test_streamed_caption_stripes_equal_the_reference(problem: tuple[np.ndarray, int], rows: int, stripe: int) -> None:
    """Embeddings scored a stripe of captions at a time, stripes starting at each image range's own captions
    and wrapping around: every boundary (ties across it, a last stripe narrower than the others, a range whose
    first stripe reaches the last column) leaves the ranks those of the whole matrix. One-hot images against
    score-valued captions make the inner products the problem's scores exactly."""
    s, k = problem
    images, texts = torch.eye(s.shape[0]), torch.from_numpy(s.T.copy())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(retrieval, "STREAM_IMAGE_ROWS", rows)
        patch.setattr(retrieval, "STRIPE_COLUMNS", stripe)
        got = cross_modal_ranks(images, texts, captions_per_image=k)
    i2t, t2i, aps = reference_cross_modal_ranks(s, k)
    assert got.i2t.tolist() == i2t and got.t2i.tolist() == t2i
    np.testing.assert_allclose(got.i2t_ap.numpy(), aps, rtol=1e-12)
    whole = cross_modal_ranks(scores=s, captions_per_image=k)
    assert torch.equal(got.i2t_ap, whole.i2t_ap)


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
# Per-query ranks (chunked) against the slow reference


@pytest.mark.parametrize("budget", [64, 2**20])
def test_cross_modal_fold_ranks_equal_the_slow_reference(budget: int) -> None:
    images, texts = _pairs(14, 3)
    score_fn = _asymmetric()
    ranks = crossmodal.cross_modal_fold_ranks(
        images, texts, captions_per_image=3, score_fn=score_fn, memory_budget_bytes=budget
    )
    s = score_fn(torch.from_numpy(images), torch.from_numpy(texts)).numpy()
    i2t, t2i, aps = reference_cross_modal_ranks(s, 3)
    assert ranks.i2t.tolist() == i2t and ranks.t2i.tolist() == t2i
    np.testing.assert_allclose(ranks.i2t_ap.numpy(), aps, rtol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# Protocols


def test_protocol_folds() -> None:
    assert crossmodal.protocol_folds(7, "all") == [(0, 7)]
    assert crossmodal.protocol_folds(5000, "coco-1k") == [(i, i + 1000) for i in range(0, 5000, 1000)]
    with pytest.raises(retrieval.RetrievalInputError, match="protocol f30k-1k needs 1,000 images, got 7"):
        crossmodal.protocol_folds(7, "f30k-1k")


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
