"""Maximum-inner-product search over a GSSF gallery with faiss: the only module in the package that imports faiss.

Why inner product: a bundle scores ``metric_head(images) @ texts.T``, so the gallery vectors are the metric head's
outputs ``[N, D]`` (not unit norm; their norms vary) and a query is an L2-normalised text embedding ``[D]``. The
best gallery rows for a query are those with the largest ``gallery_row · query``, whatever the index kind, and
:func:`search` returns that score (exactly for ``flat`` and ``hnsw``, and for ``ivfpq`` with ``refine`` on, which
re-scores a shortlist from the gallery vectors memory-mapped; from the compressed codes for ``ivfpq`` with it off).
``hnsw`` searches the standard MIPS-to-L2 reduction of the gallery (:func:`_augment_gallery`): a graph over raw
inner products with varying norms reached far lower recall.

faiss is imported inside the functions, so ``import gssf_cli.deploy.search`` (and ``gssf --help``) costs numpy only.
The index kinds live in :data:`INDEX_KINDS`; each names its build-time and search-time parameters, and
:func:`index_spec` picks defaults for a gallery of a given size and dimension. The defaults were chosen from
``benchmarks/bench_search.py`` (clustered, head-transformed vectors, 1,000,000 x 256 and 100,000 x 256); see each
``_*_defaults``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np

from gssf_cli.core.cores import free_cores
from gssf_cli.core.errors import UserInputError
from gssf_cli.deploy.exact_search import sorted_best, top_k

POINTS_PER_CENTROID: Final = 39
"""faiss's k-means wants at least this many training points per centroid (it warns below), so an IVF list count
or a PQ codebook size is capped at ``count // 39`` for a gallery of ``count`` vectors."""
TRAINING_POINTS_PER_CENTROID: Final = 40
"""How many training vectors :class:`IndexBuilder` asks for per IVF list: just above faiss's minimum, far below
its subsampling cap of 256, so that the caller embeds a small sample and k-means stays short."""
PQ_POINTS_PER_CENTROID: Final = 64
"""Cap on the sample each PQ sub-quantizer's k-means sees (faiss's default 256 gives 65,536 points x pq_m
k-means runs on 4-dim vectors: 29 s for a 30,000-vector gallery on 2 cores, most of the ivfpq build)."""
MIN_NPROBE: Final = 8
"""At least this many IVF lists are probed by default: on a small gallery one list may hold fewer than k rows."""
NPROBE_PER_ROOT: Final = 4
"""Default nprobe = 4·sqrt(nlist) (see :func:`_ivfpq_defaults` for the measurement): the lists a query must visit
to reach recall@10 0.95 after refine grew like sqrt(nlist), not like nlist (about 128 lists at both 100,000 and
1,000,000 vectors, of 1,265 and 4,000)."""
REFINE_OFF: Final = 0
"""``refine`` = 0: ``ivfpq`` answers from its codes alone (its scores carry the quantisation error). What an index
written before ``refine`` existed searches with, and what a token index stores (it re-scores by late interaction)."""
DEFAULT_REFINE: Final = 4
"""Default ``refine`` of ``ivfpq`` (see :func:`_ivfpq_defaults` for the measurement)."""


@dataclass(frozen=True)
class IndexKind:
    """One index kind as ``--kind`` offers it: what it is, whether it is exact, and which parameters it takes."""

    description: str
    exact: bool
    build_params: tuple[str, ...]
    search_params: tuple[str, ...]
    defaults: Callable[[int, int], dict[str, int]] = field(repr=False)
    """``(dim, count) -> {name: value}`` for every build and search parameter."""
    make: Callable[[IndexSpec], Any] = field(repr=False)
    """The empty faiss index for a spec."""
    faiss_class: str = ""
    """The class ``faiss.read_index`` returns for this kind, checked when an index is read back."""
    mips_to_l2: bool = False
    """Store ``[x, sqrt(M² - |x|²)]`` and search with ``[q, 0]`` under L2 (see :func:`_augment_gallery`)."""
    vectors_file: bool = False
    """The index holds no full vectors, so an index folder keeps the gallery vectors ``[N, D]`` beside it for the
    exact re-scoring of ``refine`` (see :func:`_refine`)."""
    legacy_search: Mapping[str, int] = field(default_factory=dict)
    """Search parameters a manifest of an older gssf lacks, with the value that searches as that gssf did."""

    @property
    def params(self) -> tuple[str, ...]:
        return self.build_params + self.search_params


@dataclass(frozen=True)
class IndexSpec:
    """What an index folder records about its faiss index, so that it can be rebuilt, checked and searched.

    ``build`` holds the build-time parameters (hnsw: ``m``, ``ef_construction``; ivfpq: ``nlist``, ``pq_m``,
    ``pq_bits``; flat: none), ``search`` the default search-time ones (hnsw: ``ef_search``; ivfpq: ``nprobe``,
    ``refine``).
    """

    kind: str
    dim: int
    build: dict[str, int] = field(default_factory=dict)
    search: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "dim": self.dim, "build": dict(self.build), "search": dict(self.search)}

    @classmethod
    def from_json(cls, data: Any) -> IndexSpec:
        """The spec a manifest recorded; a one-line :class:`UserInputError` if it is not one this version wrote.

        A spec of an older gssf that lacks a search parameter added since gets the value that keeps its behaviour
        (:attr:`IndexKind.legacy_search`: an ``ivfpq`` spec without ``refine`` searches with it off).
        """
        if not isinstance(data, Mapping):
            raise UserInputError(f"index spec: expected an object, got {type(data).__name__}")
        kind = _kind(data.get("kind"), "index spec: kind")
        dim = data.get("dim")
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise UserInputError(f"index spec: dim must be a positive integer, got {dim!r}")
        build = _int_params(data.get("build", {}), INDEX_KINDS[kind].build_params, "index spec: build")
        stored = data.get("search", {})
        if isinstance(stored, Mapping):
            stored = {**INDEX_KINDS[kind].legacy_search, **stored}
        search = _int_params(stored, INDEX_KINDS[kind].search_params, "index spec: search")
        for name, value in {**build, **search}.items():
            _check_param(kind, name, value, dim)
        return cls(kind, dim, build, search)


# ----------------------------------------------------------------------------------------------------------
# Parameters: defaults and validation


def _flat_defaults(dim: int, count: int) -> dict[str, int]:
    return {}


def _hnsw_defaults(dim: int, count: int) -> dict[str, int]:
    """hnsw_m = 32, ef_construction = 128, ef_search = 112.

    Measured by ``benchmarks/bench_search.py`` at 1,000,000 x 256 on 2 cores (1,000 held-out queries, k = 10;
    flat 259 QPS): build 537 s, index 1,240 MiB; recall@10 / QPS / x flat by ef_search: 64: 0.918 / 4,499 /
    17.4; 96: 0.949 / 3,029 / 11.7; 112: 0.958 / 2,863 / 11.1; 128: 0.966 / 2,486 / 9.6; 160: 0.976 / 2,232 /
    8.6; 256: 0.992 / 1,513 / 5.8. 112 is the smallest measured setting at recall >= 0.95.
    The previous defaults (ef_construction 40, all ef_search candidates re-scored) built in 164 s but needed
    ef_search 160 for 0.956 at 7.6x flat. How these were chosen: at 200,000 x 256 the frontier (QPS at recall
    0.95) hardly moved with ef_construction 40 / 80 / 160, and hnsw_m 48 and 64 gave 10-20% fewer QPS at equal
    recall, so hnsw_m stays 32; at 1,000,000 the graph's quality counts (ef_construction 80 lifted recall at
    ef_search 128 from 0.942 to 0.953). Re-scoring only ``RERANK_FACTOR * k`` candidates
    (:func:`_search_reduced`) gave 1.2-1.3x the QPS at the same recall. Smaller galleries need less: at 200,000,
    ef_search 64 already reaches 0.95; 1,000 vectors build in well under a second.
    """
    return {"hnsw_m": 32, "ef_construction": 128, "ef_search": 112}


def _ivfpq_defaults(dim: int, count: int) -> dict[str, int]:
    """nlist ~ 4·sqrt(count), capped so that every list gets 39 training points; pq_m for ~4 dims per
    sub-quantizer (64 bytes per vector at D = 256); 8-bit codes where the gallery can train 256 centroids;
    nprobe = 4·sqrt(nlist) (at least 8); refine = 4 (the best 4·k candidates by code re-scored exactly).

    Measured by ``benchmarks/bench_ann_anchors.py`` on 2 quiet cores (Intel Xeon; 1,000 held-out queries,
    k = 10, 64-byte codes), recall@10 / QPS. At 100,000 x 256 (nlist 1,265), refine 0 by nprobe: 64: 0.793 /
    13,358; 128: 0.822 / 7,394; 256: 0.835 / 4,089 -- the codes cap it; refine 4 by nprobe: 64: 0.899 / 9,848;
    96: 0.939 / 8,074; 128: 0.959 / 7,131; 192: 0.978 / 4,938. At 1,000,000 x 256 (nlist 4,000; build 81 s,
    peak RSS 372 MiB against hnsw's 1,378), refine 0: 128: 0.735 / 3,263; 256: 0.743 / 1,744; refine 4: 64:
    0.904 / 5,433; 128: 0.944 / 3,201; 192: 0.960 / 2,160; 400: 0.973 / 1,115; refine 8: 128: 0.958 / 3,034.
    Refine lifts the cap and costs little; then the lists probed limit recall, and reaching 0.95 took about 128
    to 192 lists at both sizes -- hence nprobe ~ 4·sqrt(nlist) (143 and 253), not a share of nlist (nlist / 10
    gave 400 at 1M: 0.973 at half the QPS). Memory, from ``bench_search.py --quick`` (100,000, shared cores): the
    search process's anonymous memory +24.7 MiB, 24% of flat's +103.7 MiB; the vectors.npy pages the shortlists
    touched (+98 MiB, the whole file after 1,000 queries) are page cache the kernel may drop and re-read (cold:
    refine·k reads of 4·D bytes a query).
    """
    nlist = max(1, min(round(4 * math.sqrt(count)), count // POINTS_PER_CENTROID))
    pq_bits = max(1, min(8, int(math.log2(max(count // POINTS_PER_CENTROID, 2)))))
    return {
        "nlist": nlist,
        "pq_m": _pq_m_for(dim),
        "pq_bits": pq_bits,
        "nprobe": default_nprobe(nlist),
        "refine": DEFAULT_REFINE,
    }


def default_nprobe(nlist: int) -> int:
    """nprobe = 4·sqrt(nlist), at least 8 (and at most nlist): read from the index's own nlist, given or not."""
    return min(nlist, max(MIN_NPROBE, math.ceil(NPROBE_PER_ROOT * math.sqrt(nlist))))


def _pq_m_for(dim: int, dims_per_code: int = 4) -> int:
    """The divisor of ``dim`` whose sub-vector width ``dim / pq_m`` is closest to ``dims_per_code`` (narrower
    wins a tie: more sub-quantizers, better recall)."""
    divisors = [m for m in range(1, dim + 1) if dim % m == 0]
    return min(divisors, key=lambda m: (abs(dim // m - dims_per_code), dim // m))


_RULES: Final[dict[str, tuple[int, int]]] = {
    "hnsw_m": (2, 256),
    "ef_construction": (1, 4096),
    "ef_search": (1, 65536),
    "nlist": (1, 1 << 20),
    "pq_m": (1, 4096),
    "pq_bits": (1, 12),
    "nprobe": (1, 1 << 20),
    "refine": (0, 1024),
}
"""Inclusive ranges for every parameter; cross-checks against dim and count are in :func:`_check_param`."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_param(kind: str, name: str, value: int, dim: int, count: int | None = None) -> None:
    low, high = _RULES[name]
    if not _is_int(value) or not low <= value <= high:
        raise UserInputError(f"{_flag(name)} {value} is out of range for --kind {kind}; use {low}..{high:,}")
    if name == "pq_m" and dim % value:
        raise UserInputError(f"--pq-m {value} does not divide the dimension {dim}; use one of {_divisors(dim)}")
    most_lists = max(1, (count or 0) // POINTS_PER_CENTROID)
    if count is not None and name == "nlist" and value > most_lists:
        raise UserInputError(
            f"--nlist {value:,} is larger than the gallery ({count:,} vectors); use at most {most_lists:,}"
        )
    if count is not None and name == "pq_bits" and 2**value > max(count, 2):
        most = int(math.log2(max(count, 2)))
        raise UserInputError(
            f"--pq-bits {value} needs {2**value:,} training vectors, more than the gallery ({count:,}); "
            f"use at most {most}"
        )


def _divisors(dim: int) -> str:
    return ", ".join(str(m) for m in range(1, dim + 1) if dim % m == 0)


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _kind(kind: object, what: str) -> str:
    if not isinstance(kind, str) or kind not in INDEX_KINDS:
        raise UserInputError(f"{what} {kind!r} is not an index kind; use one of {', '.join(INDEX_KINDS)}")
    return kind


def _int_params(data: object, names: tuple[str, ...], what: str) -> dict[str, int]:
    if not isinstance(data, Mapping) or set(data) != set(names):
        raise UserInputError(f"{what}: expected the parameters {list(names)}, got {data!r}")
    return {name: int(data[name]) if _is_int(data[name]) else data[name] for name in names}


def _apply_overrides(
    kind: str, names: tuple[str, ...], values: dict[str, int], overrides: Mapping[str, int | None]
) -> dict[str, int]:
    given = {name: value for name, value in overrides.items() if value is not None}
    unknown = sorted(set(given) - set(INDEX_KINDS[kind].params))
    if unknown:
        takes = ", ".join(_flag(n) for n in INDEX_KINDS[kind].params) or "no parameters"
        raise UserInputError(f"{_flag(unknown[0])} does not apply to --kind {kind}; it takes {takes}")
    return {name: given.get(name, values[name]) for name in names}


def index_spec(kind: str, dim: int, count: int, overrides: Mapping[str, int | None] | None = None) -> IndexSpec:
    """The spec for indexing ``count`` vectors of width ``dim``: defaults for this size, then ``overrides``
    (``None`` = keep the default), each checked; a one-line :class:`UserInputError` names the flag."""
    kind = _kind(kind, "--kind")
    if not _is_int(dim) or dim < 1:
        raise UserInputError(f"the gallery dimension must be positive, got {dim}")
    if not _is_int(count) or count < 1:
        raise UserInputError("the gallery is empty: there is nothing to index")
    spec_kind = INDEX_KINDS[kind]
    defaults = spec_kind.defaults(dim, count)
    build = _apply_overrides(kind, spec_kind.build_params, defaults, overrides or {})
    if "nprobe" in defaults and build.get("nlist") != defaults.get("nlist"):
        defaults["nprobe"] = default_nprobe(build["nlist"])  # the rule follows an --nlist given
    search = _apply_overrides(kind, spec_kind.search_params, defaults, overrides or {})
    for name, value in {**build, **search}.items():
        _check_param(kind, name, value, dim, count)
    return IndexSpec(kind, dim, build, search)


def refine_off(kind: str) -> dict[str, int]:
    """The override that turns ``refine`` off for ``kind`` (none for a kind without it): for an index that keeps no
    vectors to re-score from (a token index)."""
    return {"refine": REFINE_OFF} if kind in INDEX_KINDS and "refine" in INDEX_KINDS[kind].search_params else {}


def search_overrides(spec: IndexSpec, overrides: Mapping[str, int | None]) -> dict[str, int]:
    """The search-time parameters for one query run: the spec's stored defaults, replaced by those given.

    Build-time names are refused (changing them needs a new index), as are names of another kind.
    """
    given = {name: value for name, value in overrides.items() if value is not None}
    build_only = sorted(set(given) & set(INDEX_KINDS[spec.kind].build_params))
    if build_only:
        raise UserInputError(
            f"{_flag(build_only[0])} is fixed when the index is built; rebuild the index with `gssf index` to change it"
        )
    params = _apply_overrides(spec.kind, INDEX_KINDS[spec.kind].search_params, spec.search, given)
    for name, value in params.items():
        _check_param(spec.kind, name, value, spec.dim)
    return params


# ----------------------------------------------------------------------------------------------------------
# faiss indexes


@functools.cache
def _faiss() -> Any:
    """faiss, imported on first use (its import costs ~0.3 s and loads OpenMP), its OpenMP team as large as the
    cores no other process is busy on (:func:`~gssf_cli.core.cores.free_cores`; :func:`set_threads` sets it after);
    typed Any: its stubs lag the API."""
    import faiss

    faiss.omp_set_num_threads(free_cores())
    return faiss


def _make_flat(spec: IndexSpec) -> Any:
    faiss = _faiss()
    return faiss.IndexFlatIP(spec.dim)


def _make_hnsw(spec: IndexSpec) -> Any:
    faiss = _faiss()
    index = faiss.IndexHNSWFlat(spec.dim + 1, spec.build["hnsw_m"], faiss.METRIC_L2)
    index.hnsw.efConstruction = spec.build["ef_construction"]
    index.hnsw.efSearch = spec.search["ef_search"]
    return index


def _make_ivfpq(spec: IndexSpec) -> Any:
    faiss = _faiss()
    quantizer = faiss.IndexFlatIP(spec.dim)
    b = spec.build
    index = faiss.IndexIVFPQ(quantizer, spec.dim, b["nlist"], b["pq_m"], b["pq_bits"], faiss.METRIC_INNER_PRODUCT)
    index.own_fields = True
    quantizer.this.disown()
    index.pq.cp.max_points_per_centroid = PQ_POINTS_PER_CENTROID
    index.nprobe = spec.search["nprobe"]
    return index


def _search_parameters(spec: IndexSpec, params: Mapping[str, int]) -> Any:
    faiss = _faiss()
    if spec.kind == "hnsw":
        return faiss.SearchParametersHNSW(efSearch=params["ef_search"])
    if spec.kind == "ivfpq":
        return faiss.SearchParametersIVF(nprobe=params["nprobe"])
    return None


INDEX_KINDS: Final[dict[str, IndexKind]] = {
    "flat": IndexKind(
        "exact: every query scored against every gallery vector (one GEMM); memory 4·D bytes per vector",
        exact=True,
        build_params=(),
        search_params=(),
        defaults=_flat_defaults,
        make=_make_flat,
        faiss_class="IndexFlatIP",
    ),
    "hnsw": IndexKind(
        "approximate, fast: a navigable graph over the full vectors; memory 4·(D+1) + 8·m bytes per vector",
        exact=False,
        build_params=("hnsw_m", "ef_construction"),
        search_params=("ef_search",),
        defaults=_hnsw_defaults,
        make=_make_hnsw,
        faiss_class="IndexHNSWFlat",
        mips_to_l2=True,
    ),
    "ivfpq": IndexKind(
        "approximate, memory-lean: inverted lists of product-quantised codes, a shortlist re-scored exactly from "
        "the vectors memory-mapped; memory pq_m bytes per vector (+ 4·D on disk)",
        exact=False,
        build_params=("nlist", "pq_m", "pq_bits"),
        search_params=("nprobe", "refine"),
        defaults=_ivfpq_defaults,
        make=_make_ivfpq,
        faiss_class="IndexIVFPQ",
        vectors_file=True,
        legacy_search={"refine": REFINE_OFF},
    ),
}


class IndexBuilder:
    """Streams vectors into a faiss index: train (when the kind needs it) then add batch by batch.

    Why streaming: the caller embeds the gallery in batches and should never hold all of it at once; the index
    itself is then the only gallery-sized allocation. "Training" is k-means for ``ivfpq`` and, for ``hnsw``, the
    estimate of the largest gallery norm that the inner-product-to-L2 reduction needs (:func:`_augment_gallery`).
    """

    def __init__(self, spec: IndexSpec) -> None:
        self.spec = spec
        self._kind = INDEX_KINDS[spec.kind]
        self._index = self._kind.make(spec)
        self._max_norm = 0.0
        self.training_size: int = _training_size(spec)
        """How many sample vectors :meth:`train` wants (0 = no training); pass fewer if the gallery is smaller."""
        self._trained = self.training_size == 0

    def train(self, vectors: np.ndarray) -> None:
        """Train on a random sample ``[T, D]`` of the gallery (a no-op for kinds that need no training)."""
        if self.training_size == 0:
            return
        sample = _as_rows(vectors, self.spec.dim, "training vectors")
        least = _least_training_size(self.spec)
        if sample.shape[0] < least:
            raise UserInputError(
                f"--kind {self.spec.kind} needs at least {least:,} training vectors, got {sample.shape[0]:,}; "
                "lower --nlist or --pq-bits"
            )
        if self._kind.mips_to_l2:
            self._max_norm = NORM_MARGIN * float(np.sqrt(np.einsum("ij,ij->i", sample, sample).max()))
        else:
            self._index.train(sample)
        self._trained = True

    def add(self, vectors: np.ndarray) -> None:
        """Append a batch ``[B, D]``; rows are numbered in the order added, from 0."""
        batch = _as_rows(vectors, self.spec.dim, "gallery vectors")
        if not self._trained:
            raise RuntimeError(f"IndexBuilder.add before train: --kind {self.spec.kind} needs train() first")
        if self._kind.mips_to_l2:
            batch = _augment_gallery(batch, self._max_norm)
        self._index.add(batch)

    def finish(self) -> Any:
        """The faiss index, holding every vector added (``ntotal``)."""
        return self._index


NORM_MARGIN: Final = 1.1
"""The reduction's bound ``M`` is this times the largest norm in the training sample: a vector above ``M`` (the
sample missed the gallery's very largest) still works, with its extra coordinate clamped to 0 (see
:func:`_augment_gallery`)."""
NORM_SAMPLE: Final = 10_000
"""Sample size for the largest-norm estimate of ``hnsw``."""
RESCORE_BYTES: Final = 8 << 20
"""Bytes of candidate vectors gathered at a time when results are re-scored exactly (``hnsw``; ``ivfpq`` with
``refine``): bounds the ``[Q, C, D]`` gather whatever the batch of queries. With 32 MiB gathers the benchmark's
ivfpq search process kept 55 MiB of anonymous memory (the allocator keeps blocks that large), half of flat's."""
RERANK_FACTOR: Final = 2
"""``hnsw`` re-scores the graph's best ``RERANK_FACTOR * k`` candidates by the true inner product (see
:func:`_search_reduced`)."""


def _training_size(spec: IndexSpec) -> int:
    if INDEX_KINDS[spec.kind].mips_to_l2:
        return NORM_SAMPLE
    if spec.kind != "ivfpq":
        return 0
    return TRAINING_POINTS_PER_CENTROID * max(spec.build["nlist"], 2 ** spec.build["pq_bits"])


def _least_training_size(spec: IndexSpec) -> int:
    if spec.kind != "ivfpq":
        return 1
    return max(spec.build["nlist"], 2 ** spec.build["pq_bits"])


def _as_rows(vectors: np.ndarray, dim: int, what: str) -> np.ndarray:
    """``vectors`` as a C-contiguous float32 ``[N, dim]`` array (faiss's input); a one-line error otherwise."""
    array = np.asarray(vectors)
    if array.ndim != 2 or array.shape[1] != dim:
        raise UserInputError(f"{what} have shape {list(array.shape)}; the index expects [N, {dim}]")
    return np.ascontiguousarray(array, dtype=np.float32)


def _augment_gallery(vectors: np.ndarray, max_norm: float) -> np.ndarray:
    """``[B, D] -> [B, D+1]``: append ``sqrt(M² - |x|²)`` so that every row has norm ``M``.

    Why: HNSW's graph is built for a metric; under inner product with varying norms it reached recall@10 0.82
    at ef_search 64 on the benchmark data (200,000 x 256) where this reduction reached 0.97. With queries
    ``[q, 0]``, ``|x' - q'|² = M² + |q|² - 2 x·q``, so L2 order is inner-product order. A row above ``M`` gets 0
    (its L2 distance then overstates by ``|x|² - M²``); :func:`search` re-scores candidates by the true product.
    """
    squared = np.einsum("ij,ij->i", vectors, vectors)
    extra = np.sqrt(np.maximum(max_norm * max_norm - squared, 0.0)).astype(np.float32)
    return np.hstack([vectors, extra[:, None]])


def _augment_queries(queries: np.ndarray) -> np.ndarray:
    return np.hstack([queries, np.zeros((queries.shape[0], 1), dtype=np.float32)])


def _stored_vectors(index: Any) -> np.ndarray:
    """The HNSW index's stored rows ``[ntotal, D+1]`` as a zero-copy numpy view."""
    faiss = _faiss()
    storage = faiss.downcast_index(index.storage)
    return faiss.rev_swig_ptr(storage.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)


def write_index(index: Any, path: Path) -> None:
    """Write ``index`` to exactly ``path`` (the caller writes to a temporary name and renames)."""
    _faiss().write_index(index, str(path))


def read_index(path: Path, spec: IndexSpec, count: int) -> Any:
    """The index at ``path``, checked against what the manifest says: kind, dimension and vector count."""
    faiss = _faiss()
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise UserInputError(f"cannot read the faiss index {path}: {reason}") from None
    kind = INDEX_KINDS[spec.kind]
    if type(index).__name__ != kind.faiss_class:
        raise UserInputError(f"{path} holds a {type(index).__name__}, but the manifest says --kind {spec.kind}")
    stored_dim = index.d - 1 if kind.mips_to_l2 else index.d
    if stored_dim != spec.dim:
        raise UserInputError(f"{path} holds {stored_dim}-dimensional vectors, but the manifest says {spec.dim}")
    if index.ntotal != count:
        raise UserInputError(f"{path} holds {index.ntotal:,} vectors, but the manifest lists {count:,}")
    return index


def search(
    index: Any,
    spec: IndexSpec,
    queries: np.ndarray,
    k: int,
    params: Mapping[str, int] | None = None,
    vectors: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best gallery rows for each query ``[Q, D]``: ``(scores [Q, k] float32, rows [Q, k] int64)``,
    best first, with ``scores = gallery[rows] · query``.

    ``params`` are the search-time parameters (:func:`search_overrides`); ``None`` uses the spec's. ``vectors`` are
    the gallery vectors ``[N, D]`` float32 (memory-mapped: only the shortlisted rows are read), which ``ivfpq``
    needs when ``refine`` is on. Where fewer than ``k`` rows exist (``k > ntotal``, or an approximate kind that
    reached fewer), the missing places hold row ``-1`` and score ``-inf``. ``flat`` and ``hnsw`` give the inner
    product exactly (``hnsw`` re-scores its best ``RERANK_FACTOR * k`` graph candidates from the stored vectors),
    and so does ``ivfpq`` with ``refine`` on (its best ``refine * k`` candidates by code, re-scored from
    ``vectors``); with ``refine`` 0 ``ivfpq`` computes the score from the compressed codes, so it carries the
    quantisation error.
    """
    if not _is_int(k) or k < 1:
        raise UserInputError(f"--k must be at least 1, got {k}")
    batch = _as_rows(queries, spec.dim, "queries")
    if batch.shape[0] == 0:
        raise UserInputError("there are no queries to search for")
    chosen = dict(spec.search) if params is None else dict(params)
    if INDEX_KINDS[spec.kind].mips_to_l2:
        return _search_reduced(index, batch, int(k), chosen["ef_search"])
    refine = chosen.get("refine", REFINE_OFF)
    if refine != REFINE_OFF:
        return _refine(index, spec, batch, int(k), chosen, _checked_vectors(vectors, index, spec, refine))
    scores, rows = index.search(batch, int(k), params=_search_parameters(spec, chosen))
    scores = scores.astype(np.float32, copy=False)
    scores[rows < 0] = -np.inf
    return scores, rows.astype(np.int64, copy=False)


def _checked_vectors(vectors: np.ndarray | None, index: Any, spec: IndexSpec, refine: int) -> np.ndarray:
    if vectors is None:
        raise UserInputError(
            f"--refine {refine} re-scores from the gallery's stored vectors, and this index has none; rebuild it with "
            "gssf index (or search with --refine 0)"
        )
    if vectors.shape != (index.ntotal, spec.dim) or vectors.dtype != np.float32:
        raise UserInputError(
            f"the stored vectors are {vectors.dtype} {list(vectors.shape)}, the index holds float32 "
            f"[{index.ntotal}, {spec.dim}]; rebuild it"
        )
    return vectors


def _refine(
    index: Any, spec: IndexSpec, queries: np.ndarray, k: int, params: Mapping[str, int], vectors: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``ivfpq`` with ``refine``: its best ``refine * k`` candidates by code, re-scored by the true inner product
    from ``vectors`` ``[N, D]``, best ``k`` kept.

    Why: the codes, not the lists, cap ivfpq's recall (see :func:`_ivfpq_defaults`), yet the true neighbours are
    nearly always among the code's best few ``k``; reading those rows (``refine * k * 4·D`` bytes per query, from
    the page cache) restores the order while the index in memory stays ``pq_m`` bytes per vector.
    """
    _, candidates = index.search(queries, params["refine"] * k, params=_search_parameters(spec, params))
    return _rescore(vectors, queries, candidates, k)


def _search_reduced(index: Any, queries: np.ndarray, k: int, ef_search: int) -> tuple[np.ndarray, np.ndarray]:
    """HNSW over the L2-reduced vectors: the graph's best ``RERANK_FACTOR * k`` candidates (searched at depth
    ``max(ef_search, that)``), re-scored by the true inner product, best ``k`` kept.

    The reduction keeps inner-product order exactly for every row within the norm bound, so the graph's own top
    ``k`` is already the answer; the re-scoring gives exact scores and lets a row above the bound (ranked too low
    by its clamped distance) move up from the next ``k``. Re-scoring all ``ef_search`` candidates gave the same
    recall and cost ~30% of the search at ef_search 160 (a ``[Q, 160, D]`` gather).
    """
    depth = RERANK_FACTOR * k
    parameters = _faiss().SearchParametersHNSW(efSearch=max(ef_search, depth))
    _, candidates = index.search(_augment_queries(queries), depth, params=parameters)
    return _rescore(_stored_vectors(index)[:, : queries.shape[1]], queries, candidates, k)


def _rescore(vectors: np.ndarray, queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Candidates ``[Q, C]`` (row -1: none) re-scored as ``vectors[row] · query`` (``vectors`` ``[N, D]``, queries
    ``[Q, D]``): the best ``k`` ``(scores [Q, k], rows [Q, k])``, gathered ``RESCORE_BYTES`` at a time."""
    scores = np.empty((queries.shape[0], k), dtype=np.float32)
    rows = np.empty((queries.shape[0], k), dtype=np.int64)
    step = max(1, RESCORE_BYTES // (4 * queries.shape[1] * max(1, candidates.shape[1])))
    for start in range(0, queries.shape[0], step):
        part = slice(start, start + step)
        found = candidates[part].astype(np.int64, copy=False)
        exact = np.einsum("qcd,qd->qc", vectors[np.maximum(found, 0)], queries[part])
        exact[found < 0] = -np.inf
        scores[part], rows[part] = sorted_best(*top_k(exact, found, k))
    return scores, rows


def set_threads(count: int | None) -> None:
    """Set faiss's OpenMP threads (``None`` leaves gssf's default: the cores no other process is busy on)."""
    if count is None:
        return
    if not _is_int(count) or count < 1:
        raise UserInputError(f"--threads must be at least 1, got {count}")
    faiss = _faiss()
    faiss.omp_set_num_threads(int(count))


def faiss_version() -> str:
    """The faiss version, for an index folder's manifest."""
    return str(_faiss().__version__)
