"""Speed, memory and recall of ``gssf_cli.deploy.search`` at gallery scale (a measurement script, not a test).

Data (``synthetic_model``, ``gallery_chunk``, ``make_queries``): shaped like retrieval embeddings after a GSSF
metric head. Image embeddings are unit vectors around 4,096 cluster centres that live in a D/4-dimensional
subspace (each latent direction spans one 16-channel block), plus isotropic noise. The gallery is those vectors
through a random GSSF-like head ``W = diag(w) + blockdiag(B_1..B_N)`` (d = 16): ``w`` log-normal with a shared
factor per block (the channels a trained head up- or down-weights), ``B_k`` small, so ``W`` is near a scaled
identity and gallery norms vary (about 0.5 to 1.9, median 1). Queries are held-out paired "captions": the
pre-head embedding of a random gallery item plus noise (cosine ~0.8 to it), L2-normalised, never a gallery row.
Every 65,536-row chunk has its own seed, so any process regenerates the same data.

Measured in one run: the numpy anchor (``exact_search``: chunked GEMM + top-k, and the bare chunked GEMM without
the top-k) in this process, then each index kind in its own fresh subprocess (``--measure KIND``) that reads the
gallery in batches from a temporary file and streams it into ``IndexBuilder`` (build = train + add), writes the
index (its file size is the index's memory), and searches a batch of queries at k = 10 (QPS) and single queries
(p50 latency) at several search-time settings, in a second fresh subprocess (``--search KIND``) that reads the
index back as ``gssf search`` does. Peak RSS is the subprocess's VmHWM (``common.peak_rss_mib``),
reported whole and as the increase over its state after imports. Recall@10 is against ``exact_search``.

A kind that keeps the gallery vectors beside its index (``ivfpq``, for ``refine``) writes them to ``vectors.npy``
by plain writes while adding (as ``gssf index`` streams them) and opens them afresh, memory-mapped, for each
setting; after each setting's searches the resident memory is read as anonymous (the index, the process's own
allocations) and file-backed (the mapped vectors' pages touched, which the kernel may drop and re-read), each as
the increase over the search process's state before it read the index (``common.resident_mib``). They are
cumulative (the allocator keeps what earlier settings freed), so the sweep starts with the stored defaults (``{}``). The file was just written, so
its pages are in the page cache: these are warm-cache figures.

Run from the repository root:  python benchmarks/bench_search.py [--quick] [--count N] [--dim D] [--queries Q]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from common import peak_rss_mib, report, resident_mib

from gssf_cli.deploy import exact_search, search

FULL_COUNT = 1_000_000
QUICK_COUNT = 100_000
K = 10
BLOCK = 16
CENTRES = 4_096
GEN_ROWS = 65_536
SEED = 0
HEAD_SPREAD = 0.9
ITEM_SPREAD = 0.6
AMBIENT_NOISE = 0.3
CAPTION_NOISE = 0.75
LATENCY_QUERIES = 100
SWEEPS: dict[str, list[dict[str, int]]] = {
    "flat": [{}],
    "hnsw": [{"ef_search": ef} for ef in (16, 32, 64, 96, 112, 128, 144, 160, 192, 256)],
    "ivfpq": [
        {},
        *({"nprobe": n, "refine": 0} for n in (16, 32, 64, 128, 256)),
        *({"nprobe": n, "refine": r} for n in (32, 64, 96, 128, 192) for r in (2, 4, 8)),
    ],
}


class Model(NamedTuple):
    basis: np.ndarray  # [D/4, D] latent directions, each inside one 16-channel block
    centres: np.ndarray  # [CENTRES, D/4] unit
    head: np.ndarray  # [D, D] diag + block-diagonal, scaled so that the median gallery norm is 1


def synthetic_model(dim: int, seed: int = SEED) -> Model:
    if dim % BLOCK:
        raise SystemExit(f"--dim must be a multiple of {BLOCK}")
    rng = np.random.default_rng([seed, 0])
    blocks, latent = dim // BLOCK, dim // 4
    basis = np.zeros((latent, dim), np.float32)
    for r in range(latent):
        b = r % blocks
        v = rng.standard_normal(BLOCK)
        basis[r, b * BLOCK : (b + 1) * BLOCK] = v / np.linalg.norm(v)
    centres = rng.standard_normal((CENTRES, latent)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    log_w = np.repeat(HEAD_SPREAD * rng.standard_normal(blocks), BLOCK) + 0.1 * rng.standard_normal(dim)
    head = np.diag(np.exp(log_w)).astype(np.float32)
    for b in range(blocks):
        cut = slice(b * BLOCK, (b + 1) * BLOCK)
        head[cut, cut] += (0.1 / np.sqrt(BLOCK)) * rng.standard_normal((BLOCK, BLOCK)).astype(np.float32)
    model = Model(basis, centres, head)
    sample_norms = np.linalg.norm(image_chunk(model, 0, 8_192, seed=seed + 1) @ head, axis=1)
    return Model(basis, centres, head / np.float32(np.median(sample_norms)))


def image_chunk(model: Model, start: int, stop: int, seed: int = SEED) -> np.ndarray:
    """Pre-head unit image embeddings ``[stop - start, D]``; ``start`` must be a multiple of GEN_ROWS."""
    rng = np.random.default_rng([seed, 1, start])
    latent, dim = model.basis.shape
    labels = rng.integers(CENTRES, size=stop - start)
    z = model.centres[labels] + ITEM_SPREAD / np.sqrt(latent) * rng.standard_normal((stop - start, latent), np.float32)
    x = z @ model.basis + AMBIENT_NOISE / np.sqrt(dim) * rng.standard_normal((stop - start, dim), np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def gallery_chunk(model: Model, start: int, stop: int) -> np.ndarray:
    return image_chunk(model, start, stop) @ model.head


def make_gallery(model: Model, count: int) -> np.ndarray:
    out = np.empty((count, model.head.shape[0]), np.float32)
    for start in range(0, count, GEN_ROWS):
        stop = min(count, start + GEN_ROWS)
        out[start:stop] = gallery_chunk(model, start, stop)
    return out


def make_queries(model: Model, count: int, n: int) -> np.ndarray:
    """``[n, D]`` unit "captions" of random gallery items (pre-head embedding + noise), regenerated by chunk."""
    rng = np.random.default_rng([SEED, 2])
    items = np.sort(rng.choice(count, size=n, replace=False))
    pre_head = np.empty((n, model.head.shape[0]), np.float32)
    for start in range(0, count, GEN_ROWS):
        mine = (items >= start) & (items < start + GEN_ROWS)
        if mine.any():
            pre_head[mine] = image_chunk(model, start, min(count, start + GEN_ROWS))[items[mine] - start]
    noisy = pre_head + CAPTION_NOISE / np.sqrt(pre_head.shape[1]) * rng.standard_normal(pre_head.shape, np.float32)
    return rng.permutation(noisy / np.linalg.norm(noisy, axis=1, keepdims=True)).astype(np.float32)


def read_rows(path: Path, dim: int, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of a raw float32 ``[N, dim]`` file, by plain reads (an mmap would count in RSS)."""
    with path.open("rb") as fh:
        fh.seek(start * dim * 4)
        return np.fromfile(fh, dtype=np.float32, count=(stop - start) * dim).reshape(-1, dim)


# ----------------------------------------------------------------------------------------------------------
# One kind, in a fresh subprocess


def measure_kind(kind: str, work: Path, count: int, dim: int) -> dict[str, Any]:
    baseline = peak_rss_mib()
    gallery_file = work / "gallery.f32"
    spec = search.index_spec(kind, dim, count)
    vectors_file = work / f"{kind}_vectors.npy" if search.INDEX_KINDS[kind].vectors_file else None
    builder = search.IndexBuilder(spec)
    seconds = {"train": 0.0, "add": 0.0}
    if builder.training_size:
        rows = np.sort(np.random.default_rng(3).choice(count, min(count, builder.training_size), replace=False))
        sample = np.concatenate([read_rows(gallery_file, dim, r, r + 1) for r in rows])
        start = time.perf_counter()
        builder.train(sample)
        seconds["train"] = time.perf_counter() - start
        del sample
    written = vectors_file.open("wb") if vectors_file is not None else None
    if written is not None:
        header = {"descr": "<f4", "fortran_order": False, "shape": (count, dim)}
        np.lib.format.write_array_header_1_0(written, header)
    for first in range(0, count, GEN_ROWS):
        batch = read_rows(gallery_file, dim, first, min(count, first + GEN_ROWS))
        start = time.perf_counter()
        builder.add(batch)
        if written is not None:
            written.write(batch.tobytes())
        seconds["add"] += time.perf_counter() - start
    if written is not None:
        written.close()
    index = builder.finish()
    search.write_index(index, work / f"{kind}.faiss")
    index_bytes = os.path.getsize(work / f"{kind}.faiss")
    return {
        "spec": spec.to_json(),
        "train_s": seconds["train"],
        "add_s": seconds["add"],
        "index_mib": index_bytes / 2**20,
        "vectors_mib": os.path.getsize(vectors_file) / 2**20 if vectors_file is not None else 0.0,
        "peak_rss_mib": peak_rss_mib(),
        "baseline_rss_mib": baseline,
    }


def search_kind(kind: str, work: Path, count: int, dim: int) -> dict[str, Any]:
    """The sweep of one kind's search settings in a fresh process that reads the written index back (as ``gssf
    search`` does), so that its resident memory is the search's, not the build's."""
    queries = np.load(work / "queries.npy")
    spec = search.index_spec(kind, dim, count)
    vectors_file = work / f"{kind}_vectors.npy" if search.INDEX_KINDS[kind].vectors_file else None
    resident_before = resident_mib()
    index = search.read_index(work / f"{kind}.faiss", spec, count)
    loaded = resident_mib()
    results = []
    for i, params in enumerate(SWEEPS[kind]):
        chosen = search.search_overrides(spec, params)
        vectors = np.load(vectors_file, mmap_mode="r") if vectors_file is not None else None
        start = time.perf_counter()
        _, rows = search.search(index, spec, queries, K, chosen, vectors)
        batch_s = time.perf_counter() - start
        latencies = []
        for q in queries[:LATENCY_QUERIES]:
            start = time.perf_counter()
            search.search(index, spec, q[None, :], K, chosen, vectors)
            latencies.append(time.perf_counter() - start)
        now = resident_mib()
        del vectors
        np.save(work / f"{kind}_{i}.npy", rows)
        results.append({
            "params": chosen,
            "batch_s": batch_s,
            "p50_ms": 1e3 * statistics.median(latencies),
            "anon_mib": now.get("anon", np.nan) - resident_before.get("anon", np.nan),
            "file_mib": now.get("file", np.nan) - resident_before.get("file", np.nan),
        })  # fmt: skip
    loaded_anon = loaded.get("anon", np.nan) - resident_before.get("anon", np.nan)
    return {"results": results, "loaded_anon_mib": loaded_anon}


def run_kind(kind: str, work: Path, count: int, dim: int) -> dict[str, Any]:
    measured: dict[str, Any] = {}
    for phase in ("--measure", "--search"):
        args = [sys.executable, __file__, phase, kind, "--work", str(work), "--count", str(count), "--dim", str(dim)]
        done = subprocess.run(args, check=True, capture_output=True, text=True)
        measured |= json.loads(done.stdout.strip().splitlines()[-1])
    return measured


# ----------------------------------------------------------------------------------------------------------
# The run


def numpy_anchor(gallery: np.ndarray, queries: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Seconds of the bare chunked GEMM (exact_search's chunks, no top-k) and of ``exact_search``; its rows."""
    rows_per_chunk = exact_search.SCORE_BLOCK_BYTES // (4 * queries.shape[0])
    start = time.perf_counter()
    for first in range(0, gallery.shape[0], rows_per_chunk):
        queries @ gallery[first : first + rows_per_chunk].T
    gemm = time.perf_counter() - start
    start = time.perf_counter()
    _, exact = exact_search.exact_search(gallery, queries, K)
    return gemm, time.perf_counter() - start, exact


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_COUNT:,} gallery vectors, for a fast try")
    parser.add_argument("--count", type=int, help=f"gallery vectors (default {FULL_COUNT:,})")
    parser.add_argument("--dim", type=int, default=256, help="vector width, a multiple of 16 (default 256)")
    parser.add_argument("--queries", type=int, default=1_000, help="queries in the batch (default 1,000)")
    parser.add_argument("--kinds", default=",".join(search.INDEX_KINDS), help="comma-separated kinds to measure")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--search", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    count = args.count or (QUICK_COUNT if args.quick else FULL_COUNT)
    if args.measure:
        print(json.dumps(measure_kind(args.measure, args.work, count, args.dim)))
        return
    if args.search:
        print(json.dumps(search_kind(args.search, args.work, count, args.dim)))
        return

    model = synthetic_model(args.dim)
    start = time.perf_counter()
    gallery = make_gallery(model, count)
    queries = make_queries(model, count, args.queries)
    generation = time.perf_counter() - start
    norms = np.linalg.norm(gallery, axis=1)
    gemm_s, exact_s, exact = numpy_anchor(gallery, queries)
    with tempfile.TemporaryDirectory(prefix="bench_search_") as tmp:
        work = Path(tmp)
        gallery.tofile(work / "gallery.f32")
        np.save(work / "queries.npy", queries)
        del gallery
        measured = {kind: run_kind(kind, work, count, args.dim) for kind in args.kinds.split(",")}
        recalls = {
            (kind, i): exact_search.recall_at_k(np.load(work / f"{kind}_{i}.npy"), exact)
            for kind, m in measured.items()
            for i in range(len(m["results"]))
        }
    rows, notes = table(measured, recalls, gemm_s, exact_s, args.queries)
    shape = f"{count:,} x {args.dim}, {args.queries:,} queries, k = {K}"
    notes = [
        f"{shape}; gallery norms: min {norms.min():.2f}, median {np.median(norms):.2f}, max {norms.max():.2f}; "
        f"data generated in {generation:.1f} s; faiss threads: default (one per core).",
        *notes,
    ]
    report("search" + ("_quick" if count == QUICK_COUNT else ""), rows, notes)


def table(
    measured: dict[str, dict[str, Any]], recalls: dict[tuple[str, int], float], gemm_s: float, exact_s: float, q: int
) -> tuple[list[dict[str, Any]], list[str]]:
    rows: list[dict[str, Any]] = [
        {"case": "numpy GEMM only", "batch s": gemm_s, "QPS": q / gemm_s, "recall@10": 1.0},
        {"case": "numpy exact_search", "batch s": exact_s, "QPS": q / exact_s, "recall@10": 1.0},
    ]
    flat_s = measured["flat"]["results"][0]["batch_s"] if "flat" in measured else float("nan")
    for kind, m in measured.items():
        for i, r in enumerate(m["results"]):
            params = ", ".join(f"{k}={v}" for k, v in r["params"].items())
            rows.append({
                "case": kind,
                "params": params,
                "build s": m["train_s"] + m["add_s"],
                "train s": m["train_s"],
                "index MiB": m["index_mib"],
                "vectors MiB": m["vectors_mib"],
                "RSS anon MiB": r["anon_mib"],
                "RSS file MiB": r["file_mib"],
                "peak RSS MiB": f"{m['peak_rss_mib']:.0f} (+{m['peak_rss_mib'] - m['baseline_rss_mib']:.0f})",
                "batch s": r["batch_s"],
                "QPS": q / r["batch_s"],
                "x flat": flat_s / r["batch_s"],
                "p50 ms": r["p50_ms"],
                "recall@10": recalls[(kind, i)],
            })  # fmt: skip
    notes = [
        f"flat / numpy GEMM time = {flat_s / gemm_s:.2f}x (target <= 1.5); flat / exact_search = {flat_s / exact_s:.2f}x.",
        *(f"{kind} build parameters: {m['spec']['build']}, stored search defaults: {m['spec']['search']}"
          for kind, m in measured.items() if m["spec"]["build"]),
        *(f"{kind}: anonymous RSS with the index just read: +{m['loaded_anon_mib']:.1f} MiB"
          for kind, m in measured.items()),
        "RSS anon / file MiB = resident memory after the setting's searches, anonymous / file-backed (the "
        "memory-mapped vectors' pages touched, warm cache), each the increase over the search subprocess's state "
        "before reading the index, cumulative over the settings in the order listed; "
        "vectors MiB = vectors.npy on disk (ivfpq, read for refine). "
        "build = train + add (reading the gallery file excluded); index MiB = the written file; peak RSS = VmHWM of "
        "the kind's own build subprocess (+ = increase over its start, after imports); "
        f"p50 ms = median of {LATENCY_QUERIES} single-query searches; x flat = flat batch time / this batch time; "
        "numpy exact_search = chunked GEMM + top-k (the anchor and the recall truth), GEMM only = the same chunks "
        "without the top-k.",
    ]  # fmt: skip
    return rows, notes


if __name__ == "__main__":
    main()
