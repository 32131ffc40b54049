"""Late-interaction search over a token index (:mod:`gssf_cli.deploy.token_index`) on a real, tiny interaction
bundle (one ``scan-t2i`` epoch on tiny synthetic data, exported once per module): with every region a candidate it
is exact search; every score it returns is the bundle's exact pair score; ``k`` is capped by the gallery; the
scorer's blocks change nothing; and the bundle scores as the PyTorch model does. Everything but the last test runs
on ONNX Runtime, numpy and faiss alone (the CLI end to end: ``tests/behaviour/test_token_deploy.py``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gssf_cli.core.errors import UserInputError
from gssf_cli.core.stage_configs import IndexConfig, SearchConfig
from gssf_cli.deploy import bundle as bundle_module
from gssf_cli.deploy import index_folder, indexes, token_index
from gssf_cli.deploy.bundle import BundleModel, score_token_sets
from gssf_cli.deploy.token_index import TokenQueries
from tests.conftest import tiny_train_config

EXACT = 1e-6
"""Scores of the same pair by the same scorer graph: equal up to float32 rounding of the blocks."""


@dataclass(frozen=True)
class Exported:
    """A one-epoch scan-t2i model of the session's tiny synthetic dataset (no tracking store: trained and exported
    with the library), its bundle, and a flat token index over the train split's 64 images (256 regions) — a gallery
    larger than ``k``, so that the candidates are a real choice."""

    model: Any
    vocab: Any
    bundle: BundleModel
    index: Path
    gallery: np.ndarray
    captions: list[str]

    @property
    def tokens(self) -> np.ndarray:
        return np.load(self.index / index_folder.TOKENS_FILE)

    @property
    def count(self) -> int:
        return int(self.gallery.shape[0])

    @property
    def regions(self) -> int:
        return int(self.gallery.shape[0] * self.gallery.shape[1])


@pytest.fixture(scope="module")
def exported(tiny_syn: Path, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    from gssf_cli.core.stage_configs import ExportConfig
    from gssf_cli.data.dataset import Dataset
    from gssf_cli.deploy.onnx_export import write_bundle
    from gssf_cli.modeling import checkpoint as ckpt
    from gssf_cli.modeling.model import build_model, load_weights
    from gssf_cli.training.loop import fit

    folder = tmp_path_factory.mktemp("token-index")
    config: Any = tiny_train_config(tiny_syn, interaction="scan-t2i", epochs=1)
    dataset = Dataset(tiny_syn)
    fitted = fit(config, dataset, folder / "run")
    model = build_model(dataset, config)
    load_weights(model, ckpt.load(fitted.out_dir / ckpt.BEST).model)
    written = write_bundle(model, dataset, folder / "exports/scan", ExportConfig(), "library-run")
    assert written.passed and written.manifest["family"] == "interaction", written.manifest["parity"]
    gallery = tiny_syn / "train_ims.npy"
    built = indexes.build(IndexConfig(bundle=written.path, gallery=gallery, out=folder / "indexes/scan"))
    assert built.manifest["family"] == "interaction" and built.manifest["regions_per_image"] == 4
    captions = (tiny_syn / "test_caps.txt").read_text().splitlines()
    return Exported(model.eval(), dataset.vocab, BundleModel.load(written.path), built.path, np.load(gallery), captions)


def _queries(bundle: BundleModel, captions: list[str]) -> TokenQueries:
    return token_index.caption_queries(bundle, captions, lambda i: f"caption {i}")


def _opened(exported: Exported) -> index_folder.OpenIndex:
    return index_folder.open_index(exported.index)


def _all_scores(exported: Exported, queries: TokenQueries) -> np.ndarray:
    """``[Q, N]``: every query against every gallery image by the scorer, one call."""
    return exported.bundle.pair_scores(exported.tokens, queries.words, queries.lengths).T


def _assert_same_ranking(scores: np.ndarray, rows: np.ndarray, want_scores: np.ndarray, want_rows: np.ndarray) -> None:
    """The same scores at every place, and the same rows except between items tied within :data:`EXACT`."""
    np.testing.assert_allclose(scores, want_scores, atol=EXACT, rtol=0)
    differ = rows != want_rows
    assert np.all(np.abs(scores[differ] - want_scores[differ]) <= EXACT), "rows differ beyond ties"


def test_the_index_holds_the_bundles_unit_regions_and_their_head(exported: Exported) -> None:
    """``tokens.npy`` is the image tower's regions of every gallery image, and the faiss index answers a word with
    ``head(region) · word``: the learned token similarity."""
    tokens = exported.tokens
    assert tokens.shape == (exported.count, 4, exported.bundle.dim) and tokens.dtype == np.float32
    np.testing.assert_allclose(tokens, exported.bundle.encode_image_tokens(exported.gallery), atol=EXACT)
    np.testing.assert_allclose(np.linalg.norm(tokens, axis=-1), 1.0, atol=1e-5)
    opened = _opened(exported)
    assert opened.manifest["regions_per_image"] == 4 and opened.index.ntotal == exported.regions
    words = _queries(exported.bundle, exported.captions[:1]).valid_words(0)
    scores, rows = token_index.search.search(opened.index, opened.spec, words, 3)
    head = exported.bundle.transform(tokens.reshape(-1, tokens.shape[-1]))
    np.testing.assert_allclose(scores, np.sort(words @ head.T, axis=1)[:, ::-1][:, :3], atol=1e-5)
    assert np.all(rows >= 0)


@pytest.mark.parametrize("extra", [0, 7])
def test_every_region_a_candidate_is_exact_search(exported: Exported, extra: int) -> None:
    """``per_word`` ≥ N·R (every region, every image a candidate): late interaction returns the exhaustive ranking
    of :func:`exact_top_k` and of the scorer over the whole gallery."""
    opened, queries = _opened(exported), _queries(exported.bundle, exported.captions)
    per_word = exported.regions + extra
    found = token_index.candidates(opened.index, opened.spec, queries, 4, per_word, {})
    assert all(np.array_equal(images, np.arange(exported.count)) for images in found)
    scores, rows = token_index.late_interaction(exported.bundle, opened.index, opened.spec, exported.tokens,
                                                queries, 10, per_word)  # fmt: skip
    exact_scores, exact_rows = token_index.exact_top_k(exported.bundle, exported.tokens, queries, 10)
    _assert_same_ranking(scores, rows, exact_scores, exact_rows)
    every = _all_scores(exported, queries)
    order = np.argsort(-every, axis=1, kind="stable")[:, :10]
    _assert_same_ranking(scores, rows, np.take_along_axis(every, order, axis=1), order)
    assert np.all(np.diff(scores, axis=1) <= 0), "best first"


@pytest.mark.parametrize("per_word", [1, 2, 5])
def test_every_returned_score_is_the_exact_pair_score(exported: Exported, per_word: int) -> None:
    """Few candidates per word: the answer is the best of the candidates, each with its exact interaction score —
    the scorer on the stored regions, and the bundle's scores from the raw image and caption."""
    opened, captions = _opened(exported), exported.captions[::5]
    queries = _queries(exported.bundle, captions)
    found = token_index.candidates(opened.index, opened.spec, queries, 4, per_word, {})
    scores, rows = token_index.late_interaction(exported.bundle, opened.index, opened.spec, exported.tokens,
                                                queries, 10, per_word)  # fmt: skip
    every = _all_scores(exported, queries)
    for query, caption in enumerate(captions):
        valid = rows[query] >= 0
        assert valid.sum() == min(10, found[query].size) and set(rows[query][valid]) <= set(found[query])
        np.testing.assert_allclose(scores[query][valid], every[query, rows[query][valid]], atol=EXACT, rtol=0)
        assert np.all(np.isneginf(scores[query][~valid]))
        raw = exported.bundle.input_scores(exported.gallery[rows[query][valid]], [caption])
        assert raw is not None
        np.testing.assert_allclose(scores[query][valid], raw[:, 0], atol=EXACT, rtol=0)
        best = np.sort(every[query, found[query]])[::-1][: valid.sum()]
        np.testing.assert_allclose(scores[query][valid], best, atol=EXACT, rtol=0)


def test_k_beyond_the_gallery_is_capped(exported: Exported) -> None:
    caption = exported.captions[0]
    result = token_index.run_search(_opened(exported), SearchConfig(index=exported.index, text=caption, k=10**9,
                                                                     per_word=exported.regions))  # fmt: skip
    hits = result.queries[0]["results"]
    assert sorted(hit["row"] for hit in hits) == list(range(exported.count))
    assert [hit["rank"] for hit in hits] == list(range(1, exported.count + 1))
    every = _all_scores(exported, _queries(exported.bundle, [caption]))[0]
    np.testing.assert_allclose([hit["score"] for hit in hits], np.sort(every)[::-1], atol=EXACT, rtol=0)


def test_per_word_beyond_the_index_is_capped(exported: Exported, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--per-word`` above the regions in the index means every region (as ``--k`` above the gallery means every
    image), never a ``[words, per_word]`` allocation: the guard below stands in for the MemoryError that a real
    ``--per-word 1000000000`` meets, without allocating it."""
    real = token_index.search.search

    def guarded(index: Any, spec: Any, queries: np.ndarray, k: int, params: Any = None) -> Any:
        if k > index.ntotal:
            raise MemoryError(f"would allocate [{len(queries)}, {k}] results for an index of {index.ntotal} vectors")
        return real(index, spec, queries, k, params)

    monkeypatch.setattr(token_index.search, "search", guarded)
    caption = exported.captions[0]
    result = token_index.run_search(_opened(exported), SearchConfig(index=exported.index, text=caption, k=exported.count,
                                                                     per_word=10**9))  # fmt: skip
    assert sorted(hit["row"] for hit in result.queries[0]["results"]) == list(range(exported.count))


def test_rescore_pads_where_fewer_candidates_than_k(exported: Exported) -> None:
    queries = _queries(exported.bundle, exported.captions[:3])
    found = [np.array([3, 17]), np.array([], dtype=np.int64), np.arange(exported.count)]
    scores, rows = token_index.rescore(exported.bundle, exported.tokens, queries, found, 5)
    assert sorted(rows[0][:2]) == [3, 17] and list(rows[0][2:]) == [-1, -1, -1]
    assert list(rows[1]) == [-1] * 5 and np.all(np.isneginf(scores[1]))
    assert np.all(rows[2] >= 0) and np.all(np.isneginf(scores[0][2:]))


def test_eval_with_every_region_a_candidate_has_recall_one(exported: Exported) -> None:
    opened, queries = _opened(exported), _queries(exported.bundle, exported.captions[:20])
    report = token_index.measure(exported.bundle, opened.index, opened.spec, exported.tokens, queries,
                                 exported.regions)  # fmt: skip
    assert report["recall_at_10"] == 1.0 and report["candidates_per_query"] == exported.count
    assert report["queries"] == 20 and report["k"] == 10 and report["per_word"] == exported.regions


class _CountingScorer:
    """An ONNX Runtime session that counts its calls and the largest block it was given."""

    def __init__(self, session: Any) -> None:
        self.session, self.calls, self.largest = session, 0, (0, 0)

    def run(self, outputs: Any, feed: dict[str, np.ndarray]) -> Any:
        self.calls += 1
        block = (len(feed["regions"]), len(feed["words"]))
        self.largest = max(self.largest, block)
        return self.session.run(outputs, feed)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(images=st.integers(1, 9), captions=st.integers(1, 11), budget=st.integers(1, 400))
def test_scoring_in_blocks_equals_one_call(exported: Exported, images: int, captions: int, budget: int) -> None:
    """A small token-pair budget (:func:`gssf_cli.core.limits.token_block_shape`) splits the pairs into many
    blocks — each within the budget, or one pair — and the scores are those of one big call."""
    from gssf_cli.core import limits

    regions = exported.tokens[:images]
    queries = _queries(exported.bundle, exported.captions[:captions])
    session = exported.bundle.sessions["scorer"]
    whole = session.run(None, {"regions": regions, "words": queries.words, "lengths": queries.lengths})[0]
    counting = _CountingScorer(session)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bundle_module, "token_block_shape",
                      lambda n, r, m, length: limits.token_block_shape(n, r, m, length, budget))  # fmt: skip
        blocked = score_token_sets(counting, regions, queries.words, queries.lengths)
    np.testing.assert_allclose(blocked, whole, atol=EXACT, rtol=0)
    per_image, per_caption = limits.token_block_shape(images, 4, captions, queries.words.shape[1], budget)
    assert counting.calls == -(-images // per_image) * -(-captions // per_caption)
    bi, bc = counting.largest
    assert bi * bc * 4 * queries.words.shape[1] <= max(budget, 4 * queries.words.shape[1])


def test_scoring_nothing_gives_an_empty_matrix(exported: Exported) -> None:
    queries = _queries(exported.bundle, exported.captions[:2])
    assert score_token_sets(exported.bundle.sessions["scorer"], exported.tokens[:0], queries.words,
                            queries.lengths).shape == (0, 2)  # fmt: skip
    empty = exported.bundle.pair_scores(exported.tokens[:3], queries.words[:0], queries.lengths[:0])
    assert empty.shape == (3, 0)


def test_the_bundle_scores_as_the_torch_model(exported: Exported) -> None:
    """:meth:`BundleModel.input_scores` (ONNX Runtime: image tower, text tower, scorer) against the trained model's
    interaction scores in PyTorch (what its served model answers), from the same raw images and captions."""
    from gssf_cli.stages.runs import TrainedModel

    images, captions = exported.gallery[:12], exported.captions[:17]
    expected = TrainedModel(exported.model, exported.vocab).input_scores(images, captions)
    got = exported.bundle.input_scores(images, captions)
    assert expected is not None and got is not None and got.shape == (12, 17)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert np.ptp(got) > 1e-3, "the scores are not all alike: the comparison means something"


def test_open_tokens_refuses_regions_that_disagree_with_the_manifest(exported: Exported) -> None:
    manifest = dict(_opened(exported).manifest, regions_per_image=5)
    with pytest.raises(UserInputError, match=r"tokens.npy: holds float32 \[64, 4, 16\], the manifest says float32 "
                                             r"\[64, 5, 16\]; rebuild the index"):  # fmt: skip
        token_index.open_tokens(exported.index, manifest, exported.bundle.dim)


def test_an_ivfpq_token_index_stores_refine_off_and_refuses_refine(
    exported: Exported, tiny_syn: Path, tmp_path: Path
) -> None:
    """Its candidates are re-scored by late interaction already, and it keeps no vectors.npy to refine from."""
    config = IndexConfig(bundle=exported.bundle.folder, gallery=tiny_syn / "train_ims.npy", kind="ivfpq",
                         out=tmp_path / "ivfpq")  # fmt: skip
    built = indexes.build(config)
    assert built.manifest["spec"]["search"]["refine"] == 0
    assert index_folder.VECTORS_FILE not in built.manifest["files"]
    opened = index_folder.open_index(built.path)
    assert opened.vectors is None
    found = token_index.run_search(opened, SearchConfig(index=built.path, text=exported.captions[0], k=3))
    assert found.params["refine"] == 0 and len(found.queries[0]["results"]) == 3
    for ask in (
        lambda: token_index.run_search(opened, SearchConfig(index=built.path, text=exported.captions[0], refine=2)),
        lambda: indexes.build(dataclasses.replace(config, refine=2, out=tmp_path / "refined")),
    ):
        with pytest.raises(UserInputError, match=r"--refine 2 applies to an embedding ivfpq index; a token index"):
            ask()
    assert not (tmp_path / "refined").exists()
