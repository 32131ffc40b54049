"""Label-based evaluation, gssf against pytorch-metric-learning's AccuracyCalculator (a measurement, not a test).

Why: MAP@R, P@1 and R-precision are what metric-learning papers report, and pytorch-metric-learning (PML) is
what most of them compute them with, so it is the peer to be measured against: same figures (to 1e-5), in
how much time and memory. Class-clustered L2-normalised float32 embeddings (D = 128, generated as in
bench_retrieval.py), two sizes:
  (a) self-retrieval: 20,000 queries, 100 classes, the gallery is the query set and each query leaves itself
      out (gssf: ``gallery=None``; PML: the same tensors as reference with ``ref_includes_query=True``), at
      three cluster tightnesses (``SPREADS``: MAP@R about 0.9, 0.7 and 0.3), since how far the top of a
      ranking stands out of the rest is what an exact top-of-ranking search depends on;
  (b) separate gallery: 100,000 queries x 500,000 gallery items, 1,000 classes (skipped by ``--no-separate``).
Sides: gssf ``evaluate_labels(..., full_map=False)`` (exact, from each query's top max(R, K)); PML
``AccuracyCalculator(k="max_bin_count")``, whose k-NN is an exact faiss ``IndexFlatL2`` search; and the bare
score GEMM ``queries @ gallery.T`` in torch, in row chunks of the same 256 MiB budget, as the floor both are
compared to. Each library runs in its own fresh interpreter (``--measure``) so that its peak resident memory
(VmHWM, read after its first run) is its own; the GEMM and gssf's ``full_map=True`` (what the full-ranking mAP
costs on top) run after gssf in gssf's interpreter. Times are the best of a few runs at size (a) and one run
at size (b), where the GEMM alone takes minutes; size (a) at the middle spread is measured again under a
partial load (one busy-loop process: a colleague's job) and under a full one (a busy-loop process per core). ``--quick`` shrinks them to 5,000 self and 10,000 x 50,000 (a smoke run of about
a minute); ``--full-map-big`` also times ``full_map=True`` at size (b).

Needs the ``bench`` extra (``pip install -e ".[dev,bench]"``; ``nox -s bench`` has its own environment).
Run from the repository root:  python benchmarks/bench_labels.py [--quick] [--full-map-big] [--no-separate]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from bench_retrieval import (
    LABEL_CLASSES,
    LABEL_DIM,
    LABEL_NOISE,
    chunked_gemm,
    clustered_embeddings,
    label_data,
    unit_rows,
)
from common import competing_load, peak_rss_mib, report

FULL = {
    "self": {"queries": 20_000, "gallery": 0, "classes": 100, "repeats": 3},
    "separate": {"queries": 100_000, "gallery": 500_000, "classes": LABEL_CLASSES, "repeats": 1},
}
QUICK = {
    "self": {"queries": 5_000, "gallery": 0, "classes": 100, "repeats": 2},
    "separate": {"queries": 10_000, "gallery": 50_000, "classes": LABEL_CLASSES, "repeats": 1},
}
"""``gallery: 0`` is self-retrieval (the gallery is the query set)."""
SPREADS = {"tight": 1.3, "medium": LABEL_NOISE, "loose": 1.95}
"""Cluster spread (noise per unit of the class centre, as ``LABEL_NOISE``) -> MAP@R of about 0.9, 0.7, 0.3 at
size (a)."""
LOADS = {"quiet": 0, "1 busy": 1, "busy per core": os.cpu_count() or 1}
"""Load name -> busy-loop processes beside the measured one."""
TOLERANCE = 1e-5
METRICS = {"MAP@R": ("map_at_r", "mean_average_precision_at_r"), "P@1": ("precision_at_1", "precision_at_1"),
           "R-prec": ("r_precision", "r_precision")}  # fmt: skip
"""Table column -> (gssf's key, PML's key)."""
Data = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]


def self_data(n: int, classes: int, spread: float) -> Data:
    """Self-retrieval set: ``([n, D] unit rows, [n] labels, None, None)``, clustered as bench_retrieval's with
    noise ``spread / sqrt(D)`` around each class centre."""
    gen = torch.Generator().manual_seed(2)
    centers = unit_rows(classes, LABEL_DIM, gen)
    labels = torch.randint(classes, (n,), generator=gen)
    return clustered_embeddings(labels, centers, spread / LABEL_DIM**0.5, gen), labels, None, None


def dataset(queries: int, gallery: int, classes: int, spread: float) -> Data:
    """``(queries [Q, D], query_labels [Q], gallery [G, D] | None, gallery_labels [G] | None)``."""
    if not gallery:
        return self_data(queries, classes, spread)
    if classes != LABEL_CLASSES or spread != LABEL_NOISE:
        raise ValueError(f"a separate gallery uses bench_retrieval's label_data: {LABEL_CLASSES} classes, spread "
                         f"{LABEL_NOISE}")  # fmt: skip
    return label_data(queries, gallery)


def runs(fn: Callable[[], Any], repeats: int) -> tuple[float, Any, float]:
    """Run ``fn`` ``repeats`` times: (best wall-clock seconds, the first run's value, peak RSS in MiB after the
    first run, before later runs could add allocator fragmentation)."""
    start = time.perf_counter()
    value = fn()
    times = [time.perf_counter() - start]
    peak = peak_rss_mib()
    for _ in range(repeats - 1):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), value, peak


def measure_gssf(data: Data, repeats: int, full_map: bool) -> dict[str, Any]:
    """In this fresh process: gssf's time, peak RSS and metrics; then, in the same process, the full-ranking mAP
    (if ``full_map``) and the bare chunked GEMM."""
    from gssf_cli.evaluation.labels import evaluate_labels

    queries, query_labels, gallery, gallery_labels = data
    keys = queries if gallery is None else gallery
    baseline = peak_rss_mib()
    seconds, metrics, peak = runs(
        lambda: evaluate_labels(queries, query_labels, gallery, gallery_labels, full_map=False), repeats
    )
    out = {"seconds": seconds, "metrics": metrics, "peak_rss_mib": peak, "baseline_rss_mib": baseline}
    if full_map:
        out["full_map_seconds"], full, _ = runs(
            lambda: evaluate_labels(queries, query_labels, gallery, gallery_labels, full_map=True), repeats
        )
        out["full_map"] = full["map"]
    out["gemm_seconds"] = runs(lambda: chunked_gemm(queries, keys), repeats)[0]
    out["threads"] = torch.get_num_threads()
    return out


def measure_pml(data: Data, repeats: int) -> dict[str, Any]:
    """In this fresh process: AccuracyCalculator's time, peak RSS and metrics."""
    import faiss
    import pytorch_metric_learning
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    queries, query_labels, gallery, gallery_labels = data
    calculator = AccuracyCalculator(
        include=tuple(theirs for _, theirs in METRICS.values()), k="max_bin_count", device=torch.device("cpu")
    )
    if gallery is None:
        reference, reference_labels, includes_query = queries, query_labels, True
    else:
        reference, reference_labels, includes_query = gallery, gallery_labels, False
    baseline = peak_rss_mib()
    seconds, metrics, peak = runs(
        lambda: calculator.get_accuracy(
            queries, query_labels, reference, reference_labels, ref_includes_query=includes_query
        ),
        repeats,
    )
    versions = f"pytorch-metric-learning {pytorch_metric_learning.__version__}, faiss {faiss.__version__}"
    return {"seconds": seconds, "metrics": metrics, "peak_rss_mib": peak, "baseline_rss_mib": baseline,
            "threads": faiss.omp_get_max_threads(), "versions": versions}  # fmt: skip


def run_measure(side: str, case: dict[str, Any], full_map: bool = False) -> dict[str, Any]:
    """One side on one case in a fresh interpreter; returns what ``measure_gssf``/``measure_pml`` return."""
    args = [sys.executable, __file__, "--measure", side]
    for name in ("queries", "gallery", "classes", "repeats", "spread"):
        args += [f"--{name}", str(case[name])]
    if full_map:
        args.append("--full-map")
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{side} on {case} failed:\n{done.stderr[-4000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def shape_of(case: dict[str, Any]) -> str:
    if not case["gallery"]:
        return f"{case['queries']:,} self C={case['classes']:,}"
    return f"{case['queries']:,} x {case['gallery']:,} C={case['classes']:,}"


def compare(name: str, case: dict[str, Any], load: str, full_map: bool) -> tuple[list[dict[str, Any]], list[str], str]:
    """Rows for one case under one load (a key of ``LOADS``), notes on agreement and costs, and the peer's
    versions and thread counts."""
    gssf = run_measure("gssf", case, full_map)
    pml = run_measure("pml", case)
    gemm = gssf["gemm_seconds"]
    values = {
        "gssf": {col: float(gssf["metrics"][ours]) for col, (ours, _) in METRICS.items()},
        "PML": {col: float(pml["metrics"][theirs]) for col, (_, theirs) in METRICS.items()},
    }
    delta = max(abs(values["gssf"][col] - values["PML"][col]) for col in METRICS)
    common = {"case": shape_of(case), "spread": case["spread"], "load": load}
    rows = [
        {**common, "side": "gssf", "seconds": gssf["seconds"],
         "x PML": gssf["seconds"] / pml["seconds"], "x GEMM": gssf["seconds"] / gemm,
         "peak MiB": gssf["peak_rss_mib"], **values["gssf"], "|Δ| PML": delta},
        {**common, "side": "PML", "seconds": pml["seconds"], "x PML": 1.0,
         "x GEMM": pml["seconds"] / gemm, "peak MiB": pml["peak_rss_mib"], **values["PML"]},
        {**common, "side": "GEMM", "seconds": gemm, "x PML": gemm / pml["seconds"],
         "x GEMM": 1.0},
    ]  # fmt: skip
    notes = [
        f"{name} ({load}): MAP@R {values['gssf']['MAP@R']:.3f}; gssf/PML = {gssf['seconds'] / pml['seconds']:.2f}x time, "
        f"{gssf['peak_rss_mib']:.0f} vs {pml['peak_rss_mib']:.0f} MiB peak RSS ({gssf['baseline_rss_mib']:.0f} "
        f"and {pml['baseline_rss_mib']:.0f} MiB before evaluating: interpreter, libraries, embeddings); "
        f"gssf/GEMM = {gssf['seconds'] / gemm:.2f}x, PML/GEMM = {pml['seconds'] / gemm:.2f}x; "
        f"gssf skipped {gssf['metrics']['num_skipped']} queries without a relevant item.",
    ]
    if delta > TOLERANCE:
        notes.append(f"!!! {name} ({load}): THE METRICS DISAGREE by {delta:.3g} > {TOLERANCE:g} "
                     f"(gssf {values['gssf']}, PML {values['PML']}) !!!")  # fmt: skip
    else:
        notes.append(f"{name} ({load}): MAP@R, P@1 and R-precision agree to {delta:.2g} (<= {TOLERANCE:g}).")
    if "full_map_seconds" in gssf:
        full, ours = gssf["full_map_seconds"], gssf["seconds"]
        rows.insert(1, {**common, "side": "gssf full_map", "seconds": full,
                        "x PML": full / pml["seconds"], "x GEMM": full / gemm,
                        "full mAP": gssf["full_map"]})  # fmt: skip
        notes.append(
            f"{name} ({load}): what full mAP costs: full_map=True takes {full / ours:.2f}x the time of "
            f"full_map=False (+{full - ours:.2f} s); mAP = {gssf['full_map']:.4f}."
        )
    return rows, notes, f"{pml['versions']}; threads: torch {gssf['threads']}, faiss {pml['threads']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    parser.add_argument("--full-map-big", action="store_true", help="also time full_map=True at the big size")
    parser.add_argument("--no-separate", action="store_true", help="skip the big separate-gallery size (b)")
    parser.add_argument("--measure", choices=["gssf", "pml"], help=argparse.SUPPRESS)
    parser.add_argument("--full-map", action="store_true", help=argparse.SUPPRESS)
    for name in ("queries", "gallery", "classes", "repeats"):
        parser.add_argument(f"--{name}", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--spread", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        data = dataset(args.queries, args.gallery, args.classes, args.spread)
        if args.measure == "gssf":
            print(json.dumps(measure_gssf(data, args.repeats, args.full_map)))
        else:
            print(json.dumps(measure_pml(data, args.repeats)))
        return
    sizes = QUICK if args.quick else FULL
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    setup = ""
    plan: list[tuple[str, dict[str, Any], str, bool]] = [
        (f"self {spread}", {**sizes["self"], "spread": SPREADS[spread]}, "quiet", spread == "medium")
        for spread in SPREADS
    ]
    if not args.no_separate:
        plan.append(("separate", {**sizes["separate"], "spread": LABEL_NOISE}, "quiet", args.full_map_big))
    plan += [
        ("self medium", {**sizes["self"], "spread": LABEL_NOISE}, load, False) for load in ("1 busy", "busy per core")
    ]
    for name, case, load, full_map in plan:
        with competing_load(LOADS[load]) if LOADS[load] else nullcontext():
            case_rows, case_notes, setup = compare(name, case, load, full_map)
        rows += case_rows
        notes += case_notes
    notes.append(
        f"data: class-clustered unit float32 embeddings, D={LABEL_DIM}; times: best of {sizes['self']['repeats']} "
        f"runs (self), {sizes['separate']['repeats']} run (separate), each library in its own fresh interpreter; "
        f"loads: busy-loop processes beside the measured one ('1 busy': one, 'busy per core': {LOADS['busy per core']}); "
        f"peak RSS: VmHWM after the first run; {setup}."
    )
    notes.append(
        "PML ranks by faiss IndexFlatL2 distance, gssf by inner product: the same order on unit vectors, up to the "
        "float32 rounding of near-ties (|q|^2 + |x|^2 - 2 q.x), which moves MAP@R and R-precision by ~1e-7."
    )
    report("labels" + ("_quick" if args.quick else ""), rows, notes)


if __name__ == "__main__":
    main()
