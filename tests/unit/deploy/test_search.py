"""gssf_cli.deploy.search: faiss indexes for inner-product search over head-transformed (non-unit-norm) galleries."""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from gssf_cli.core.errors import UserInputError
from gssf_cli.deploy.exact_search import exact_search, recall_at_k
from gssf_cli.deploy.search import (
    INDEX_KINDS,
    REFINE_OFF,
    IndexBuilder,
    IndexSpec,
    index_spec,
    read_index,
    search,
    search_overrides,
    set_threads,
    write_index,
)
from tests.unit.deploy.references import DIM, argsort_reference, random_gallery, unit_queries


def clustered(n: int, queries: int, dim: int = DIM, seed: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Gallery around 20 centres with varying norms, and unit queries near random gallery items."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, dim)).astype(np.float32)
    x = centres[rng.integers(20, size=n)] + 0.25 * rng.standard_normal((n, dim)).astype(np.float32)
    x = x / np.linalg.norm(x, axis=1, keepdims=True) * rng.uniform(0.5, 2.0, (n, 1)).astype(np.float32)
    q = x[rng.integers(n, size=queries)] + 0.3 * rng.standard_normal((queries, dim)).astype(np.float32)
    return x, (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def build(kind: str, gallery: np.ndarray, overrides: dict[str, int | None] | None = None) -> tuple[Any, IndexSpec]:
    spec = index_spec(kind, gallery.shape[1], len(gallery), overrides)
    builder = IndexBuilder(spec)
    if builder.training_size:
        sample = np.random.default_rng(5).permutation(len(gallery))[: builder.training_size]
        builder.train(gallery[np.sort(sample)])
    for start in range(0, len(gallery), 300):
        builder.add(gallery[start : start + 300])
    return builder.finish(), spec


# ----------------------------------------------------------------------------------------------------------
# Exact search: flat and the numpy reference agree with argsort


@pytest.mark.parametrize(("n", "k"), [(1_000, 10), (50, 7), (12, 30)])
def test_flat_and_exact_search_match_a_per_query_argsort(n: int, k: int) -> None:
    gallery, queries = random_gallery(n), unit_queries(9)
    want_scores, want_rows = argsort_reference(gallery, queries, k)
    index, spec = build("flat", gallery)
    for scores, rows in (search(index, spec, queries, k), exact_search(gallery, queries, k, chunk=64)):
        assert scores.shape == rows.shape == (9, k)
        assert scores.dtype == np.float32 and rows.dtype == np.int64
        np.testing.assert_array_equal(rows, want_rows)
        np.testing.assert_allclose(scores, want_scores, atol=1e-5)


def test_past_the_gallery_rows_are_minus_one_and_scores_minus_inf() -> None:
    gallery = random_gallery(5)
    for kind in INDEX_KINDS:
        if kind == "ivfpq":
            continue
        index, spec = build(kind, gallery)
        scores, rows = search(index, spec, unit_queries(3), 8)
        assert (rows[:, 5:] == -1).all() and np.isneginf(scores[:, 5:]).all(), kind
        assert sorted(rows[0, :5].tolist()) == list(range(5)), kind


# ----------------------------------------------------------------------------------------------------------
# Every kind builds and searches; the approximate ones find the right rows on clustered data


@pytest.mark.parametrize("kind", list(INDEX_KINDS))
@pytest.mark.parametrize("n", [50, 1_000])
def test_every_kind_builds_and_returns_true_inner_products(kind: str, n: int) -> None:
    gallery, queries = clustered(n, 40)
    index, spec = build(kind, gallery)
    assert index.ntotal == n
    scores, rows = search(index, spec, queries, 10, vectors=gallery)
    assert rows.shape == (40, 10) and (rows >= 0).all() and (rows < n).all()
    assert (np.diff(scores, axis=1) <= 1e-6).all(), "best first"
    np.testing.assert_allclose(scores, np.einsum("qkd,qd->qk", gallery[rows], queries), atol=1e-5)
    if kind == "ivfpq" and n >= 1_000:  # refine off: the scores come from the compressed codes
        scores, rows = search(index, spec, queries, 10, search_overrides(spec, {"refine": REFINE_OFF}))
        assert np.abs(scores - np.einsum("qkd,qd->qk", gallery[rows], queries)).mean() < 0.15


@pytest.mark.parametrize(
    ("kind", "params", "least"),
    [
        ("flat", None, 1.0),
        ("hnsw", None, 0.9),
        ("hnsw", {"ef_search": 512}, 0.97),
        ("ivfpq", {"nprobe": 8, "refine": 0}, 0.45),
        ("ivfpq", None, 0.9),
    ],
)
def test_recall_against_exact_on_clustered_data(kind: str, params: dict[str, int] | None, least: float) -> None:
    """Thresholds sit below what the defaults reach here (hnsw 0.99 / 1.0, ivfpq ~0.6 without refine): a small,
    fairly uniform 32-dim gallery is harder for a graph than the benchmark's data (0.98 at ef_search 64)."""
    gallery, queries = clustered(3_000, 100)
    _, exact = exact_search(gallery, queries, 10)
    index, spec = build(kind, gallery)
    _, found = search(index, spec, queries, 10, params, gallery)
    assert recall_at_k(found, exact) >= least


def test_hnsw_rescores_a_vector_somewhat_above_the_sampled_norm_bound() -> None:
    """The norm bound comes from a training sample; a vector added later above it (clamped, so its L2 distance
    overstates) must still come out first, with its true inner product, once the candidates are re-scored."""
    gallery, queries = clustered(1_000, 5)
    spec = index_spec("hnsw", DIM, 1_001)
    builder = IndexBuilder(spec)
    builder.train(gallery)
    builder.add(gallery)
    norm = 1.2 * 1.1 * float(np.linalg.norm(gallery, axis=1).max())
    builder.add(norm * queries[:1])
    scores, rows = search(builder.finish(), spec, queries[:1], 3)
    assert rows[0, 0] == 1_000
    assert scores[0, 0] == pytest.approx(norm, rel=1e-5)


def test_search_time_parameters_trade_recall() -> None:
    gallery, queries = clustered(3_000, 100)
    _, exact = exact_search(gallery, queries, 10)
    index, spec = build("ivfpq", gallery)
    nlist = spec.build["nlist"]
    few = recall_at_k(search(index, spec, queries, 10, search_overrides(spec, {"nprobe": 1}), gallery)[1], exact)
    every = recall_at_k(search(index, spec, queries, 10, search_overrides(spec, {"nprobe": nlist}), gallery)[1], exact)
    assert every > few


def test_refine_recalls_what_the_codes_alone_miss_and_scores_exactly() -> None:
    """Every list probed, so only the codes limit the plain search; re-scoring ``refine * k`` of its candidates
    from the vectors finds the true neighbours it ranked just below ``k``, and returns their exact products."""
    gallery, queries = clustered(3_000, 100)
    _, exact = exact_search(gallery, queries, 10)
    index, spec = build("ivfpq", gallery, {"pq_m": 4})
    every = spec.build["nlist"]
    _, plain = search(index, spec, queries, 10, search_overrides(spec, {"nprobe": every, "refine": REFINE_OFF}))
    scores, rows = search(index, spec, queries, 10, search_overrides(spec, {"nprobe": every, "refine": 8}), gallery)
    assert recall_at_k(plain, exact) < 0.8 < 0.95 <= recall_at_k(rows, exact)
    np.testing.assert_allclose(scores, np.einsum("qkd,qd->qk", gallery[rows], queries), rtol=1e-6, atol=1e-6)
    assert (np.diff(scores, axis=1) <= 0).all()


def test_refine_needs_the_vectors_and_they_must_fit_the_index() -> None:
    gallery, queries = clustered(1_000, 3)
    index, spec = build("ivfpq", gallery)
    assert spec.search["refine"] != REFINE_OFF
    with pytest.raises(UserInputError, match=r"--refine \d+ re-scores from the gallery's stored vectors"):
        search(index, spec, queries, 5)
    with pytest.raises(UserInputError, match=r"stored vectors are float32 \[999, 32\]"):
        search(index, spec, queries, 5, vectors=gallery[:-1])


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_refine_is_refused_in_one_line_by_a_kind_without_it(kind: str) -> None:
    for ask in (
        lambda: index_spec(kind, DIM, 1_000, {"refine": 4}),
        lambda: search_overrides(index_spec(kind, DIM, 1_000), {"refine": 4}),
    ):
        with pytest.raises(UserInputError, match=f"--refine does not apply to --kind {kind}") as caught:
            ask()
        assert "\n" not in str(caught.value)


# ----------------------------------------------------------------------------------------------------------
# Files


@pytest.mark.parametrize("kind", list(INDEX_KINDS))
def test_write_and_read_round_trip(kind: str, tmp_path) -> None:
    gallery, queries = clustered(1_000, 10)
    index, spec = build(kind, gallery)
    path = tmp_path / "index.faiss"
    write_index(index, path)
    again = read_index(path, IndexSpec.from_json(spec.to_json()), 1_000)
    for before, after in zip(
        search(index, spec, queries, 5, vectors=gallery), search(again, spec, queries, 5, vectors=gallery), strict=True
    ):
        np.testing.assert_array_equal(before, after)


def test_read_index_refuses_a_wrong_dim_count_kind_or_file(tmp_path) -> None:
    gallery = random_gallery(100)
    index, spec = build("flat", gallery)
    path = tmp_path / "index.faiss"
    write_index(index, path)
    with pytest.raises(UserInputError, match="100 vectors, but the manifest lists 99"):
        read_index(path, spec, 99)
    with pytest.raises(UserInputError, match="32-dimensional vectors, but the manifest says 16"):
        read_index(path, IndexSpec("flat", 16), 100)
    with pytest.raises(UserInputError, match="IndexFlatIP, but the manifest says --kind hnsw"):
        read_index(path, index_spec("hnsw", DIM, 100), 100)
    (tmp_path / "junk.faiss").write_bytes(b"not an index")
    with pytest.raises(UserInputError, match="cannot read the faiss index"):
        read_index(tmp_path / "junk.faiss", spec, 100)


# ----------------------------------------------------------------------------------------------------------
# Specs and bad input: one line naming the flag


@pytest.mark.parametrize(
    ("kind", "overrides", "message"),
    [
        ("ivfpq", {"nlist": 5_000}, "--nlist 5,000 is larger than the gallery (1,200 vectors); use at most 30"),
        ("ivfpq", {"pq_m": 5}, "--pq-m 5 does not divide the dimension 32"),
        ("ivfpq", {"pq_bits": 11}, "--pq-bits 11 needs 2,048 training vectors"),
        ("hnsw", {"hnsw_m": 1}, "--hnsw-m 1 is out of range for --kind hnsw"),
        ("hnsw", {"ef_search": 0}, "--ef-search 0 is out of range"),
        ("hnsw", {"nprobe": 4}, "--nprobe does not apply to --kind hnsw"),
        ("flat", {"hnsw_m": 16}, "--hnsw-m does not apply to --kind flat; it takes no parameters"),
        ("annoy", {}, "--kind 'annoy' is not an index kind; use one of flat, hnsw, ivfpq"),
    ],
)
def test_index_spec_refuses_bad_overrides(kind: str, overrides: dict[str, int | None], message: str) -> None:
    with pytest.raises(UserInputError, match=re.escape(message)) as caught:
        index_spec(kind, DIM, 1_200, overrides)
    assert "\n" not in str(caught.value)


def test_index_spec_defaults_fit_the_gallery_and_none_keeps_them() -> None:
    small = index_spec("ivfpq", 256, 1_000, {"nlist": None})
    assert small.build["nlist"] <= 1_000 // 39 and 256 % small.build["pq_m"] == 0
    assert 4 <= 256 // small.build["pq_m"] <= 8
    big = index_spec("ivfpq", 256, 1_000_000)
    assert big.build["nlist"] > 1_000 and 1 <= big.search["nprobe"] <= big.build["nlist"]
    assert index_spec("hnsw", 256, 10, {"hnsw_m": 16}).build["hnsw_m"] == 16
    assert index_spec("flat", 7, 3) == IndexSpec("flat", 7, {}, {})


def test_search_overrides_keeps_stored_defaults_and_refuses_build_parameters() -> None:
    spec = index_spec("hnsw", DIM, 1_000)
    assert search_overrides(spec, {"ef_search": None}) == spec.search
    assert search_overrides(spec, {"ef_search": 200}) == {"ef_search": 200}
    with pytest.raises(UserInputError, match="--hnsw-m is fixed when the index is built"):
        search_overrides(spec, {"hnsw_m": 8})


def test_spec_json_round_trip_and_refusals() -> None:
    spec = index_spec("ivfpq", DIM, 5_000)
    assert IndexSpec.from_json(spec.to_json()) == spec
    for bad, message in [
        ([], "expected an object"),
        ({**spec.to_json(), "kind": "lsh"}, "'lsh' is not an index kind"),
        ({**spec.to_json(), "dim": 0}, "dim must be a positive integer"),
        ({**spec.to_json(), "build": {"nlist": 8}}, "expected the parameters"),
        ({**spec.to_json(), "search": {"nprobe": -1}}, "--nprobe -1 is out of range"),
        ({**spec.to_json(), "search": {"nprobe": 8, "refine": -1}}, "--refine -1 is out of range"),
        ({**spec.to_json(), "search": {"nprobe": 8, "refine": 2, "k": 1}}, "expected the parameters"),
    ]:
        with pytest.raises(UserInputError, match=message):
            IndexSpec.from_json(bad)


def test_an_ivfpq_spec_written_before_refine_reads_with_refine_off() -> None:
    old = {**index_spec("ivfpq", DIM, 5_000).to_json(), "search": {"nprobe": 8}}
    assert IndexSpec.from_json(old).search == {"nprobe": 8, "refine": REFINE_OFF}


def test_search_refuses_wrong_dim_empty_queries_and_bad_k() -> None:
    index, spec = build("flat", random_gallery(20))
    with pytest.raises(UserInputError, match=r"queries have shape \[3, 16\]; the index expects \[N, 32\]"):
        search(index, spec, unit_queries(3, 16), 5)
    with pytest.raises(UserInputError, match="no queries"):
        search(index, spec, np.zeros((0, DIM), np.float32), 5)
    with pytest.raises(UserInputError, match="--k must be at least 1"):
        search(index, spec, unit_queries(1), 0)
    with pytest.raises(UserInputError, match=r"gallery vectors have shape \[4, 8\]"):
        IndexBuilder(spec).add(np.zeros((4, 8), np.float32))
    with pytest.raises(UserInputError, match="--threads must be at least 1"):
        set_threads(0)


def test_importing_the_module_loads_neither_faiss_nor_torch() -> None:
    code = "import sys, gssf_cli.deploy.search; print(sorted({'faiss', 'torch', 'mlflow'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_the_default_nprobe_follows_an_nlist_given() -> None:
    """``--nlist`` alone: nprobe is the rule's for that nlist (4·sqrt(nlist), at least 8), not for the default."""
    from gssf_cli.deploy.search import default_nprobe, index_spec

    default = index_spec("ivfpq", 64, 3_600_000)
    assert default.search["nprobe"] == default_nprobe(default.build["nlist"]) == 349
    given = index_spec("ivfpq", 64, 3_600_000, {"nlist": 1897})
    assert given.build["nlist"] == 1897 and given.search["nprobe"] == 175
    assert index_spec("ivfpq", 64, 3_600_000, {"nlist": 1897, "nprobe": 5}).search["nprobe"] == 5


def test_faiss_threads_default_to_the_free_cores_and_follow_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """faiss's OpenMP team is as large as the cores no other process is busy on (a team thread waiting for a held
    core stalls every query), unless ``--threads`` says otherwise."""
    from gssf_cli.deploy import search

    faiss = search._faiss()
    before = faiss.omp_get_max_threads()
    try:
        search._faiss.cache_clear()
        monkeypatch.setattr(search, "free_cores", lambda: 1)
        assert search._faiss().omp_get_max_threads() == 1
        set_threads(2)
        assert faiss.omp_get_max_threads() == 2
    finally:
        faiss.omp_set_num_threads(before)
