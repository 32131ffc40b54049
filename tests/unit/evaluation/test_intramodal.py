"""Intra-modal retrieval against a slow reference, its relevance sources, and compare's units of it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gssf_cli.evaluation import intramodal
from gssf_cli.evaluation.intramodal import Relevance, intra_modal, relevance_of, unit_columns


def _reference(embeddings: np.ndarray, sets: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
    """One query at a time, in plain Python: rank the others by cosine, non-relevant first among equal scores."""
    hits: dict[int, list[float]] = {k: [] for k in ks}
    aps: list[float] = []
    for q in range(len(embeddings)):
        mine = {v for v in sets[q].tolist() if v >= 0}
        others = [j for j in range(len(embeddings)) if j != q]
        relevant = {j: bool(mine & {v for v in sets[j].tolist() if v >= 0}) for j in others}
        if not any(relevant.values()):
            continue
        scores = {j: float(np.float32(embeddings[q] @ embeddings[j])) for j in others}
        ranked = sorted(others, key=lambda j: (-scores[j], relevant[j]))
        for k in ks:
            hits[k].append(100.0 * any(relevant[j] for j in ranked[:k]))
        r = sum(relevant.values())
        found, total = 0, 0.0
        for i, j in enumerate(ranked[:r], start=1):
            if relevant[j]:
                found += 1
                total += found / i
        aps.append(100.0 * total / r)
    if not aps:
        return {}
    out = {f"s_r{k}": float(np.mean(v)) for k, v in hits.items()}
    return out | {"s_map_at_r": float(np.mean(aps))}


@settings(max_examples=60, deadline=None)
@given(
    items=st.integers(3, 30),
    dim=st.integers(1, 4),
    levels=st.integers(1, 3),
    seed=st.integers(0, 10_000),
    block=st.sampled_from([1, 7, 2**22]),
    count_below=st.sampled_from([0, 1, 16]),
)
def test_metrics_equal_a_slow_reference_ties_and_blocks_included(
    items: int, dim: int, levels: int, seed: int, block: int, count_below: int
) -> None:
    """Both ways of ranking: rows sorted whole, and the places of few relevant items counted."""
    rng = np.random.default_rng(seed)
    # Small integers: every product is exact in float32 whatever the summation order, and ties are many.
    embeddings = rng.integers(-levels, levels + 1, size=(items, dim)).astype(np.float32)
    sets = np.where(rng.random((items, 2)) < 0.7, rng.integers(0, 4, (items, 2)), -1)
    expected = _reference(embeddings, sets, (1, 5))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(intramodal, "BLOCK_ELEMENTS", block)
        patch.setattr(intramodal, "COUNT_BELOW", count_below)
        got = intra_modal("s", embeddings, Relevance(sets, "test"), ks=(1, 5))
    assert got.metrics().keys() == expected.keys()
    for key, value in expected.items():
        assert got.metrics()[key] == pytest.approx(value, abs=1e-9), key


def test_a_query_with_no_relevant_item_is_skipped_and_an_item_is_never_relevant_to_itself() -> None:
    sets = np.array([[0], [0], [1]])
    relevance = Relevance(sets, "t")
    assert relevance.block(slice(0, 3)).tolist() == [[False, True, False], [True, False, False], [False, False, False]]
    result = intra_modal("i2i", np.eye(3, dtype=np.float32), relevance)
    assert result.skipped == 1 and np.isnan(result.ap[2]) and result.metrics()["i2i_r1"] == pytest.approx(0.0)


def test_relevance_comes_from_recorded_concepts_else_from_the_captions_image(tmp_path: Path) -> None:
    sources = relevance_of(tmp_path, "test", 2, 3)
    assert "i2i" not in sources and sources["t2t"].source == "captions of the same image"
    assert sources["t2t"].sets[:, 0].tolist() == [0, 0, 0, 1, 1, 1]
    np.save(tmp_path / "test_concepts.npy", np.array([[1, 2, 3], [3, 4, 5]], dtype=np.int16))
    np.save(tmp_path / "test_caption_concepts.npy", np.array([[1, 2, -1]] * 3 + [[4, 5, -1]] * 3, dtype=np.int16))
    sources = relevance_of(tmp_path, "test", 2, 3)
    assert sources["i2i"].block(slice(0, 2)).tolist() == [[False, True], [True, False]]  # both show concept 3
    assert not sources["t2t"].block(slice(0, 6))[0, 3:].any()  # captions 0-2 and 3-5 name no concept in common


def test_compare_units_average_an_images_captions_and_leave_out_a_side_with_skipped_queries() -> None:
    embeddings = np.eye(4, dtype=np.float32)
    t2t = intra_modal("t2t", np.repeat(embeddings[:2], 2, axis=0), Relevance(np.array([[0], [0], [1], [1]]), "own"))
    i2i = intra_modal("i2i", embeddings[:2], Relevance(np.array([[0], [1]]), "none shared"))
    columns = unit_columns({"i2i": i2i, "t2t": t2t}, images=2, captions_per_image=2)
    assert set(columns) == {"t2t_r1", "t2t_r5", "t2t_r10", "t2t_map_at_r"}  # i2i: no image has a relevant one
    assert columns["t2t_r1"].tolist() == [100.0, 100.0]
    assert {k: float(v.mean()) for k, v in columns.items()} == pytest.approx(t2t.metrics())
