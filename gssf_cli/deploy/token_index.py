"""Token indexes: late-interaction search over an interaction bundle's gallery, on faiss and ONNX Runtime — no torch.

Why it works for a learned metric: the token similarity of an interaction bundle is ``s(v, e) = head(v) · e``
(the metric head transforms the image side), so once every region is stored as ``head(v)`` the best regions for
a word are a plain maximum-inner-product search, in any of faiss's index kinds. ColBERT's recipe then applies:

1. **Candidates.** Each valid word of the query (``[L, D]``, unit) asks the index for its ``per_word`` best regions;
   the images those regions belong to (region ``t`` is image ``t // R``) are the candidates.
2. **Re-scoring.** The candidates' unit regions, read from ``tokens.npy`` (memory-mapped), are scored against the
   query exactly by the bundle's ``scorer`` graph — SCAN or maxsim, whatever the model was — and the best ``k``
   are the answer. Every returned score is the exact interaction score; only a relevant image that no word
   reached can be missed, which ``--eval`` measures against exact search over the whole gallery.

A token index folder holds what an embedding index holds (:mod:`gssf_cli.deploy.index_folder`), with ``index.faiss``
over ``head(region)`` for every region of every image ``[N·R, D]``, plus ``tokens.npy``: the unit regions
``[N, R, D]`` float32 that re-scoring reads. Its manifest says ``"family": "interaction"``, the regions per image R
(the token → image map: every gallery row has R regions), and the default ``per_word``.

An ``ivfpq`` token index stores ``refine`` off and refuses ``--refine``: its candidates are already re-scored
exactly, by the bundle's scorer over whole images, and it keeps no ``vectors.npy`` of ``head(region)`` to refine a
region search from.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gssf_cli.core.errors import UserInputError
from gssf_cli.core.files import MANIFEST, staged_folder
from gssf_cli.data.text import read_captions
from gssf_cli.deploy import exact_search, index_folder, search
from gssf_cli.deploy.bundle import BundleModel
from gssf_cli.deploy.index_folder import EVAL_K, TOKENS_FILE, BuiltIndex, Gallery, OpenIndex, Progress, SearchResult

if TYPE_CHECKING:
    from gssf_cli.core.stage_configs import IndexConfig, SearchConfig


DEFAULT_PER_WORD = 128
"""Regions each query word asks the index for (ColBERT's k′), when neither ``--per-word`` nor the index says;
capped at the index's regions. From ``benchmarks/bench_token_search.py`` (100,000 images × 36 regions, D = 128,
scan-t2i over ivfpq): the largest measured setting that stays above 10× exact search's throughput (14.8×), with
twice the recall of 32 — though no setting reached recall@10 0.95 on that data (see the benchmark's results)."""
EXACT_IMAGES = 4096
"""Gallery images scored at a time by exact search (:func:`exact_top_k`): bounds the regions read at once."""


@dataclass(frozen=True)
class TokenQueries:
    """Queries as token sets: unit words ``[Q, L, D]`` (zero at padding) and ``lengths [Q]``."""

    words: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.lengths)

    def valid_words(self, query: int) -> np.ndarray:
        """Query ``query``'s valid words ``[lengths[query], D]``."""
        return self.words[query, : int(self.lengths[query])]


def caption_queries(bundle: BundleModel, captions: list[str], where: Callable[[int], str]) -> TokenQueries:
    """Captions as token sets with the bundle's vocabulary; a caption none of whose words it knows is refused."""
    index_folder.check_captions(bundle, captions, where)
    return TokenQueries(*bundle.encode_text_tokens(captions))


# ---------------------------------------------------------------------------------------------------------
# Searching


def candidates(
    index: Any, spec: search.IndexSpec, queries: TokenQueries, regions: int, per_word: int, params: dict[str, int]
) -> list[np.ndarray]:
    """Each query's candidate images: the images of its words' ``per_word`` best regions, as sorted row ids."""
    owner = np.repeat(np.arange(len(queries)), queries.lengths)
    words = np.concatenate([queries.valid_words(q) for q in range(len(queries))])
    _, rows = search.search(index, spec, words, min(per_word, int(index.ntotal)), params)
    images = np.where(rows >= 0, rows // regions, -1)
    return [np.unique(found[found >= 0]) for found in (images[owner == q] for q in range(len(queries)))]


def rescore(
    bundle: BundleModel, tokens: np.ndarray, queries: TokenQueries, found: Sequence[np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of each query's candidates by the exact interaction score: ``(scores [Q, k], rows [Q, k])``,
    best first, row ``-1`` / score ``-inf`` where fewer than ``k`` candidates exist."""
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    rows = np.full((len(queries), k), -1, dtype=np.int64)
    for query, images in enumerate(found):
        if images.size == 0:
            continue
        length = int(queries.lengths[query])
        exact = bundle.pair_scores(tokens[images], queries.words[query : query + 1, :length],
                                   queries.lengths[query : query + 1])[:, 0]  # fmt: skip
        top_scores, top_rows = exact_search.sorted_best(*exact_search.top_k(exact[None, :], images[None, :], k))
        scores[query, : top_rows.shape[1]], rows[query, : top_rows.shape[1]] = top_scores[0], top_rows[0]
    return scores, rows


def late_interaction(
    bundle: BundleModel,
    index: Any,
    spec: search.IndexSpec,
    tokens: np.ndarray,
    queries: TokenQueries,
    k: int,
    per_word: int,
    params: dict[str, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Candidates from the token index, re-scored exactly: ``(scores [Q, k], rows [Q, k])`` (see the module)."""
    found = candidates(index, spec, queries, tokens.shape[1], per_word, dict(spec.search) if params is None else params)
    return rescore(bundle, tokens, queries, found, k)


def exact_top_k(
    bundle: BundleModel, tokens: np.ndarray, queries: TokenQueries, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact interaction search over the whole gallery ``tokens [N, R, D]``: every image scored against every
    query by the scorer, :data:`EXACT_IMAGES` images at a time, the running best ``k`` kept."""
    best_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_rows = np.full((len(queries), k), -1, dtype=np.int64)
    for start in range(0, tokens.shape[0], EXACT_IMAGES):
        block = bundle.pair_scores(np.asarray(tokens[start : start + EXACT_IMAGES]), queries.words, queries.lengths).T
        rows = np.broadcast_to(np.arange(start, start + block.shape[1]), block.shape)
        best_scores, best_rows = exact_search.top_k(np.hstack([best_scores, block]), np.hstack([best_rows, rows]), k)
    return exact_search.sorted_best(best_scores, best_rows)


def measure(
    bundle: BundleModel, index: Any, spec: search.IndexSpec, tokens: np.ndarray, queries: TokenQueries, per_word: int,
    params: dict[str, int] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """``--eval``: recall@10 of late interaction against exact search over the whole gallery, both throughputs,
    and how many images were re-scored per query."""
    k = min(EVAL_K, tokens.shape[0])
    started = time.perf_counter()
    _, exact = exact_top_k(bundle, tokens, queries, k)
    exact_seconds = time.perf_counter() - started
    started = time.perf_counter()
    found = candidates(index, spec, queries, tokens.shape[1], per_word, dict(spec.search) if params is None else params)
    _, rows = rescore(bundle, tokens, queries, found, k)
    seconds = time.perf_counter() - started
    return {
        "queries": len(queries),
        "k": k,
        "per_word": per_word,
        "recall_at_10": exact_search.recall_at_k(rows, exact),
        "queries_per_second": len(queries) / max(seconds, 1e-9),
        "exact_queries_per_second": len(queries) / max(exact_seconds, 1e-9),
        "speedup_over_exact": exact_seconds / max(seconds, 1e-9),
        "candidates_per_query": float(np.mean([f.size for f in found])),
        "search_params": dict(spec.search) if params is None else dict(params),
    }


# ---------------------------------------------------------------------------------------------------------
# Building


def build(
    config: IndexConfig, bundle: BundleModel, gallery: Gallery, out: Path, progress: Progress | None = None
) -> BuiltIndex:
    """A token index folder (see the module docstring): every input checked first, then the gallery streamed
    through the image tower (tokens into ``tokens.npy``) and the metric head (into the faiss index), written
    through a staging folder so that a failed or interrupted build leaves nothing at ``out``."""
    if config.embedded:
        raise UserInputError(
            f"{config.bundle}: an interaction bundle indexes regions, so the gallery must be image-encoder inputs "
            f"[N, R, F]; drop --embedded"
        )
    _refuse_refine(config.refine)
    regions = 1 if gallery.rows.ndim == 2 else int(gallery.rows.shape[1])
    overrides = index_folder.index_overrides(config) | search.refine_off(config.kind)
    spec = search.index_spec(config.kind, bundle.dim, gallery.count * regions, overrides)
    per_word = config.per_word or DEFAULT_PER_WORD
    rng = np.random.default_rng(config.seed)
    queries = _eval_queries(config, bundle, gallery, rng) if config.eval else None
    timings: dict[str, float] = {}
    builder = search.IndexBuilder(spec)
    started = time.perf_counter()
    if builder.training_size:
        images = min(gallery.count, -(-builder.training_size // regions))
        sample = np.sort(rng.choice(gallery.count, images, replace=False))
        builder.train(
            np.concatenate([_head_tokens(bundle, gallery, part)[1] for part in _batches(sample, config.batch_size)])
        )
    timings["train_seconds"] = time.perf_counter() - started
    with staged_folder(out, config.force) as staging:
        tokens = np.lib.format.open_memmap(staging / TOKENS_FILE, mode="w+", dtype=np.float32,
                                           shape=(gallery.count, regions, bundle.dim))  # fmt: skip
        embed_seconds = 0.0
        for start in range(0, gallery.count, config.batch_size):
            tick = time.perf_counter()
            unit, transformed = _head_tokens(bundle, gallery, slice(start, start + config.batch_size))
            embed_seconds += time.perf_counter() - tick
            tokens[start : start + len(unit)] = unit
            builder.add(transformed)
            if progress is not None:
                progress(len(unit))
        tokens.flush()
        index = builder.finish()
        timings["build_seconds"] = time.perf_counter() - started
        timings["embed_seconds"] = embed_seconds
        evaluation = None
        if queries is not None:
            evaluation = measure(bundle, index, spec, np.load(staging / TOKENS_FILE, mmap_mode="r"), queries, per_word)
        del tokens
        search.write_index(index, staging / index_folder.INDEX_FILE)
        files = index_folder.write_rows(staging, gallery)
        extra = {"family": "interaction", "regions_per_image": regions, "late_interaction": {"per_word": per_word},
                 "usage": "gssf search --index THIS --text 'a caption' (each word's best regions give candidate "
                 "images, re-scored exactly by the bundle's scorer)"}  # fmt: skip
        manifest = index_folder.index_manifest(
            config, bundle, gallery, spec, staging, out, timings, evaluation, (*files, TOKENS_FILE), extra
        )
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return BuiltIndex(out.expanduser(), manifest)


def _refuse_refine(refine: int | None) -> None:
    if refine is not None:
        raise UserInputError(
            f"--refine {refine} applies to an embedding ivfpq index; a token index re-scores its candidates by late "
            "interaction already"
        )


def _head_tokens(bundle: BundleModel, gallery: Gallery, rows: slice | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gallery rows as ``(unit regions [B, R, D], head(regions) [B·R, D])``; a row that overflows is refused."""
    block = np.asarray(gallery.rows[rows], dtype=np.float32)
    unit = bundle.encode_image_tokens(block)
    transformed = bundle.transform(unit.reshape(-1, unit.shape[-1]))
    if not (np.isfinite(unit).all() and np.isfinite(transformed).all()):
        raise UserInputError(
            f"{gallery.path}: a row becomes NaN or Inf through the bundle (values too large for float32); "
            "scale the gallery"
        )
    return unit, transformed


def _batches(rows: np.ndarray, size: int) -> list[np.ndarray]:
    return [rows[start : start + size] for start in range(0, len(rows), size)]


def _eval_queries(config: IndexConfig, bundle: BundleModel, gallery: Gallery, rng: np.random.Generator) -> TokenQueries:
    """``--eval``'s queries: captions from ``--eval-queries`` (a ``.txt``), else up to ``eval_count`` of the
    gallery's own captions (a dataset split's), picked at random."""
    path = config.eval_queries
    if path is not None:
        if path.suffix.lower() == ".npy":
            raise UserInputError(f"{path}: a token index is searched with captions; give --eval-queries a .txt")
        captions = read_captions(path)[: config.eval_count]
        if not captions:
            raise UserInputError(f"{path}: no queries (one caption per line)")
        return caption_queries(bundle, captions, lambda i: f"{path}: line {i + 1}")
    if gallery.captions is None:
        raise UserInputError(
            f"{gallery.path}: --eval on a token index needs captions to search with: this gallery has none (it is "
            "no dataset split), so give --eval-queries CAPTIONS.txt"
        )
    lines = gallery.captions.lines
    picked = np.sort(rng.choice(len(lines), min(len(lines), config.eval_count), replace=False))
    return caption_queries(bundle, [lines[i] for i in picked], lambda i: f"{gallery.captions.source}: caption {i}")  # type: ignore[union-attr]


# ---------------------------------------------------------------------------------------------------------
# An opened token index


def open_tokens(folder: Path, manifest: dict[str, Any], dim: int) -> np.ndarray:
    """``tokens.npy`` memory-mapped and checked against the manifest: ``[count, regions_per_image, D]`` float32."""
    return index_folder.mapped_array(folder / TOKENS_FILE, (manifest["count"], manifest["regions_per_image"], dim))


def run_search(opened: OpenIndex, config: SearchConfig) -> SearchResult:
    """``gssf search`` over a token index: each caption's ``k`` best images by late interaction (exact scores of
    the re-scored candidates); with ``--eval``, recall@10 against exact search over the whole gallery."""
    if config.vectors is not None:
        raise UserInputError(
            f"{opened.folder}: a token index is searched with captions (--text, --texts): its queries are words, "
            "and --vectors gives pooled vectors"
        )
    _refuse_refine(config.refine)
    tokens = open_tokens(opened.folder, opened.manifest, opened.bundle.dim)
    captions = [config.text] if config.text is not None else read_captions(config.texts)  # type: ignore[arg-type]
    if not captions:
        raise UserInputError(f"{config.texts}: no captions (one query per line)")
    queries = caption_queries(opened.bundle, captions,
                              (lambda i: "--text") if config.text is not None else (lambda i: f"{config.texts}: line {i + 1}"))  # fmt: skip
    params = search.search_overrides(opened.spec, index_folder.index_overrides(config))
    per_word = config.per_word or int(opened.manifest["late_interaction"]["per_word"])
    started = time.perf_counter()
    scores, rows = late_interaction(opened.bundle, opened.index, opened.spec, tokens, queries,
                                    min(config.k, len(opened.ids)), per_word, params)  # fmt: skip
    seconds = time.perf_counter() - started
    evaluation = (
        measure(opened.bundle, opened.index, opened.spec, tokens, queries, per_word, params) if config.eval else None
    )
    return index_folder.search_result(opened, config, captions, scores, rows, {**params, "per_word": per_word},
                                      seconds, evaluation)  # fmt: skip
