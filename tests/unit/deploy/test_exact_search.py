"""gssf_cli.deploy.exact_search: the numpy top-k that indexes are measured against agrees with a per-query argsort
whatever its chunking, and recall@k of an index's hits against it."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gssf_cli.deploy.exact_search import exact_search, recall_at_k
from tests.unit.deploy.references import argsort_reference, random_gallery, unit_queries


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 120),
    q=st.integers(1, 6),
    k=st.integers(1, 20),
    chunk=st.integers(1, 50),
    seed=st.integers(0, 2**16),
)
def test_exact_search_is_chunking_independent(n: int, q: int, k: int, chunk: int, seed: int) -> None:
    gallery, queries = random_gallery(n, 8, seed), unit_queries(q, 8, seed + 1)
    want_scores, want_rows = argsort_reference(gallery, queries, k)
    scores, rows = exact_search(gallery, queries, k, chunk=chunk)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)


def test_recall_at_k_on_a_hand_made_example() -> None:
    exact = np.array([[1, 2, 3, 4], [5, 6, -1, -1], [-1, -1, -1, -1]])
    found = np.array([[4, 3, 9, 8], [6, 7, 5, -1], [0, 1, 2, 3]])
    assert recall_at_k(found, exact) == pytest.approx((2 / 4 + 2 / 2) / 2)
    assert recall_at_k(exact[:2], exact[:2]) == 1.0
