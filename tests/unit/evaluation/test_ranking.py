"""gssf_cli.evaluation.ranking, the chunked score engine under crossmodal and labels: tiles, chunk sizes and sorting
strategies leave every metric equal to the slow references (tests/unit/evaluation/references.py), one score block
is alive at a time, and iter_score_chunks covers every row once within its memory budget."""

from __future__ import annotations

import weakref
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from gssf_cli.evaluation import crossmodal
from gssf_cli.evaluation import labels as label_metrics
from gssf_cli.evaluation import ranking as retrieval
from gssf_cli.evaluation.crossmodal import evaluate_cross_modal
from gssf_cli.evaluation.ranking import iter_score_chunks
from tests.unit.evaluation.references import (
    assert_metrics_equal,
    evaluate_labels,
    metrics_only,
    reference_cross_modal,
    reference_labels,
)

# ----------------------------------------------------------------------------------------------------------
# Tiles, chunks and sorting strategies


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
