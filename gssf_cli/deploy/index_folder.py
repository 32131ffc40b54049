"""Index folders: a gallery embedded by an exported bundle, as a faiss index that ``gssf search`` queries.

Why: an export turns GSSF into inner-product search (``scores = metric_head(images) @ texts.T``), so a gallery
stored as ``metric_head(image embeddings)`` answers a caption with faiss at vector-database speed, under the
learned structured metric rather than the cosine. Everything here runs on ONNX Runtime, numpy and faiss — never
torch (an import contract and a test hold this), so ``pip install "gssf[search]"`` is enough to search.

An index folder (``indexes/NAME/``)::

    index.faiss     the faiss index (:mod:`gssf_cli.deploy.search`) over metric_head(image embeddings) [N, D]
    vectors.npy     only for ``ivfpq``: those vectors themselves, float32 [N, D], memory-mapped at search time so
                    that ``refine`` re-scores a shortlist exactly while the index in RAM holds only codes
    ids.txt         one id per gallery row, in row order (the row numbers unless ``--ids`` named others)
    captions.txt    only for a gallery that is a dataset's ``{split}_ims.npy``: its images' own captions, the
                    dataset's ``captions_per_image`` lines per row, in row order, which ``gssf search`` shows
                    beside each hit so that a person can judge the hits
    manifest.json   format, kind and parameters, count, D; the bundle it was built from (its digest, the sha256
                    of the bundle's manifest, which checksums every graph; its path relative to this folder);
                    the gallery (path, shape, sha256; its captions' source and count per row); sha256 and size of
                    index.faiss, ids.txt, captions.txt and vectors.npy; build figures
                    and, with ``--eval``, recall@10 against exact search and the query latency

It is written through a staging folder (:func:`gssf_cli.core.files.staged_folder`): a build that fails or is
interrupted leaves nothing at the path, and ``--force`` replaces an existing index only with a complete one.
Every input is checked before anything is written. :func:`open_index` re-checks it all before a search answers:
the manifest, the checksums, the bundle (its gate, its checksums, its graphs load) and that the bundle is the
one the index was built from.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gssf_cli.core.errors import UserInputError
from gssf_cli.core.files import (
    MANIFEST,
    check_float_array,
    check_output_folder,
    file_entry,
    manifest_digest,
    matches_entry,
    open_array,
    sha256_file,
    staged_folder,
)
from gssf_cli.core.stage_configs import IndexConfig, SearchConfig
from gssf_cli.data.text import read_captions
from gssf_cli.deploy import exact_search, search
from gssf_cli.deploy.bundle import BundleModel

INDEX_FORMAT = 1
INDEX_FILE = "index.faiss"
IDS_FILE = "ids.txt"
CAPTIONS_FILE = "captions.txt"
TOKENS_FILE = "tokens.npy"
"""A token index's unit regions ``[N, R, D]`` (:mod:`gssf_cli.deploy.token_index`)."""
VECTORS_FILE = "vectors.npy"
"""The index vectors ``[N, D]`` beside an index that holds only codes (``ivfpq``), read for ``refine``. An ivfpq
folder of an older gssf has none: it opens, and searches with ``refine`` off, as it did."""
EVAL_K = 10
"""``--eval`` measures recall@10: the cut-off retrieval papers and vector-search benchmarks report."""
LATENCY_QUERIES = 200
"""Single queries timed one by one, in this warm process, for ``--eval``'s latency percentiles (p99: the second
slowest of 200)."""
REQUIRED_KEYS = ("index_format", "kind", "spec", "count", "dim", "bundle", "files")

Progress = Callable[[int], None]
"""Called with the number of gallery rows just embedded and added."""


def default_out(bundle: Path) -> Path:
    """``indexes/<bundle folder name>``."""
    return Path("indexes") / bundle.expanduser().resolve().name


def index_overrides(config: IndexConfig | SearchConfig) -> dict[str, int | None]:
    """Every index parameter a config sets, by its :mod:`gssf_cli.deploy.search` name (the config's field name), so that
    :mod:`gssf_cli.deploy.search` refuses one that does not apply to the kind instead of it being silently ignored."""
    names = dict.fromkeys(name for kind in search.INDEX_KINDS.values() for name in kind.params)
    return {name: value for name in names if (value := getattr(config, name, None)) is not None}


# ---------------------------------------------------------------------------------------------------------
# The gallery


@dataclass(frozen=True)
class Gallery:
    """A gallery ``.npy`` opened memory-mapped: ``rows`` ``[N, ...]`` (never loaded whole), its ids, and its
    images' captions when it is a dataset's split (:func:`gallery_captions`)."""

    path: Path
    rows: np.ndarray
    embedded: bool
    ids: list[str] | None
    captions: Captions | None = None

    @property
    def count(self) -> int:
        return int(self.rows.shape[0])


def open_gallery(path: Path, bundle: BundleModel, embedded: bool, ids: Path | None) -> Gallery:
    """The gallery, refused in one line unless its rows fit the bundle: the image encoder's input (``[F]`` or
    ``[R, F]``), or with ``embedded`` the embedding ``[D]``; floating point and finite (scanned in chunks)."""
    rows = open_array(path, "gallery")
    expected: list[Any] = [bundle.dim] if embedded else list(bundle.input_shape(bundle.image_tower))
    what = f"embeddings [N, {bundle.dim}]" if embedded else f"image-encoder inputs [N, {_shape(expected)}]"
    if rows.ndim != 1 + len(expected) or any(
        isinstance(want, int) and got != want for got, want in zip(rows.shape[1:], expected, strict=False)
    ):
        hint = "" if embedded or rows.ndim != 2 or rows.shape[1] != bundle.dim else " (pass --embedded if they are)"
        raise UserInputError(
            f"{path}: gallery of shape {list(rows.shape)}, but the bundle takes {what}; dimension mismatch{hint}"
        )
    check_float_array(rows, str(path), (rows.ndim,))
    count = rows.shape[0]
    return Gallery(
        path, rows, embedded, read_ids(ids, count) if ids is not None else None, gallery_captions(path, count)
    )


@dataclass(frozen=True)
class Captions:
    """A gallery's captions: ``lines`` ``[N * per_row]``, row i's at ``i * per_row`` onwards, read from ``source``."""

    source: Path
    per_row: int
    lines: list[str]


GALLERY_SUFFIX = "_ims.npy"
"""A dataset split's images, ``{split}_ims.npy``, lie beside its captions, ``{split}_caps.txt``."""


def gallery_captions(gallery: Path, count: int) -> Captions | None:
    """The captions of a gallery that is a dataset folder's ``{split}_ims.npy`` (the folder's ``manifest.json``
    a cross-modal gssf dataset listing ``{split}_caps.txt``), else None: a plain array has none.

    Why check them: they are shown as what each hit shows, so a captions file that changed since the dataset was
    prepared (checksum), or that does not hold ``captions_per_image`` lines for each of the ``count`` rows, is
    refused in one line rather than put beside the wrong images.
    """
    folder, name = gallery.parent, gallery.name
    if not name.endswith(GALLERY_SUFFIX) or not (folder / MANIFEST).is_file():
        return None
    try:
        dataset = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    source = folder / f"{name.removesuffix(GALLERY_SUFFIX)}_caps.txt"
    files = dataset.get("files") if isinstance(dataset, dict) else None
    entry = files.get(source.name) if isinstance(files, dict) else None
    per_row = dataset.get("captions_per_image") if isinstance(dataset, dict) else None
    if not isinstance(entry, dict) or type(per_row) is not int or per_row < 1 or dataset.get("task") != "cross_modal":
        return None
    if (
        not source.is_file()
        or source.stat().st_size != entry.get("bytes")
        or sha256_file(source) != entry.get("sha256")
    ):
        raise UserInputError(
            f"{source}: missing or changed since the dataset was prepared (checksum mismatch with "
            f"{folder / MANIFEST}); prepare the dataset again, or index a copy of the gallery outside its folder"
        )
    lines = read_captions(source)
    if len(lines) != count * per_row:
        raise UserInputError(
            f"{source}: {len(lines):,} captions for a gallery of {count:,} rows with {per_row} captions per image "
            f"({count * per_row:,}); prepare the dataset again"
        )
    return Captions(source, per_row, lines)


def _shape(dims: list[Any]) -> str:
    return ", ".join(str(d) if isinstance(d, int) else "R" for d in dims)


def read_ids(path: Path, count: int) -> list[str]:
    """One id per gallery row: UTF-8, ``count`` non-empty lines, no id twice."""
    if not path.is_file():
        raise UserInputError(f"{path}: file not found (--ids)")
    try:
        ids = text_lines(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        raise UserInputError(f"{path}: not UTF-8 text (--ids)") from None
    if len(ids) != count:
        raise UserInputError(f"{path}: {len(ids):,} ids for a gallery of {count:,} rows; give one id per row")
    for line, value in enumerate(ids, start=1):
        if not value.strip():
            raise UserInputError(f"{path}: line {line} is an empty id")
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        twice = next(i for i in ids if i in seen or seen.add(i))  # type: ignore[func-returns-value]
        raise UserInputError(f"{path}: the id {twice!r} appears twice; ids must be unique")
    return ids


def text_lines(text: str) -> list[str]:
    """The lines of an ids file: split at ``\n`` (or ``\r\n``) only — not at the other characters
    ``str.splitlines`` breaks on, which an id may hold — with no empty last line for a final newline."""
    lines = text.replace("\r\n", "\n").split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def embed(bundle: BundleModel, gallery: Gallery, rows: slice | np.ndarray) -> np.ndarray:
    """Gallery rows as index vectors: ``metric_head(image_encoder(rows))`` ``[B, D]`` float32."""
    block = np.asarray(gallery.rows[rows], dtype=np.float32)
    embeddings = block if gallery.embedded else bundle.encode_images(block)
    vectors = bundle.transform(embeddings)
    bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
    if bad.size:
        row = np.arange(gallery.count)[rows][bad[0]]
        raise UserInputError(
            f"{gallery.path}: row {row} becomes NaN or Inf through the bundle (values too large for float32); "
            "scale the gallery"
        )
    return vectors


# ---------------------------------------------------------------------------------------------------------
# Queries


def text_queries(bundle: BundleModel, captions: list[str], where: Callable[[int], str]) -> np.ndarray:
    """Captions → text embeddings ``[Q, D]`` with the bundle's vocabulary and rule; a caption none of whose words
    the vocabulary knows is refused (it would search with ``<unk>`` alone). ``where(i)`` names caption i."""
    check_captions(bundle, captions, where)
    return bundle.encode_texts(captions)


def check_captions(bundle: BundleModel, captions: list[str], where: Callable[[int], str]) -> None:
    """Queries a bundle can encode: it takes captions, and each caption has a word its vocabulary knows."""
    if bundle.vocab is None:
        raise UserInputError(f"{bundle.folder}: this bundle's text side takes vectors, not captions; use --vectors")
    for i, caption in enumerate(captions):
        if not caption.strip():
            raise UserInputError(f"{where(i)}: an empty query")
        if bundle.vocab.known_words(caption) == 0:
            raise UserInputError(
                f"{where(i)}: none of the words of {caption!r} is in the bundle's vocabulary "
                f"({len(bundle.vocab) - 4:,} words); nothing to search with"
            )


def vector_queries(bundle: BundleModel, path: Path, embedded: bool) -> np.ndarray:
    """A ``.npy`` of query vectors → text embeddings ``[Q, D]``: through the text encoder (text-side features
    ``[Q, F]``), or as they are with ``embedded`` (``[Q, D]``)."""
    vectors = open_array(path, "--vectors")
    text_input = bundle.input_shape(bundle.text_tower)
    if not embedded and text_input == "tokens":
        raise UserInputError(
            f"{path}: this bundle's text encoder takes captions (--text, --texts); vectors must be text embeddings "
            f"[Q, {bundle.dim}] given with --embedded"
        )
    width = bundle.dim if embedded else text_input[0]
    if vectors.ndim != 2 or (isinstance(width, int) and vectors.shape[1] != width):
        what = f"text embeddings [Q, {bundle.dim}]" if embedded else f"text-encoder inputs [Q, {width}]"
        raise UserInputError(f"{path}: query vectors of shape {list(vectors.shape)}, but the bundle takes {what}")
    check_float_array(vectors, str(path), (2,))
    block = np.asarray(vectors, dtype=np.float32)
    return block if embedded else bundle.encode_texts(block)


# ---------------------------------------------------------------------------------------------------------
# Building


@dataclass(frozen=True)
class BuiltIndex:
    """What :func:`build` left: the index folder and its manifest."""

    path: Path
    manifest: dict[str, Any]


class ExactTopK:
    """Exact top-k of fixed queries ``[Q, D]`` over a gallery seen batch by batch: the ``--eval`` reference,
    computed while the gallery streams past, so the gallery is embedded once and never held whole."""

    def __init__(self, queries: np.ndarray, k: int) -> None:
        self.queries, self.k = queries, k
        self.scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        self.rows = np.full((len(queries), k), -1, dtype=np.int64)

    def update(self, vectors: np.ndarray, offset: int) -> None:
        scores, rows = exact_search.exact_search(vectors, self.queries, self.k)
        rows = np.where(rows >= 0, rows + offset, -1)
        merged_scores = np.concatenate([self.scores, scores], axis=1)
        merged_rows = np.concatenate([self.rows, rows], axis=1)
        order = np.argsort(-merged_scores, axis=1, kind="stable")[:, : self.k]
        self.scores = np.take_along_axis(merged_scores, order, axis=1)
        self.rows = np.take_along_axis(merged_rows, order, axis=1)


def build_inputs(config: IndexConfig) -> tuple[BundleModel, Gallery, Path]:
    """What every index build checks first, writing nothing: the bundle (verified), the gallery's shape and
    values against it, the ids, and the output folder: ``(bundle, gallery, out)``."""
    assert config.bundle is not None and config.gallery is not None
    bundle = BundleModel.load(config.bundle)
    if config.embedded and bundle.family == "interaction":
        raise UserInputError(
            f"{config.bundle}: an interaction bundle indexes regions, so the gallery must be image-encoder inputs "
            "[N, R, F]; drop --embedded"
        )
    gallery = open_gallery(config.gallery, bundle, config.embedded, config.ids)
    out = config.out if config.out is not None else default_out(config.bundle)
    check_output_folder(out, config.force)
    check_replaceable(out, {"the bundle": config.bundle, "the gallery": config.gallery, "the working folder": Path()})
    return bundle, gallery, out


def build(
    config: IndexConfig, bundle: BundleModel, gallery: Gallery, out: Path, progress: Progress | None = None
) -> BuiltIndex:
    """Embed ``gallery`` with an embedding ``bundle`` in batches and build the faiss index folder at ``out``.

    Checks the rest first (the index parameters, ``--eval-queries``) so that bad input writes nothing; then
    trains the index on a seeded random sample when the kind needs it (one extra pass over those rows), streams
    every row through the bundle into the index (and, with ``--eval``, into the exact reference; for ``ivfpq``,
    into ``vectors.npy``, written memory-mapped in the staging folder so the gallery is never held whole), and
    writes the folder through a staging folder.
    """
    if config.per_word is not None:
        raise UserInputError(
            f"--per-word applies to a token index (an interaction bundle); {config.bundle} is an embedding bundle"
        )
    spec = search.index_spec(config.kind, bundle.dim, gallery.count, index_overrides(config))
    rng = np.random.default_rng(config.seed)
    queries = _eval_queries(config, bundle, gallery, rng) if config.eval else None
    timings: dict[str, float] = {}
    builder = search.IndexBuilder(spec)
    started = time.perf_counter()
    if builder.training_size:
        sample = np.sort(rng.choice(gallery.count, min(gallery.count, builder.training_size), replace=False))
        builder.train(np.concatenate([embed(bundle, gallery, part) for part in _batches(sample, config.batch_size)]))
    timings["train_seconds"] = time.perf_counter() - started
    exact = ExactTopK(queries, EVAL_K) if queries is not None else None
    keeps_vectors = search.INDEX_KINDS[spec.kind].vectors_file
    embed_seconds = 0.0
    with staged_folder(out, config.force) as staging:
        stored = (
            np.lib.format.open_memmap(
                staging / VECTORS_FILE, mode="w+", dtype=np.float32, shape=(gallery.count, spec.dim)
            )
            if keeps_vectors
            else None
        )
        for start in range(0, gallery.count, config.batch_size):
            tick = time.perf_counter()
            vectors = embed(bundle, gallery, slice(start, start + config.batch_size))
            embed_seconds += time.perf_counter() - tick
            builder.add(vectors)
            if stored is not None:
                stored[start : start + len(vectors)] = vectors
            if exact is not None:
                exact.update(vectors, start)
            if progress is not None:
                progress(len(vectors))
        if stored is not None:
            stored.flush()
            del stored
        index = builder.finish()
        timings["build_seconds"] = time.perf_counter() - started
        timings["embed_seconds"] = embed_seconds
        evaluation = None
        if queries is not None and exact is not None:
            opened = np.load(staging / VECTORS_FILE, mmap_mode="r") if keeps_vectors else None
            evaluation = measure(index, spec, queries, exact, opened)
            del opened
        search.write_index(index, staging / INDEX_FILE)
        names = (*write_rows(staging, gallery), *((VECTORS_FILE,) if keeps_vectors else ()))
        manifest = index_manifest(config, bundle, gallery, spec, staging, out, timings, evaluation, names)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return BuiltIndex(out.expanduser(), manifest)


def write_rows(staging: Path, gallery: Gallery) -> tuple[str, ...]:
    """Write what names the gallery's rows — ``ids.txt``, and ``captions.txt`` when it has captions — and return
    the index folder's files so far (the index, the ids, the captions)."""
    ids = gallery.ids if gallery.ids is not None else [str(row) for row in range(gallery.count)]
    (staging / IDS_FILE).write_text("".join(f"{value}\n" for value in ids), encoding="utf-8")
    if gallery.captions is None:
        return (INDEX_FILE, IDS_FILE)
    (staging / CAPTIONS_FILE).write_text("".join(f"{line}\n" for line in gallery.captions.lines), "utf-8")
    return (INDEX_FILE, IDS_FILE, CAPTIONS_FILE)


def check_replaceable(out: Path, inputs: Mapping[str, Path]) -> None:
    """``--out`` must not be, or hold, an input (the bundle, the gallery, the working folder), and ``--force``
    replaces only an index folder (or an empty one): never a folder that holds something else."""
    target = out.expanduser().resolve()
    for what, path in inputs.items():
        if path.expanduser().resolve().is_relative_to(target):
            raise UserInputError(f"--out {out} is or holds {what} ({path}); choose another --out")
    if target.is_dir() and any(target.iterdir()) and not _is_index_folder(target):
        raise UserInputError(f"--out {out} is a folder that is not a gssf index; --force replaces only an index")


def _is_index_folder(folder: Path) -> bool:
    try:
        return json.loads((folder / MANIFEST).read_text()).get("index_format") is not None
    except (OSError, ValueError, AttributeError):
        return False


def _batches(rows: np.ndarray, size: int) -> list[np.ndarray]:
    return [rows[start : start + size] for start in range(0, len(rows), size)]


def _eval_queries(config: IndexConfig, bundle: BundleModel, gallery: Gallery, rng: np.random.Generator) -> np.ndarray:
    """``--eval``'s queries ``[Q, D]``: ``--eval-queries`` (captions in a ``.txt``, or a ``.npy`` of vectors: text
    features when the text encoder takes features, text embeddings when it takes captions), else the embeddings
    of up to ``eval_count`` random gallery rows (before the metric head: where text embeddings live)."""
    path = config.eval_queries
    if path is None:
        rows = np.sort(rng.choice(gallery.count, min(gallery.count, config.eval_count), replace=False))
        block = np.asarray(gallery.rows[rows], dtype=np.float32)
        embeddings = block if gallery.embedded else bundle.encode_images(block)
        return embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    if path.suffix.lower() == ".npy":
        queries = vector_queries(bundle, path, embedded=bundle.input_shape(bundle.text_tower) == "tokens")
    else:
        captions = read_captions(path)[: config.eval_count]
        if not captions:
            raise UserInputError(f"{path}: no queries (one caption per line)")
        queries = text_queries(bundle, captions, lambda i: f"{path}: line {i + 1}")
    return queries[: config.eval_count]


def measure(
    index: Any, spec: search.IndexSpec, queries: np.ndarray, exact: ExactTopK, vectors: np.ndarray | None = None
) -> dict[str, Any]:
    """``--eval``: recall@10 of the index against exact search, batch throughput and single-query latency, at the
    spec's search defaults (``vectors`` ``[N, D]``: what ``refine`` re-scores from)."""
    started = time.perf_counter()
    _, found = search.search(index, spec, queries, EVAL_K, vectors=vectors)
    batch_seconds = time.perf_counter() - started
    latencies = []
    for query in queries[:LATENCY_QUERIES]:
        tick = time.perf_counter()
        search.search(index, spec, query[None, :], EVAL_K, vectors=vectors)
        latencies.append(time.perf_counter() - tick)
    milliseconds = 1000 * np.asarray(latencies)
    return {
        "queries": len(queries),
        "k": EVAL_K,
        "recall_at_10": exact_search.recall_at_k(found, exact.rows),
        "queries_per_second": len(queries) / max(batch_seconds, 1e-9),
        "latency_ms_p50": float(np.percentile(milliseconds, 50)),
        "latency_ms_p95": float(np.percentile(milliseconds, 95)),
        "latency_ms_p99": float(np.percentile(milliseconds, 99)),
        "search_params": dict(spec.search),
    }


def index_manifest(
    config: IndexConfig,
    bundle: BundleModel,
    gallery: Gallery,
    spec: search.IndexSpec,
    staging: Path,
    out: Path,
    timings: dict[str, float],
    evaluation: dict[str, Any] | None,
    names: tuple[str, ...],
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """An index folder's manifest: ``names`` are its files in ``staging`` (checksummed here), ``extra`` what a
    kind of index adds (a token index: its family, regions per image, late-interaction defaults and usage)."""
    from gssf_cli import __version__

    files = {name: file_entry(staging / name) for name in names}
    captions = gallery.captions
    return {
        "index_format": INDEX_FORMAT,
        "kind": spec.kind,
        "spec": spec.to_json(),
        "count": gallery.count,
        "dim": bundle.dim,
        "bundle": {
            "path": _relative(bundle.folder, out),
            "digest": bundle.digest,
            "source_run_id": bundle.manifest.get("source_run_id"),
            "task": bundle.task,
        },
        "gallery": {
            "path": str(gallery.path),
            "shape": list(gallery.rows.shape),
            "sha256": sha256_file(gallery.path),
            "embedded": gallery.embedded,
            "ids": str(config.ids) if config.ids is not None else None,
            "captions": {"source": str(captions.source), "per_row": captions.per_row} if captions else None,
        },
        "files": files,
        "build": {
            **{key: round(value, 6) for key, value in timings.items()},
            "vectors_per_second": gallery.count / max(timings["build_seconds"], 1e-9),
            "batch_size": config.batch_size,
            "seed": config.seed,
        },
        "eval": evaluation,
        "versions": {"gssf": __version__, "faiss": search.faiss_version()},
        "usage": "gssf search --index THIS --text 'a caption' (scores = metric_head(image) · text embedding)",
        **(extra or {}),
    }


def _relative(bundle: Path, out: Path) -> str:
    """The bundle's path as seen from the index folder (so moving both together keeps the link)."""
    target, base = bundle.expanduser().resolve(), out.expanduser().resolve()
    try:
        return os.path.relpath(target, base)
    except ValueError:
        return str(target)


# ---------------------------------------------------------------------------------------------------------
# Searching


@dataclass
class OpenIndex:
    """A verified index folder with its bundle, ready to answer queries."""

    folder: Path
    manifest: dict[str, Any]
    spec: search.IndexSpec
    bundle: BundleModel
    index: Any
    ids: list[str]
    captions_per_row: int | None = None
    vectors: np.ndarray | None = None
    """``vectors.npy`` memory-mapped ``[count, D]`` float32 where the folder has it (ivfpq), else None."""


def read_manifest(folder: Path) -> dict[str, Any]:
    """An index folder's manifest, checked for shape; one line naming the folder if it is not an index."""
    path = folder / MANIFEST
    if not folder.is_dir():
        raise UserInputError(f"{folder}: no such index folder (build one with gssf index)")
    if not path.is_file() or path.is_symlink():
        raise UserInputError(f"{folder}: no manifest.json, not a gssf index folder (build one with gssf index)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise UserInputError(f"{path}: unreadable index manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("index_format") != INDEX_FORMAT:
        found = manifest.get("index_format") if isinstance(manifest, dict) else None
        raise UserInputError(f"{path}: index format {found!r}, this gssf reads format {INDEX_FORMAT}; rebuild it")
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        raise UserInputError(f"{path}: incomplete index manifest (no {', '.join(missing)}); rebuild it")
    files, bundle = manifest["files"], manifest["bundle"]
    token_index = manifest.get("family", "embedding") == "interaction"
    kind = search.INDEX_KINDS.get(manifest["kind"]) if isinstance(manifest["kind"], str) else None
    optional = {CAPTIONS_FILE, *((VECTORS_FILE,) if kind is not None and kind.vectors_file and not token_index else ())}
    if token_index and not (
        type(manifest.get("regions_per_image")) is int
        and manifest["regions_per_image"] >= 1
        and isinstance(manifest.get("late_interaction"), dict)
        and type(manifest["late_interaction"].get("per_word")) is int
    ):
        raise UserInputError(
            f"{path}: malformed token index manifest (regions_per_image, late_interaction); rebuild it"
        )
    if not (
        isinstance(files, dict)
        and set(files) - optional == {INDEX_FILE, IDS_FILE, *((TOKENS_FILE,) if token_index else ())}
        and all(isinstance(f, dict) and isinstance(f.get("sha256"), str) and type(f.get("bytes")) is int
                for f in files.values())
        and isinstance(bundle, dict)
        and isinstance(bundle.get("digest"), str)
        and isinstance(bundle.get("path"), str)
        and type(manifest["count"]) is int
    ):  # fmt: skip
        raise UserInputError(f"{path}: malformed index manifest (files, bundle or count); rebuild it")
    if (CAPTIONS_FILE in files) != (captions_per_row(manifest) is not None):
        raise UserInputError(f"{path}: malformed index manifest (captions.txt without its count per row); rebuild it")
    return manifest


def captions_per_row(manifest: Mapping[str, Any]) -> int | None:
    """How many captions each gallery row has in ``captions.txt``: the gallery's ``captions.per_row``, or None."""
    gallery = manifest.get("gallery")
    captions = gallery.get("captions") if isinstance(gallery, dict) else None
    per_row = captions.get("per_row") if isinstance(captions, dict) else None
    return per_row if type(per_row) is int and per_row >= 1 else None


def row_captions(path: Path, rows: Iterable[int], per_row: int) -> dict[int, list[str]]:
    """The captions of gallery ``rows`` from an index's ``captions.txt`` (``per_row`` lines per row, split at
    ``\n`` only, as :func:`build` wrote them), read in one pass that keeps only theirs: a gallery of millions of
    rows has millions of captions, a search needs ``k`` rows' worth per query."""
    wanted = set(rows)
    found: dict[int, list[str]] = {row: [] for row in wanted}
    last = max(wanted, default=-1)
    with path.open(encoding="utf-8", newline="\n") as lines:
        for number, line in enumerate(lines):
            row = number // per_row
            if row > last:
                break
            if row in wanted:
                found[row].append(line.removesuffix("\n"))
    return found


def open_index(folder: Path, bundle_path: Path | None = None) -> OpenIndex:
    """Open an index folder for search after checking it: the manifest, the checksums of the index and the ids,
    the bundle (``bundle_path``, else the one the manifest names; verified as ``gssf export --check`` does, but
    with ONNX Runtime alone) and that it is the very bundle the index was built from (same digest)."""
    manifest = read_manifest(folder)
    for name, entry in manifest["files"].items():
        path = folder / name
        if path.is_symlink() or not path.is_file():
            raise UserInputError(f"{path}: missing from the index folder; rebuild it")
        if not matches_entry(path, entry):
            raise UserInputError(f"{path}: checksum mismatch with manifest.json (file changed or truncated); rebuild")
    recorded = manifest["bundle"]
    where = bundle_path if bundle_path is not None else recorded_bundle(folder, manifest)
    if not where.is_dir():
        raise UserInputError(f"{where}: the bundle index {folder} was built from is not there; pass it with --bundle")
    _check_family(folder, manifest, where)
    digest = manifest_digest(where) if (where / "manifest.json").is_file() else None
    if digest is not None and digest != recorded["digest"]:
        raise UserInputError(
            f"{where}: not the bundle index {folder} was built from (bundle digest {digest[:12]}, the index "
            f"needs {recorded['digest'][:12]}); pass that bundle with --bundle, or rebuild the index"
        )
    bundle = BundleModel.load(where)
    spec = search.IndexSpec.from_json(manifest["spec"])
    if (spec.kind, spec.dim) != (manifest["kind"], manifest["dim"]):
        raise UserInputError(f"{folder / MANIFEST}: kind and dim disagree with the index spec; rebuild it")
    if spec.dim != bundle.dim:
        raise UserInputError(f"{folder}: an index of dimension {spec.dim} for a bundle of dimension {bundle.dim}")
    vectors = open_vectors(folder, manifest["count"], spec.dim) if VECTORS_FILE in manifest["files"] else None
    if vectors is None and spec.search.get("refine", search.REFINE_OFF) != search.REFINE_OFF:
        raise UserInputError(f"{folder / MANIFEST}: refine is on, but the folder lists no {VECTORS_FILE}; rebuild it")
    index = search.read_index(folder / INDEX_FILE, spec, manifest["count"] * manifest.get("regions_per_image", 1))
    try:
        ids = text_lines((folder / IDS_FILE).read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserInputError(f"{folder / IDS_FILE}: not UTF-8 text; rebuild the index") from None
    if len(ids) != manifest["count"]:
        raise UserInputError(f"{folder / IDS_FILE}: {len(ids):,} ids for an index of {manifest['count']:,} vectors")
    return OpenIndex(folder, manifest, spec, bundle, index, ids, captions_per_row(manifest), vectors)


def open_vectors(folder: Path, count: int, dim: int) -> np.ndarray:
    """``vectors.npy`` memory-mapped ``[count, D]`` float32 (only the rows a ``refine`` shortlists are ever read)."""
    return mapped_array(folder / VECTORS_FILE, (count, dim))


def mapped_array(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A float32 ``.npy`` of an index folder, memory-mapped (never unpickled) and checked against the ``shape`` its
    manifest states; one line naming the file otherwise."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UserInputError(f"{path}: unreadable ({exc}); rebuild the index") from None
    if array.shape != shape or array.dtype != np.float32:
        raise UserInputError(
            f"{path}: holds {array.dtype} {list(array.shape)}, the manifest says float32 {list(shape)}; rebuild the index"
        )
    return array


def recorded_bundle(folder: Path, manifest: Mapping[str, Any]) -> Path:
    """The bundle an index folder's manifest names (its path is relative to the folder, or absolute)."""
    return Path(os.path.normpath(folder / manifest["bundle"]["path"]))


def _check_family(folder: Path, manifest: Mapping[str, Any], bundle: Path) -> None:
    """The bundle is of the index's family: a token index holds an interaction bundle's regions, an embedding
    index an embedding bundle's pooled vectors; searching one with the other's bundle is refused by name."""
    try:
        found = json.loads((bundle / MANIFEST).read_text()).get("family", "embedding")
    except (OSError, ValueError, AttributeError):
        return  # not a bundle: BundleModel.load says so in its own words
    wanted = manifest.get("family", "embedding")
    if found != wanted:
        holds = "token sets of an interaction bundle" if wanted == "interaction" else "pooled embeddings"
        raise UserInputError(
            f"{bundle}: an {found} bundle, and index {folder} holds {holds}; pass the {wanted} bundle it was built "
            "from with --bundle, or build an index from this one"
        )


def queries_of(opened: OpenIndex, config: SearchConfig) -> tuple[list[str], np.ndarray]:
    """The config's queries as (labels shown in the results, text embeddings ``[Q, D]``)."""
    bundle = opened.bundle
    if config.text is not None:
        return [config.text], text_queries(bundle, [config.text], lambda i: "--text")
    if config.texts is not None:
        captions = read_captions(config.texts)
        if not captions:
            raise UserInputError(f"{config.texts}: no captions (one query per line)")
        return captions, text_queries(bundle, captions, lambda i: f"{config.texts}: line {i + 1}")
    assert config.vectors is not None
    vectors = vector_queries(bundle, config.vectors, config.embedded)
    return [f"{config.vectors.name}[{row}]" for row in range(len(vectors))], vectors


@dataclass(frozen=True)
class SearchResult:
    index: str
    kind: str
    k: int
    params: dict[str, int]
    seconds: float
    queries: list[dict[str, Any]]
    eval: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "kind": self.kind, "k": self.k, "params": self.params,
                "seconds": self.seconds, "queries": self.queries} | ({"eval": self.eval} if self.eval else {})  # fmt: skip


def run_search(opened: OpenIndex, config: SearchConfig) -> SearchResult:
    """Answer ``config``'s queries from an embedding index: per query, the ``k`` best gallery rows (rank, id, row,
    score = the learned GSSF score, and the row's own captions when the index has them), best first; fewer than
    ``k`` when the gallery is smaller."""
    if config.eval or config.per_word is not None:
        flag = "--eval" if config.eval else "--per-word"
        raise UserInputError(
            f"{flag} applies to a token index (built from an interaction bundle); {config.index} is an embedding "
            "index, whose recall gssf index --eval measures"
        )
    params = search.search_overrides(opened.spec, index_overrides(config))
    if params.get("refine", search.REFINE_OFF) != search.REFINE_OFF and opened.vectors is None:
        raise UserInputError(
            f"--refine {params['refine']}: {opened.folder} was built before gssf kept the vectors that refine "
            "re-scores from; rebuild it with gssf index (or search with --refine 0)"
        )
    labels, vectors = queries_of(opened, config)
    started = time.perf_counter()
    k = min(config.k, len(opened.ids))
    scores, rows = search.search(opened.index, opened.spec, vectors, k, params, opened.vectors)
    return search_result(opened, config, labels, scores, rows, params, time.perf_counter() - started)


def search_result(
    opened: OpenIndex,
    config: SearchConfig,
    labels: list[str],
    scores: np.ndarray,
    rows: np.ndarray,
    params: dict[str, int],
    seconds: float,
    evaluation: dict[str, Any] | None = None,
) -> SearchResult:
    """Each query's hits ``rows [Q, k]`` / ``scores [Q, k]`` (row -1: none) as the result, with the rows' ids and
    their own captions when the index has them."""
    per_row = opened.captions_per_row
    captions = row_captions(opened.folder / CAPTIONS_FILE, rows[rows >= 0].tolist(), per_row) if per_row else {}
    results = [
        {
            "query": label,
            "results": [
                {"rank": rank, "id": opened.ids[row], "row": int(row), "score": float(score)}
                | ({"captions": captions[int(row)]} if per_row else {})
                for rank, (row, score) in enumerate(zip(row_list, score_list, strict=True), start=1)
                if row >= 0
            ],
        }
        for label, row_list, score_list in zip(labels, rows, scores, strict=True)
    ]
    return SearchResult(str(config.index), opened.spec.kind, config.k, params, round(seconds, 6), results, evaluation)


def manifest_metrics(manifest: Mapping[str, Any]) -> dict[str, float]:
    """The build (and ``--eval``) figures of a manifest as flat metrics for MLflow."""
    metrics = {key: float(value) for key, value in manifest["build"].items() if key != "seed"}
    metrics |= {"count": float(manifest["count"]), "index_bytes": float(manifest["files"][INDEX_FILE]["bytes"])}
    if VECTORS_FILE in manifest["files"]:
        metrics["vectors_bytes"] = float(manifest["files"][VECTORS_FILE]["bytes"])
    for key, value in (manifest.get("eval") or {}).items():
        if isinstance(value, (int, float)):
            metrics[f"eval_{key}"] = float(value)
    return metrics
