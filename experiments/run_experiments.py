"""Does a learned GSSF head beat cosine here? Every metric head on five built-in problems, three seeds each, tested.

Run by ``nox -s experiments`` (about 15 minutes on 2 CPU cores; ``--quick``: a smoke run of a few minutes that
leaves the README alone). For each problem and head, ``gssf train --seeds 0,1,2`` (one run per seed, each keeping
its best epoch by the dev split), then ``gssf compare COSINE HEAD`` on the **test** split: every head against
the cosine head of the same problem, the three seeds' per-query values averaged, a paired bootstrap interval and
a paired sign-flip p-value over the test queries. The token-level problem (the interaction family: SCAN over the
same synthetic data) is also tested against the embedding model's cosine head. The table goes into README.md between the
``experiments:begin`` / ``experiments:end`` markers exactly as it comes out, whatever it shows. Every run (train,
compare) is an MLflow run in experiment ``gssf-experiments`` of ``./mlflow.db``.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from gssf_cli.core.config import resolve
from gssf_cli.core.stage_configs import CompareConfig, PrepareConfig, TrainConfig
from gssf_cli.stages import compare, prepare, train
from gssf_cli.tracking.adapter import Tracker

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- experiments:begin -->", "<!-- experiments:end -->"
SEEDS = (0, 1, 2)

HEADS = {
    "cosine": {"metric": "cosine"},
    "diag": {"metric": "diag"},
    "bdiag d=16": {"metric": "bdiag", "block_size": 16},
    "gssf d=16": {"metric": "gssf", "block_size": 16},
    "bdiag d=32 (dense)": {"metric": "bdiag", "block_size": 32},
    "gssf d=16 + distillation": {"metric": "gssf", "block_size": 16, "distill_weight": 1.0},
}
PROBLEMS: dict[str, dict[str, Any]] = {
    "synthetic captions": {
        "data": "synthetic",
        "what": "generated images (1,000 train / 250 test, 12 regions each) with 5 captions each, GRU text tower, "
        "D = 128, 16 epochs",
        "train": {"embed_dim": 128, "word_dim": 64, "epochs": 16},
        "heads": ["cosine", "bdiag d=16", "gssf d=16", "gssf d=16 + distillation"],
    },
    "synthetic captions, token level (SCAN t→i)": {
        "data": "synthetic",
        "what": "the same data and towers, pairs scored by SCAN's stacked cross attention over regions and words "
        "(`--interaction scan-t2i`, the metric as token similarity where SCAN takes the word-vs-attended relevance, "
        "SCAN's λ₁ = 9, LogSumExp λ₂ = 6), 16 epochs; its last column tests it against the embedding model's cosine "
        "head",
        "train": {"embed_dim": 128, "word_dim": 64, "epochs": 16, "interaction": "scan-t2i"},
        "heads": ["cosine", "bdiag d=16", "gssf d=16"],
        "versus": "synthetic captions",
    },
    "digit halves": {
        "data": "halves",
        "what": "sklearn digits as two views (top half ↔ bottom half of each scan), trained 2-layer MLP towers, "
        "defaults (D = 1024), 20 epochs",
        "train": {"epochs": 20},
        "heads": ["cosine", "diag", "bdiag d=16", "gssf d=16"],
    },
    "digit halves, head only": {
        "data": "halves",
        "what": "the same pairs, the raw 32-pixel halves as fixed embeddings (`--encoder identity`): only the "
        "head learns, 20 epochs",
        "train": {"encoder": "identity", "epochs": 20},
        "heads": ["cosine", "diag", "bdiag d=16", "gssf d=16", "bdiag d=32 (dense)"],
    },
    "digits (labels)": {
        "data": "digits",
        "what": "sklearn digits, classes 0–5 train, 6–9 test, one MLP tower, D = 64, 15 epochs",
        "train": {"embed_dim": 64, "epochs": 15, "batch_size": 64},
        "heads": ["cosine", "diag", "bdiag d=16", "gssf d=16"],
    },
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="2 epochs, 2 heads, 2 seeds: a smoke run")
    parser.add_argument("--no-readme", action="store_true", help="print the table only")
    args = parser.parse_args()
    tracker = Tracker(experiment="gssf-experiments")
    seeds = SEEDS[:2] if args.quick else SEEDS
    rows: list[str] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gssf-exp-") as tmp:
        folders = _prepare(Path(tmp), tracker)
        baselines: dict[str, str] = {}
        for problem, spec in PROBLEMS.items():
            heads = spec["heads"][:2] if args.quick else spec["heads"]
            runs: dict[str, str] = {}
            for head in heads:
                values = {**spec["train"], **HEADS[head], "data": str(folders[spec["data"]])}
                values["runs_dir"] = str(Path(tmp) / "runs")
                if args.quick:
                    values["epochs"] = 2
                config = resolve(TrainConfig, "train", values)
                trained = train.run_seeds(config, seeds, tracker)
                assert trained.run_id is not None
                runs[head] = trained.run_id
                print(f"{problem}: {head} trained ({len(seeds)} seeds)", flush=True)
            tested = compare.run(CompareConfig(runs=tuple(runs.values()), bootstrap=10_000), tracker)
            versus = None
            if "versus" in spec:
                baseline = baselines[spec["versus"]]
                versus = compare.run(CompareConfig(runs=(baseline, *runs.values()), bootstrap=10_000), tracker)
            baselines[problem] = next(iter(runs.values()))
            rows += _rows(problem, heads, tested.to_json(), versus.to_json() if versus is not None else None)
            for line in rows[-len(heads) :]:
                print(line, flush=True)
    minutes = (time.perf_counter() - started) / 60
    block = f"{BEGIN}\n{_table(rows)}\n\n{_note(seeds, minutes)}\n{END}"
    print(block)
    if not args.no_readme and not args.quick:
        replace_block(README, BEGIN, END, block)


def replace_block(readme: Path, begin: str, end: str, block: str) -> None:
    """Put ``block`` (which starts with ``begin`` and ends with ``end``) in place of the README's text between
    those markers; a README without them stops the script."""
    text = readme.read_text()
    if begin not in text or end not in text:
        sys.exit(f"{readme.name} has no {begin} / {end} markers")
    head, rest = text.split(begin, 1)
    readme.write_text(head + block + rest.split(end, 1)[1])


def _prepare(tmp: Path, tracker: Tracker) -> dict[str, Path]:
    """The three dataset folders: default synthetic captions, scikit-learn's digits, and its two-view halves."""
    from sklearn.datasets import load_digits

    pixels = load_digits().data.astype(np.float32) / 16.0
    np.savez(tmp / "halves.npz", images=pixels[:, :32], texts=pixels[:, 32:])
    sources = {
        "synthetic": {"dataset": "synthetic", "train_images": 1000},
        "halves": {"dataset": "features", "source": str(tmp / "halves.npz")},
        "digits": {"dataset": "digits"},
    }
    folders = {}
    for name, values in sources.items():
        folders[name] = tmp / name
        prepare.run(resolve(PrepareConfig, "prepare", {**values, "out": str(folders[name])}), tracker)
    return folders


def _rows(problem: str, heads: list[str], tested: dict[str, Any], versus: dict[str, Any] | None = None) -> list[str]:
    """One table row per head: the test metric (mean ± std over the seeds), R@1 or P@1, the paired test against
    the cosine head (the baseline, first), and with ``versus`` the paired test against another problem's cosine
    head (the embedding model, for the token-level problem)."""
    primary = "rsum" if tested["task"] == "cross_modal" else "map_at_r"
    first = ("i2t_r1", "t2i_r1") if tested["task"] == "cross_modal" else ("precision_at_1",)
    systems = [tested["baseline"], *tested["compared"]]
    out = []
    for head, system in zip(heads, systems, strict=True):
        spread = system["spread"]
        quality = _spread(spread[primary], primary)
        at_one = " / ".join(_spread(spread[name], name) for name in first)
        against = _versus(tested, system["label"], primary) or "baseline"
        other = _versus(versus, system["label"], primary) if versus is not None else "—"
        out.append(f"| {problem} | {head} | {quality} | {at_one} | {against} | {other} |")
    return out


def _versus(tested: dict[str, Any], label: str, primary: str) -> str:
    """The paired test of system ``label`` against ``tested``'s baseline on ``primary`` ("" for the baseline)."""
    row = next((r for r in tested["rows"] if r["metric"] == primary and r["compared"] == label), None)
    if row is None:
        return ""
    verdict = row["verdict"] if row["verdict"] != "n.s." else "no significant difference"
    digits = _digits(primary)
    return (
        f"{row['difference']:+.{digits}f} [{row['ci_low']:+.{digits}f}, {row['ci_high']:+.{digits}f}], "
        f"{_p(row['p_value'])}: {verdict}"
    )


def _table(rows: list[str]) -> str:
    header = [
        "| problem | metric head | test: rSum or MAP@R (mean ± std, 3 seeds) | R@1 i2t / t2i, or P@1 | "
        "vs cosine: difference [95% CI], p | token level vs the embedding model's cosine |",
        "|---|---|---|---|---|---|",
    ]
    return "\n".join(header + rows)


def _note(seeds: tuple[int, ...], minutes: float) -> str:
    problems = "; ".join(f"**{name}**: {spec['what']}" for name, spec in PROBLEMS.items())
    return (
        f"Measured by `nox -s experiments` on {platform.processor() or platform.machine()}, Python "
        f"{platform.python_version()}, {minutes:.0f} minutes. Seeds {', '.join(map(str, seeds))} for every head; "
        "each run keeps the epoch that scored best on the **dev** split, and the figures are its **test** "
        "split (never used for a choice). The fifth column is `gssf compare` of the head against the cosine head "
        "of the same problem (the last, for the token-level rows: against the embedding model's cosine head on "
        "the same data), the seeds' per-query values averaged: the difference of the means, a paired "
        "bootstrap 95% interval over the test queries (10,000 resamples; cross-modal: an image with its "
        'captions is one unit) and a paired sign-flip p-value; "no significant difference" means p ≥ 0.05. '
        f"Problems — {problems}."
    )


def _spread(spread: dict[str, float], metric: str) -> str:
    digits = _digits(metric)
    return f"{spread['mean']:.{digits}f} ± {spread['std']:.{digits}f}"


def _digits(metric: str) -> int:
    return 3 if metric in ("map_at_r", "precision_at_1") else 1


def _p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


if __name__ == "__main__":
    main()
