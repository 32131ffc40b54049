"""gssf's index kinds next to the ANN libraries a user would pick instead, on the same vectors in the same run.

The anchors are **hnswlib** and **usearch** (the ``bench`` extra). Everything runs on the gallery and queries of
``bench_search.py`` (head-transformed, clustered, norms that vary: inner-product search as a GSSF index is), with
the same thread count for every library (``--threads``, default one per core) and the same truth (numpy's exact
top-10). Each library builds and searches in a fresh subprocess, so its peak RSS (VmHWM, over the process's state
after imports) is its own.

- gssf: ``hnsw`` and ``ivfpq`` with their defaults (``bench_search.measure_kind`` / ``search_kind``, the search
  sweep of ``bench_search.SWEEPS``);
- hnswlib and usearch: inner-product space, the graph of gssf's hnsw defaults (M = 32, ef_construction = 128),
  built with every thread, swept over ef; and hnswlib in L2 space over gssf's own MIPS-to-L2 reduction of the same
  vectors (``hnswlib-mips-l2``: a graph library against a graph library, the reduction aside).

Reported per library: build seconds, peak RSS, and the best QPS (1,000 queries at once, k = 10) among its settings
whose recall@10 reaches 0.90 / 0.95 / 0.99 ("–": none measured did). Ratios are to hnswlib's over the reduction
(:data:`ANCHOR`), in this run.

Run from the repository root:  python benchmarks/bench_ann_anchors.py [--quick] [--count N] [--threads T]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import bench_search
from common import peak_rss_mib, report

from gssf_cli.deploy import exact_search, search

TARGETS = (0.90, 0.95, 0.99)
GRAPH_M, EF_CONSTRUCTION = 32, 128
EF_SWEEP = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512)
GSSF_KINDS = ("hnsw", "ivfpq")
ANCHOR = "hnswlib-mips-l2"
"""The ratios' anchor: hnswlib at its best on these vectors. In its own inner-product space its recall@10 stays
near 0.8 on vectors whose norms vary (measured: 0.81 at ef 512, 100,000 x 256), so it reaches no target."""


def _gallery(work: Path, count: int, dim: int) -> np.ndarray:
    return np.fromfile(work / "gallery.f32", dtype=np.float32).reshape(count, dim)


def _sweep(search_fn: Any, queries: np.ndarray, exact: np.ndarray, settings: list[Any]) -> list[dict[str, Any]]:
    results = []
    for setting in settings:
        started = time.perf_counter()
        rows = search_fn(setting, queries)
        seconds = time.perf_counter() - started
        results.append({"setting": setting, "qps": len(queries) / seconds,
                        "recall": exact_search.recall_at_k(rows, exact)})  # fmt: skip
    return results


def measure_hnswlib(work: Path, count: int, dim: int, threads: int, reduced: bool = False) -> dict[str, Any]:
    """hnswlib in its inner-product space, or (``reduced``) in L2 over gssf's MIPS-to-L2 reduction of the same
    vectors (``search._augment_gallery``): the second isolates the graph library from the reduction gssf adds."""
    import hnswlib

    baseline = peak_rss_mib()
    gallery = _gallery(work, count, dim)
    queries, exact = np.load(work / "queries.npy"), np.load(work / "exact.npy")
    started = time.perf_counter()
    if reduced:
        bound = search.NORM_MARGIN * float(np.sqrt(np.einsum("ij,ij->i", gallery, gallery).max()))
        gallery, queries = search._augment_gallery(gallery, bound), search._augment_queries(queries)
    index = hnswlib.Index(space="l2" if reduced else "ip", dim=gallery.shape[1])
    index.init_index(max_elements=count, M=GRAPH_M, ef_construction=EF_CONSTRUCTION, random_seed=0)
    index.set_num_threads(threads)
    index.add_items(gallery, np.arange(count))
    build = time.perf_counter() - started
    del gallery

    def run(ef: int, batch: np.ndarray) -> np.ndarray:
        index.set_ef(max(ef, bench_search.K))
        rows, _ = index.knn_query(batch, k=bench_search.K, num_threads=threads)
        return rows.astype(np.int64)

    results = _sweep(run, queries, exact, list(EF_SWEEP))
    return {"build_s": build, "peak_rss_mib": peak_rss_mib() - baseline, "results": results}


def measure_usearch(work: Path, count: int, dim: int, threads: int) -> dict[str, Any]:
    from usearch.index import Index

    baseline = peak_rss_mib()
    gallery = _gallery(work, count, dim)
    queries, exact = np.load(work / "queries.npy"), np.load(work / "exact.npy")
    started = time.perf_counter()
    index = Index(ndim=dim, metric="ip", dtype="f32", connectivity=GRAPH_M, expansion_add=EF_CONSTRUCTION)
    index.add(np.arange(count), gallery, threads=threads)
    build = time.perf_counter() - started
    del gallery

    def run(ef: int, batch: np.ndarray) -> np.ndarray:
        index.expansion_search = max(ef, bench_search.K)
        return np.asarray(index.search(batch, bench_search.K, threads=threads).keys, dtype=np.int64)

    results = _sweep(run, queries, exact, list(EF_SWEEP))
    return {"build_s": build, "peak_rss_mib": peak_rss_mib() - baseline, "results": results}


def measure_gssf(kind: str, work: Path, count: int, dim: int, threads: int) -> dict[str, Any]:
    search.set_threads(threads)
    built = bench_search.measure_kind(kind, work, count, dim)
    searched = bench_search.search_kind(kind, work, count, dim)
    exact = np.load(work / "exact.npy")
    queries = len(np.load(work / "queries.npy"))
    results = [
        {"setting": r["params"], "qps": queries / r["batch_s"],
         "recall": exact_search.recall_at_k(np.load(work / f"{kind}_{i}.npy"), exact)}
        for i, r in enumerate(searched["results"])
    ]  # fmt: skip
    return {"build_s": built["train_s"] + built["add_s"], "peak_rss_mib": built["peak_rss_mib"] -
            built["baseline_rss_mib"], "results": results}  # fmt: skip


MEASURES = {
    "hnswlib": measure_hnswlib,
    "hnswlib-mips-l2": lambda work, count, dim, threads: measure_hnswlib(work, count, dim, threads, reduced=True),
    "usearch": measure_usearch,
}


def run_library(name: str, work: Path, count: int, dim: int, threads: int) -> dict[str, Any]:
    args = [sys.executable, __file__, "--measure", name, "--work", str(work), "--count", str(count), "--dim",
            str(dim), "--threads", str(threads)]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def best_qps(results: list[dict[str, Any]], target: float) -> float | None:
    reaching = [r["qps"] for r in results if r["recall"] >= target]
    return max(reaching) if reaching else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"{bench_search.QUICK_COUNT:,} gallery vectors")
    parser.add_argument("--count", type=int)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=1_000)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    count = args.count or (bench_search.QUICK_COUNT if args.quick else bench_search.FULL_COUNT)
    if args.measure:
        if args.measure in MEASURES:
            measured = MEASURES[args.measure](args.work, count, args.dim, args.threads)
        else:
            measured = measure_gssf(args.measure.removeprefix("gssf-"), args.work, count, args.dim, args.threads)
        print(json.dumps(measured))
        return

    model = bench_search.synthetic_model(args.dim)
    gallery = bench_search.make_gallery(model, count)
    queries = bench_search.make_queries(model, count, args.queries)
    _, exact = exact_search.exact_search(gallery, queries, bench_search.K)
    with tempfile.TemporaryDirectory(prefix="bench_ann_") as tmp:
        work = Path(tmp)
        gallery.tofile(work / "gallery.f32")
        np.save(work / "queries.npy", queries)
        np.save(work / "exact.npy", exact)
        del gallery
        names = [*MEASURES, *(f"gssf-{kind}" for kind in GSSF_KINDS)]
        measured = {name: run_library(name, work, count, args.dim, args.threads) for name in names}
    anchor = measured[ANCHOR]
    rows = []
    for name, m in measured.items():
        row: dict[str, Any] = {"library": name, "build s": m["build_s"],
                               "× anchor build": m["build_s"] / anchor["build_s"], "peak RSS MiB": m["peak_rss_mib"]}  # fmt: skip
        for target in TARGETS:
            qps, theirs = best_qps(m["results"], target), best_qps(anchor["results"], target)
            row[f"QPS @{target:.2f}"] = "–" if qps is None else f"{qps:,.0f}"
            row[f"× anchor @{target:.2f}"] = "–" if qps is None or theirs is None else f"{qps / theirs:.2f}"
        rows.append(row)
    sweeps = [f"{name}: " + "; ".join(f"{r['setting']} {r['recall']:.3f}/{r['qps']:,.0f}" for r in m["results"])
              for name, m in measured.items()]  # fmt: skip
    report("ann_anchors" + ("_quick" if count == bench_search.QUICK_COUNT else ""), rows, [
        f"{count:,} x {args.dim}, {args.queries:,} queries at once, k = {bench_search.K}, {args.threads} threads for "
        f"every library; anchor = {ANCHOR}; "
        f"graphs M = {GRAPH_M}, ef_construction = {EF_CONSTRUCTION}; peak RSS over each process's "
        "start; QPS @r = the best QPS among the settings that reached recall@10 >= r.",
        "sweeps (setting recall/QPS): " + " | ".join(sweeps),
    ])  # fmt: skip


if __name__ == "__main__":
    main()
