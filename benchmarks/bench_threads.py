"""Threads that hold up when cores are shared: training steps (at two sizes), cross-modal evaluation and faiss
search at 1, 2, "auto" (the library's default: one per core) and "free" (gssf's default: the cores no other
process is busy on) threads, with OpenMP's default (spinning) and passive wait policy, on a quiet machine and
while a competing CPU load runs.

Why: with torch's default thread count a training epoch collapsed ~30x on a busy machine — torch's
OpenMP workers wait at every barrier, and a worker whose core is taken by another process stalls all the
others for a time slice; at small sizes, where a step is milliseconds, that is most of the step. Each configuration runs in a fresh interpreter (``--measure``): OpenMP reads ``OMP_WAIT_POLICY`` once,
when torch loads it. The competing load is one busy-loop process per core, started here and stopped by pid.

Run from the repository root:  python benchmarks/bench_threads.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from common import competing_load, report

THREADS = ("1", "2", "auto", "free")
"""torch threads: a count, torch's own default (one per core), or gssf's default (the cores no other process is busy
on, :func:`gssf_cli.core.cores.free_cores`, read when the measured process starts)."""
TRAIN_SIZES = {"train": (1024, 128, 36, 2048, 12), "train-small": (64, 64, 8, 32, 12)}
"""(D, batch, regions, region dim, words): the README's default sizes, and the quickstart's (where a step is
milliseconds, so a thread that waits a time slice for its core costs the most)."""
STEPS = {"train": 10, "train-small": 100}
"""Steps timed per configuration (a few seconds quiet at each size; a fifth of them with ``--quick``)."""
POLICIES: dict[str, dict[str, str]] = {
    "default": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "spin 10k": {"GOMP_SPINCOUNT": "10000"},
}
"""OpenMP waiting: spin (libgomp's default: 300,000 spins before sleeping), sleep at once, or spin briefly."""
OMP_KEYS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def measure(kind: str, threads: str, quick: bool) -> dict[str, float]:
    """In this (fresh) process: seconds per training step, or per cross-modal evaluation, median of repeats."""
    import torch

    if threads == "free":
        from gssf_cli.core.cores import free_cores

        torch.set_num_threads(free_cores())
    elif threads != "auto":
        torch.set_num_threads(int(threads))
    if kind in TRAIN_SIZES:
        from bench_train import _setup

        sizes = (256, 32, 12, 256, 12) if quick and kind == "train" else TRAIN_SIZES[kind]
        step = _setup("gssf", min(64, sizes[0] // 4) if not quick else 16, *sizes)
        step()
        times = []
        for _ in range(STEPS[kind] // (5 if quick else 1)):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        mean = statistics.fmean(times)  # what the user waits for: a step stalled for a time slice counts
        return {"seconds": mean, "median_seconds": statistics.median(times), "samples_per_s": sizes[1] / mean}
    if kind.startswith("search"):
        return measure_search(kind, threads, quick)
    from gssf_cli.evaluation.crossmodal import evaluate_cross_modal

    n, d = (1_000, 256) if quick else (5_000, 1024)
    gen = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1)
    texts = torch.nn.functional.normalize(torch.randn(5 * n, d, generator=gen), dim=1)
    times, gemm = [], []
    for _ in range(3):
        start = time.perf_counter()
        evaluate_cross_modal(images, texts, captions_per_image=5)
        times.append(time.perf_counter() - start)
        start = time.perf_counter()
        images @ texts.T
        gemm.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "gemm_seconds": statistics.median(gemm)}


SEARCH_SIZES = {"search flat": (200_000, 256, 1_000), "search hnsw": (100_000, 256, 1)}
"""(gallery rows, D, queries per call): a flat scan of batched queries (faiss's BLAS path) and one query at a time
through an hnsw graph (faiss's OpenMP over the query, as ``gssf search --text`` and a served model run it)."""


def measure_search(kind: str, threads: str, quick: bool) -> dict[str, float]:
    """In this (fresh) process: queries per second of gssf's faiss search at ``threads`` (``free``: gssf's default,
    set when faiss is first used; ``auto``: faiss's own, one per core)."""
    import numpy as np

    from gssf_cli.deploy import search

    faiss = search._faiss()
    if threads == "auto":
        faiss.omp_set_num_threads(os.cpu_count() or 1)
    elif threads != "free":
        search.set_threads(int(threads))
    rows, dim, batch = SEARCH_SIZES[kind]
    rows //= 10 if quick else 1
    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((rows, dim), dtype=np.float32)
    queries = rng.standard_normal((1_000, dim), dtype=np.float32)
    spec = search.index_spec(kind.split()[1], dim, rows)
    builder = search.IndexBuilder(spec)
    if builder.training_size:
        builder.train(gallery[: builder.training_size])
    builder.add(gallery)
    index = builder.finish()
    calls = range(0, len(queries) // (5 if quick else 1), batch)
    search.search(index, spec, queries[:batch], 10)
    start = time.perf_counter()
    for first in calls:
        search.search(index, spec, queries[first : first + batch], 10)
    seconds = time.perf_counter() - start
    return {"seconds": seconds / len(calls), "queries_per_s": len(calls) * batch / seconds}


def run_one(kind: str, threads: str, policy: str, quick: bool) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k not in OMP_KEYS} | POLICIES[policy]
    args = [sys.executable, __file__, "--measure", kind, threads] + (["--quick"] if quick else [])
    done = subprocess.run(args, env=env, capture_output=True, text=True, check=True, timeout=1800)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    parser.add_argument("--measure", nargs=2, metavar=("KIND", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], args.measure[1], args.quick)))
        return
    cores = os.cpu_count() or 1
    rows: list[dict[str, Any]] = []
    for loaded in (False, True):
        for kind in (*TRAIN_SIZES, "evaluate", *SEARCH_SIZES):
            for policy in POLICIES if not kind.startswith("search") else ("default",):
                for threads in THREADS:
                    if loaded:
                        with competing_load(cores):
                            result = run_one(kind, threads, policy, args.quick)
                    else:
                        result = run_one(kind, threads, policy, args.quick)
                    row: dict[str, Any] = {"machine": "loaded" if loaded else "quiet", "work": kind,
                                           "OpenMP wait": policy, "threads": threads, **result}  # fmt: skip
                    if "gemm_seconds" in result:
                        row["x GEMM"] = result["seconds"] / result["gemm_seconds"]
                    rows.append(row)
    for row in rows:
        same = [r for r in rows if r["machine"] == row["machine"] and r["work"] == row["work"]]
        best = min(r["seconds"] for r in same)
        row["x best here"] = row["seconds"] / best
    notes = [
        f"loaded: {cores} busy-loop processes (one per core) run beside the measured process; each "
        "configuration in a fresh interpreter; medians of repeated steps/evaluations.",
        "train: one GSSF (d=64) step at the README's sizes (D=1024, B=128, 36x2048 regions); train-small: one "
        "GSSF (d=16) step at the quickstart's (D=64, B=64, 8x32 regions); evaluate: "
        "COCO-5K-shaped cross-modal evaluation, with the bare GEMM measured in the same process.",
        "search flat: 1,000 queries in one call on a 200,000 x 256 flat index; search hnsw: one query per call on a "
        "100,000 x 256 hnsw index (gssf's defaults); faiss's OpenMP team at the thread count, OpenMP's wait policy "
        "left alone.",
    ]
    report("threads" + ("_quick" if args.quick else ""), rows, notes)


if __name__ == "__main__":
    main()
