"""Late-interaction search over a token index (``gssf_cli.deploy.token_index``) at gallery scale, against exact
interaction search over the whole gallery with the same queries (a measurement script, not a test).

Setup, in a temporary folder, through the CLI (each a fresh process, MLflow in a temporary sqlite store): one
``gssf prepare --dataset synthetic --regions 36 --train-images 2000 --test-images N`` (its train split is the same
bytes whatever N, as the generator draws the train split first; the test split, N images x 36 regions x 64
features with its captions, is the gallery and the queries' source), then per interaction model (``scan-t2i``
first, then ``maxsim``) ``gssf train --interaction MODEL --metric gssf --block-size 8 --embed-dim 128 --epochs 2``
and ``gssf export --onnx`` (parity on the dev split: the test split is the gallery). D = 128: the issue's size,
small enough that a 2-epoch model trains in well under a minute on 2 cores.

Queries: 200 test captions picked with a seeded generator, the same captions for every model and index.

Measured per model, each index kind in its own fresh subprocess (``--measure KIND``, so its peak RSS is its own),
as ``gssf index`` builds it: ``gssf_cli.deploy.indexes.build(IndexConfig(...))`` (the gallery through the bundle's
image encoder into ``tokens.npy``, through the metric head into faiss; build = train + add + embedding, as the
manifest records it; the wall time also counts writing and checksumming the folder), then the index read back
and searched at each setting: ``token_index.candidates`` (every valid word of every query asks faiss for its
``per_word`` best regions; images = region // R) and ``token_index.rescore`` (the candidates' unit regions scored
exactly by the bundle's ``scorer`` graph, best k = 10 kept) timed separately; QPS = queries / (both). The exact
reference (``--measure exact``, its own subprocess): ``token_index.exact_top_k`` over every image of the flat
index's ``tokens.npy`` — the scorer on every (image, query) pair; recall@10 is against its rows, speed-up is
exact seconds / late-interaction seconds. Each timed call runs once (after a 5-query warm-up of both parts).

Index kinds: ``flat`` (exact region search) and ``ivfpq`` at N images; ``ivfpq`` is built with the package's
defaults except ``nlist``, set to sqrt(N x R) (1,897 at 3.6M regions) because the default 4 sqrt(N x R) (7,589)
took 235 s of k-means and 182 s of adding on this machine (measured once, outside this script), more than this
benchmark's budget for one kind. ``hnsw`` is measured on a smaller gallery (the first ``--hnsw-images`` images,
default 10,000) with its own exact reference, because building the graph over 3.6M regions would take far longer
than the whole benchmark on 2 cores (bench_search.py: 537 s for 1M vectors). Sweeps (see :data:`FULL`): per_word
8 to 512 for ivfpq at the package's nprobe rule for its nlist (nlist / 64, at least 8: 30), and 2x and 4x that
nprobe at per_word 32 and 128; 8 to 256 for hnsw at its default ef_search; 128 and 512 for flat (each flat candidate search multiplies every
query word with every region: about a minute at 3.6M regions). per_word goes past 128 because on this data a word
is weakly selective (32 concepts, 3 in each image: a concept's words match regions of ~9% of the gallery), so the
exact top 10 needs per_word in the hundreds to thousands.

With ``--work DIR`` the folder is kept, and a later run with the same sizes reuses its dataset and bundles (their
setup times are then the first run's, marked "reused"). The full run took 33 minutes on 2 cores shared with another
job (load average ~5; planned for ~20 on a quiet machine), most of it the exact references, flat's candidate
searches and re-scoring at large per_word; peak RSS 4.8 GiB (the flat subprocess). ``--quick`` (2,000 images,
scan-t2i only, a 1-epoch model): 68 s at load ~2.5, most of it training and exporting (~20 s with ``--work``
reusing the bundle).

Run from the repository root:  python benchmarks/bench_token_search.py [--quick] [--images N] [--models M,M]
[--kinds flat,ivfpq,hnsw] [--hnsw-images N] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from common import peak_rss_mib, report

FULL: dict[str, Any] = {
    "images": 100_000, "hnsw_images": 10_000, "train_images": 2_000, "epochs": 2, "models": ("scan-t2i", "maxsim"),
    "sweeps": {
        "flat": [(1, p) for p in (128, 512)],
        "ivfpq": [(1, p) for p in (8, 16, 32, 64, 128, 256, 512)] + [(f, p) for f in (2, 4) for p in (32, 128)],
        "hnsw": [(1, p) for p in (8, 16, 32, 64, 128, 256)],
    },
}  # fmt: skip
QUICK: dict[str, Any] = {
    "images": 2_000, "hnsw_images": 2_000, "train_images": 300, "epochs": 1, "models": ("scan-t2i",),
    "sweeps": {"flat": [(1, 32)], "ivfpq": [(1, 8), (1, 128), (4, 8)], "hnsw": [(1, 8), (1, 128)]},
}  # fmt: skip
"""Sizes and sweeps: each sweep entry is ``(nprobe factor, per_word)``, the factor times ivfpq's default nprobe
(ignored by the other kinds). flat sweeps two settings only: each of its candidate searches is a full GEMM of every
query word against every region (the cost of exact maxsim), so it cannot win and a third would cost ~1 min."""
REGIONS = 36
EMBED_DIM = 128
BLOCK_SIZE = 8
QUERIES = 200
SEED = 0
WARMUP_QUERIES = 5
TARGET_RECALL = 0.95
TARGET_SPEEDUP = 10.0
MIB = 2**20


# ----------------------------------------------------------------------------------------------------------
# Setup: the CLI in a temporary folder


def gssf(work: Path, *args: str) -> dict[str, Any]:
    """Run ``gssf --tracking-uri (work's store) ARGS --json`` in ``work``; its JSON answer."""
    exe = shutil.which("gssf") or str(Path(sys.executable).with_name("gssf"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    done = subprocess.run([exe, "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}", *args, "--json"], cwd=work,
                          env=env, capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"gssf {' '.join(args)} exited {done.returncode}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    start = done.stdout.find("{")
    answer: dict[str, Any] = json.loads(done.stdout[start:])
    return answer


def prepare(work: Path, sizes: dict[str, Any]) -> float | None:
    """``gssf prepare`` into ``work/data``: its seconds, or None when an earlier run in the same ``--work`` folder
    left it."""
    manifest = work / "data" / "manifest.json"
    if manifest.is_file():
        splits = json.loads(manifest.read_text())["splits"]
        if (splits["train"]["images"], splits["test"]["images"]) == (sizes["train_images"], sizes["images"]):
            return None
    start = time.perf_counter()
    gssf(work, "prepare", "--dataset", "synthetic", "--regions", str(REGIONS), "--train-images",
         str(sizes["train_images"]), "--test-images", str(sizes["images"]), "--seed", str(SEED), "--out", "data",
         "--force")  # fmt: skip
    return time.perf_counter() - start


def train_and_export(work: Path, model: str, sizes: dict[str, Any]) -> dict[str, Any]:
    """``gssf train`` then ``gssf export --onnx`` for one interaction model: the bundle at ``work/exports/MODEL``
    (kept from an earlier run in the same ``--work`` folder, with its figures)."""
    figures = work / "exports" / f"{model}.json"
    if (work / "exports" / model / "manifest.json").is_file() and figures.is_file():
        kept = json.loads(figures.read_text())
        if (kept["train_images"], kept["epochs"]) == (sizes["train_images"], sizes["epochs"]):
            return {**kept, "reused": True}
    start = time.perf_counter()
    trained = gssf(work, "train", "--data", "data", "--interaction", model, "--metric", "gssf", "--block-size",
                   str(BLOCK_SIZE), "--embed-dim", str(EMBED_DIM), "--epochs", str(sizes["epochs"]), "--device",
                   "cpu", "--seed", str(SEED), "--runs-dir", "runs")  # fmt: skip
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    gssf(work, "export", "--onnx", "--run", trained["run_id"], "--out", f"exports/{model}", "--split", "dev", "--force")
    answer = {"train_s": train_s, "export_s": time.perf_counter() - start, "val_rsum": trained["metrics"]["val_rsum"],
              "train_images": sizes["train_images"], "epochs": sizes["epochs"]}  # fmt: skip
    figures.write_text(json.dumps(answer))
    return answer


def pick_queries(work: Path) -> None:
    """``QUERIES`` test captions, seeded, one a line in ``work/queries.txt``."""
    lines = (work / "data" / "test_caps.txt").read_text(encoding="utf-8").splitlines()
    picked = np.random.default_rng(SEED).choice(len(lines), min(QUERIES, len(lines)), replace=False)
    (work / "queries.txt").write_text("".join(f"{lines[i]}\n" for i in picked), encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------
# One kind (or the exact reference), in a fresh subprocess


def _queries(work: Path, bundle: Any) -> Any:
    from gssf_cli.data.text import read_captions
    from gssf_cli.deploy import token_index

    captions = read_captions(work / "queries.txt")
    return token_index.caption_queries(bundle, captions, lambda i: f"queries.txt: line {i + 1}")


def measure_kind(
    kind: str, model: str, work: Path, gallery: Path, tag: str, nlist: int | None, sweep: list[tuple[int, int]]
) -> dict[str, Any]:
    """Build ``kind``'s token index over ``gallery`` with ``model``'s bundle, then sweep its settings."""
    from gssf_cli.core.stage_configs import IndexConfig
    from gssf_cli.deploy import indexes, search, token_index
    from gssf_cli.deploy.bundle import BundleModel
    from gssf_cli.deploy.index_folder import INDEX_FILE, TOKENS_FILE

    baseline = peak_rss_mib()
    bundle_path = work / "exports" / model
    folder = work / "indexes" / f"{model}_{tag}"
    nprobe = None if nlist is None else nprobe_for(nlist)
    config = IndexConfig(bundle=bundle_path, gallery=gallery, kind=cast(Any, kind), out=folder, nlist=nlist,
                         nprobe=nprobe, seed=SEED, force=True)  # fmt: skip
    start = time.perf_counter()
    built = indexes.build(config)
    build_wall = time.perf_counter() - start
    build_rss = peak_rss_mib()
    manifest = built.manifest
    spec = search.IndexSpec.from_json(manifest["spec"])
    bundle = BundleModel.load(bundle_path)
    index = search.read_index(folder / INDEX_FILE, spec, manifest["count"] * manifest["regions_per_image"])
    tokens = token_index.open_tokens(folder, manifest, bundle.dim)
    queries = _queries(work, bundle)
    k = min(10, tokens.shape[0])
    settings: list[dict[str, int]] = []
    for factor, per_word in sweep:
        if kind == "ivfpq":
            settings.append({"nprobe": min(spec.build["nlist"], factor * spec.search["nprobe"]), "per_word": per_word})
        else:
            settings.append({**spec.search, "per_word": per_word})
    warm = token_index.TokenQueries(queries.words[:WARMUP_QUERIES], queries.lengths[:WARMUP_QUERIES])
    found = token_index.candidates(index, spec, warm, tokens.shape[1], sweep[0][1], dict(spec.search))
    token_index.rescore(bundle, tokens, warm, found, k)
    results = []
    for i, setting in enumerate(settings):
        params = {name: value for name, value in setting.items() if name != "per_word"}
        per_word = setting["per_word"]
        start = time.perf_counter()
        found = token_index.candidates(index, spec, queries, tokens.shape[1], per_word, params)
        middle = time.perf_counter()
        _, rows = token_index.rescore(bundle, tokens, queries, found, k)
        stop = time.perf_counter()
        np.save(work / f"rows_{model}_{tag}_{i}.npy", rows)
        results.append({"setting": setting, "candidates_s": middle - start, "rescore_s": stop - middle,
                        "candidates_per_query": float(np.mean([f.size for f in found]))})  # fmt: skip
        print(f"    {model} {tag} {setting}: {middle - start:.2f} s + {stop - middle:.2f} s", file=sys.stderr)
    return {
        "spec": spec.to_json(),
        "count": manifest["count"],
        "build": manifest["build"],
        "build_wall_s": build_wall,
        "index_bytes": (folder / INDEX_FILE).stat().st_size,
        "tokens_bytes": (folder / TOKENS_FILE).stat().st_size,
        "words_per_query": float(np.mean(queries.lengths)),
        "build_peak_rss_mib": build_rss,
        "peak_rss_mib": peak_rss_mib(),
        "baseline_rss_mib": baseline,
        "results": results,
    }


def nprobe_for(nlist: int) -> int:
    """The package's nprobe rule applied to ``nlist`` (:func:`gssf_cli.deploy.search.default_nprobe`), passed
    with ``--nlist`` explicitly."""
    from gssf_cli.deploy import search

    return search.default_nprobe(nlist)


def measure_exact(model: str, work: Path, tag: str) -> dict[str, Any]:
    """``exact_top_k`` over the whole gallery of index ``tag`` (its ``tokens.npy``), timed; its rows saved."""
    from gssf_cli.deploy import token_index
    from gssf_cli.deploy.bundle import BundleModel
    from gssf_cli.deploy.index_folder import read_manifest

    baseline = peak_rss_mib()
    bundle = BundleModel.load(work / "exports" / model)
    folder = work / "indexes" / f"{model}_{tag}"
    tokens = token_index.open_tokens(folder, read_manifest(folder), bundle.dim)
    queries = _queries(work, bundle)
    k = min(10, tokens.shape[0])
    warm = token_index.TokenQueries(queries.words[:WARMUP_QUERIES], queries.lengths[:WARMUP_QUERIES])
    bundle.pair_scores(np.asarray(tokens[:64]), warm.words, warm.lengths)
    start = time.perf_counter()
    _, rows = token_index.exact_top_k(bundle, tokens, queries, k)
    seconds = time.perf_counter() - start
    np.save(work / f"exact_{model}_{tag}.npy", rows)
    return {"seconds": seconds, "images": int(tokens.shape[0]), "peak_rss_mib": peak_rss_mib(),
            "baseline_rss_mib": baseline}  # fmt: skip


def run_measure(*args: str) -> dict[str, Any]:
    """This script as a fresh subprocess with ``--measure ...``: its JSON answer (progress goes to stderr)."""
    done = subprocess.run([sys.executable, __file__, *args], check=True, stdout=subprocess.PIPE, text=True)
    answer: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return answer


# ----------------------------------------------------------------------------------------------------------
# The run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK['images']:,} gallery images, small models")
    parser.add_argument("--images", type=int, help=f"gallery images (default {FULL['images']:,})")
    parser.add_argument("--hnsw-images", type=int, help="images of hnsw's smaller gallery (0: skip hnsw)")
    parser.add_argument(
        "--models", help="comma-separated interaction models (default: scan-t2i,maxsim; quick: scan-t2i)"
    )
    parser.add_argument("--kinds", default="flat,ivfpq,hnsw", help="comma-separated index kinds (flat is needed)")
    parser.add_argument("--work", type=Path, help="keep the working folder here, and reuse the dataset and bundles "
                        "an earlier run left there (default: a temporary folder)")  # fmt: skip
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--gallery", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tag", help=argparse.SUPPRESS)
    parser.add_argument("--nlist", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        if args.measure == "exact":
            print(json.dumps(measure_exact(args.model, args.work, args.tag)))
        else:
            sweep = [tuple(entry) for entry in (QUICK if args.quick else FULL)["sweeps"][args.measure]]
            print(
                json.dumps(measure_kind(args.measure, args.model, args.work, args.gallery, args.tag, args.nlist, sweep))
            )
        return
    sizes = dict(QUICK if args.quick else FULL)
    if args.images:
        sizes["images"] = args.images
    if args.hnsw_images is not None:
        sizes["hnsw_images"] = args.hnsw_images
    kinds = args.kinds.split(",")
    models = args.models.split(",") if args.models else list(sizes["models"])
    if "flat" not in kinds:
        raise SystemExit("--kinds must include flat: the exact reference reads its tokens.npy")
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        run(args.work.resolve(), sizes, models, kinds, args.quick)
    else:
        with tempfile.TemporaryDirectory(prefix="bench_token_search_") as tmp:
            run(Path(tmp), sizes, models, kinds, args.quick)


def run(work: Path, sizes: dict[str, Any], models: list[str], kinds: list[str], quick: bool) -> None:
    from gssf_cli.deploy import search

    started = time.perf_counter()
    load_before = os.getloadavg()
    images, small = sizes["images"], min(sizes["hnsw_images"], sizes["images"])
    log(f"prepare: {sizes['train_images']:,} train + {images:,} test images x {REGIONS} regions")
    prepare_s = prepare(work, sizes)
    pick_queries(work)
    gallery = work / "data" / "test_ims.npy"
    small_gallery = work / "small_ims.npy"
    if "hnsw" in kinds and 0 < small < images:
        np.save(small_gallery, np.load(gallery, mmap_mode="r")[:small])
    nlist = max(1, round(math.sqrt(images * REGIONS)))
    default_ivfpq = search.index_spec("ivfpq", EMBED_DIM, images * REGIONS)
    cli_ivfpq = search.index_spec("ivfpq", EMBED_DIM, images * REGIONS, {"nlist": nlist})
    rows: list[dict[str, Any]] = []
    setup: dict[str, dict[str, Any]] = {}
    summaries: list[str] = []
    for model in models:
        log(f"{model}: train and export")
        setup[model] = train_and_export(work, model, sizes)
        plan: list[tuple[str, str, Path, str]] = [("flat", "flat", gallery, "main")]
        if "ivfpq" in kinds:
            plan.append(("ivfpq", "ivfpq", gallery, "main"))
        if "hnsw" in kinds and small > 0:
            plan.append(("hnsw", "hnsw_small" if small < images else "hnsw", small_gallery if small < images
                         else gallery, "small" if small < images else "main"))  # fmt: skip
        measured: dict[str, dict[str, Any]] = {}
        exact: dict[str, dict[str, Any]] = {}
        for kind, tag, where, reference in plan:
            log(f"{model}: build and search {tag}")
            extra = ["--nlist", str(nlist)] if kind == "ivfpq" else []
            measured[tag] = run_measure("--measure", kind, "--model", model, "--work", str(work), "--gallery",
                                        str(where), "--tag", tag, *extra, *(["--quick"] if quick else []))  # fmt: skip
            if reference not in exact:
                log(f"{model}: exact search over {measured[tag]['count']:,} images")
                exact[reference] = {**run_measure("--measure", "exact", "--model", model, "--work", str(work),
                                                  "--tag", tag), "tag": tag}  # fmt: skip
            shutil.rmtree(work / "indexes" / f"{model}_{tag}")
        model_rows, model_notes = table(work, model, measured, exact, plan)
        rows += model_rows
        summaries += [*model_notes, cost_note(model, model_rows)]
    load_after = os.getloadavg()
    total_s = time.perf_counter() - started
    notes = [
        f"gallery: {images:,} synthetic test images x {REGIONS} regions x 64 features (gssf prepare, seed {SEED}); "
        f"{QUERIES} test captions as queries (seeded); k = 10; D = {EMBED_DIM}; hnsw on the first {small:,} images.",
        f"setup: prepare {'reused' if prepare_s is None else f'{prepare_s:.1f} s'}; "
        + "; ".join(f"{m}: train {s['train_s']:.1f} s ({sizes['train_images']:,} images, {sizes['epochs']} epochs, "
                    f"val rsum {s['val_rsum']:.1f}), export {s['export_s']:.1f} s{' (reused)' if s.get('reused') else ''}"
                    for m, s in setup.items())
        + f"; whole run {total_s:.0f} s.",
        f"ivfpq: nlist = sqrt(regions) = {nlist:,} (the default, 4 sqrt, is {default_ivfpq.build['nlist']:,}: see the "
        f"script's docstring); nprobe = the package's rule for that nlist (nlist / 64, at least 8) = "
        f"{nprobe_for(nlist)}, and 2x and 4x at some per_word (`gssf index --nlist {nlist}` alone would store nprobe "
        f"{cli_ivfpq.search['nprobe']}, the rule for the default nlist: search.index_spec computes nprobe from the "
        "gallery size, not from the nlist given).",
        *summaries,
        "QPS = queries / (candidates s + rescore s); x exact = exact seconds / (candidates s + rescore s) over the same "
        "gallery; cand/query = mean images re-scored per query; build s = train + add + embedding (the manifest's "
        "build_seconds), build wall s = the whole indexes.build call (also writing tokens.npy, the captions and "
        "the checksums); peak RSS = VmHWM of the kind's own subprocess (+ = increase over its start), after the "
        "build | at the end of the sweep (tokens.npy is memory-mapped: its pages read count in RSS).",
        f"load average (1, 5, 15 min) at the start {tuple(round(x, 2) for x in load_before)}, at the end "
        f"{tuple(round(x, 2) for x in load_after)} (other work shares this machine); faiss and ONNX Runtime "
        "threads: default (one per core).",
    ]  # fmt: skip
    report("token_search" + ("_quick" if quick else ""), rows, notes)


def table(
    work: Path,
    model: str,
    measured: dict[str, dict[str, Any]],
    exact: dict[str, dict[str, Any]],
    plan: list[tuple[str, str, Path, str]],
) -> tuple[list[dict[str, Any]], list[str]]:
    from gssf_cli.deploy import exact_search

    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    queries = QUERIES
    for e in exact.values():
        rows.append({"model": model, "case": f"exact ({e['images']:,} images)", "recall@10": 1.0,
                     "QPS": queries / e["seconds"], "x exact": 1.0, "batch s": e["seconds"],
                     "peak RSS MiB": f"{e['peak_rss_mib']:.0f} (+{e['peak_rss_mib'] - e['baseline_rss_mib']:.0f})"})  # fmt: skip
    for kind, tag, _, reference in plan:
        m, e = measured[tag], exact[reference]
        truth = np.load(work / f"exact_{model}_{exact[reference]['tag']}.npy")
        best: dict[str, Any] | None = None
        for i, r in enumerate(m["results"]):
            found = np.load(work / f"rows_{model}_{tag}_{i}.npy")
            seconds = r["candidates_s"] + r["rescore_s"]
            row = {
                "model": model,
                "case": f"{kind} ({m['count']:,} images)",
                "params": ", ".join(f"{k}={v}" for k, v in r["setting"].items()),
                "recall@10": exact_search.recall_at_k(found, truth),
                "QPS": queries / seconds,
                "x exact": e["seconds"] / seconds,
                "cand/query": r["candidates_per_query"],
                "batch s": seconds,
                "candidates s": r["candidates_s"],
                "rescore s": r["rescore_s"],
                "build s": m["build"]["build_seconds"],
                "build wall s": m["build_wall_s"],
                "index MiB": m["index_bytes"] / MIB,
                "tokens MiB": m["tokens_bytes"] / MIB,
                "peak RSS MiB": f"{m['build_peak_rss_mib']:.0f} | {m['peak_rss_mib']:.0f} "
                                f"(+{m['peak_rss_mib'] - m['baseline_rss_mib']:.0f})",
            }  # fmt: skip
            rows.append(row)
            if row["recall@10"] >= TARGET_RECALL and (best is None or row["batch s"] < best["batch s"]):
                best = row
        notes.append(summary(model, kind, m, rows[-len(m["results"]) :], best))
    return rows, notes


def summary(model: str, kind: str, m: dict[str, Any], rows: list[dict[str, Any]], best: dict[str, Any] | None) -> str:
    """One line: the cheapest setting at recall >= 0.95 and whether it reaches 10x exact, else the shortfall."""
    head = (f"{model} {kind} ({m['count']:,} images, {m['words_per_query']:.1f} words a query; build "
            f"{m['build']['build_seconds']:.1f} s, spec {m['spec']['build']} {m['spec']['search']})")  # fmt: skip
    if best is not None:
        verdict = (
            "meets"
            if best["x exact"] >= TARGET_SPEEDUP
            else f"misses (short by {TARGET_SPEEDUP / best['x exact']:.1f}x)"
        )
        where = (f"candidates {best['candidates s']:.2f} s + re-scoring {best['rescore s']:.2f} s for {QUERIES} "
                 f"queries")  # fmt: skip
        return (f"{head}: cheapest setting at recall@10 >= {TARGET_RECALL}: {best['params']} -> recall "
                f"{best['recall@10']:.3f}, {best['QPS']:.1f} QPS, {best['x exact']:.1f}x exact ({where}), "
                f"{best['cand/query']:.0f} candidates a query: {verdict} the {TARGET_SPEEDUP:.0f}x target.")  # fmt: skip
    top = max(rows, key=lambda r: r["recall@10"])
    return (f"{head}: no setting reaches recall@10 {TARGET_RECALL}; the best, {top['params']}, gives "
            f"{top['recall@10']:.3f} (short by {TARGET_RECALL - top['recall@10']:.3f}) at {top['x exact']:.1f}x exact "
            f"(candidates {top['candidates s']:.2f} s + re-scoring {top['rescore s']:.2f} s), "
            f"{top['cand/query']:.0f} candidates a query.")  # fmt: skip


def cost_note(model: str, rows: list[dict[str, Any]]) -> str:
    """Where the time goes, from one model's rows: exact's cost per (image, query) pair against re-scoring's cost per
    candidate (at the largest candidate set of the largest gallery's approximate index), the candidate search, and
    so how few candidates a query late interaction may re-score to beat exact, and to be 10x faster."""

    def images(row: dict[str, Any]) -> int:
        return int(row["case"].split("(")[1].split()[0].replace(",", ""))

    exact = max((r for r in rows if r["case"].startswith("exact")), key=images)
    n = images(exact)
    pair_us = 1e6 * exact["batch s"] / (n * QUERIES)
    pool = [r for r in rows if not r["case"].startswith(("exact", "flat")) and images(r) == n] or [
        r for r in rows if not r["case"].startswith("exact") and images(r) == n
    ]
    big = max(pool, key=lambda r: r["cand/query"])
    candidate_us = 1e6 * big["rescore s"] / (QUERIES * big["cand/query"])
    search_ms = 1e3 * min(r["candidates s"] for r in pool) / QUERIES
    ratio = candidate_us / pair_us
    ten_x = n / ratio / TARGET_SPEEDUP
    within = [r["recall@10"] for r in rows if not r["case"].startswith("exact") and images(r) == n
              and r["cand/query"] <= ten_x]  # fmt: skip
    reached = f"the best recall@10 measured there is {max(within):.3f}" if within else "no setting measured is there"
    return (f"{model}, where the time goes ({n:,} images): exact costs {pair_us:.2f} us per (image, query) pair (the "
            f"scorer over blocks of images x all {QUERIES} queries); re-scoring costs {candidate_us:.1f} us per "
            f"candidate ({big['case'].split()[0]} {big['params']}: {big['cand/query']:.0f} a query, one scorer call "
            f"per query), {ratio:.1f}x as much; the candidate search {search_ms:.1f} ms a query at its cheapest. So "
            f"late interaction beats exact only below ~{n / ratio:,.0f} candidates a query and reaches "
            f"{TARGET_SPEEDUP:.0f}x only below ~{ten_x:,.0f} (less the candidate search): {reached}.")  # fmt: skip


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
