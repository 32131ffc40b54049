"""Train every member of the GSSF family on the built-in datasets and write the results into the README.

Run by ``nox -s experiments`` (about 15 minutes on 2 CPU cores). The numbers go into README.md between the
``experiments:begin`` / ``experiments:end`` markers exactly as they come out, whatever they show. Every run
is also an MLflow run (experiment ``gssf-experiments`` in ``./mlflow.db``).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

from gssf_cli.config import PrepareConfig, TrainConfig, resolve
from gssf_cli.stages import prepare, train
from gssf_cli.tracking import Tracker

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- experiments:begin -->", "<!-- experiments:end -->"

VARIANTS = [
    ("cosine", {"metric": "cosine"}),
    ("diag", {"metric": "diag"}),
    ("bdiag d=4", {"metric": "bdiag", "block_size": 4}),
    ("bdiag d=16", {"metric": "bdiag", "block_size": 16}),
    ("bdiag d=64", {"metric": "bdiag", "block_size": 64}),
    ("gssf d=16", {"metric": "gssf", "block_size": 16}),
    ("gssf d=16 + distillation", {"metric": "gssf", "block_size": 16, "distill_weight": 1.0}),
]
DATASETS = {
    "synthetic": ({"dataset": "synthetic"}, {"embed_dim": 256, "word_dim": 128, "epochs": 8, "lr_decay_epoch": 6}),
    "digits": ({"dataset": "digits"}, {"embed_dim": 64, "epochs": 15, "batch_size": 64, "lr_decay_epoch": 10}),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="2 epochs, 2 variants: a smoke run")
    parser.add_argument("--no-readme", action="store_true", help="print the table only")
    args = parser.parse_args()
    tracker = Tracker(experiment="gssf-experiments")
    variants = VARIANTS[:2] if args.quick else VARIANTS
    rows: list[str] = []
    with tempfile.TemporaryDirectory(prefix="gssf-exp-") as tmp:
        for name, (prep, base) in DATASETS.items():
            folder = Path(tmp) / name
            prepare.run(resolve(PrepareConfig, "prepare", {**prep, "out": str(folder)}), tracker)
            for label, settings in variants:
                values = {**base, **settings, "data": str(folder), "runs_dir": str(Path(tmp) / "runs")}
                if args.quick:
                    values["epochs"] = 2
                started = time.perf_counter()
                result = train.run(resolve(TrainConfig, "train", values), tracker)
                seconds = time.perf_counter() - started
                rows.append(_row(name, label, result, seconds))
                print(rows[-1], flush=True)
    table = "\n".join(
        [
            "| dataset | metric head | head params | validation (dev) | R@1 i2t / t2i | best epoch | time |",
            "|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    note = (
        f"Measured by `nox -s experiments` on {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}, one seed (0); dev split of each dataset. Synthetic: default "
        "`gssf prepare --dataset synthetic` (2,000 train / 250 dev images), D = 256, 8 epochs. Digits: D = 64, "
        "15 epochs, validation MAP@R on the dev images of the train classes. Wall times are rough: other jobs "
        "shared the 2 cores."
    )
    block = f"{BEGIN}\n{table}\n\n{note}\n{END}"
    print(block)
    if not args.no_readme and not args.quick:
        text = README.read_text()
        if BEGIN not in text:
            sys.exit("README.md has no experiments markers")
        head, rest = text.split(BEGIN, 1)
        README.write_text(head + block + rest.split(END, 1)[1])


def _row(dataset: str, label: str, result: train.TrainResult, seconds: float) -> str:
    m = result.metrics
    if result.validation_metric == "rsum":
        quality = f"rSum {m['val_rsum']:.1f}"
        r1 = f"{m['val_i2t_r1']:.1f} / {m['val_t2i_r1']:.1f}"
    else:
        quality = f"MAP@R {m['val_map_at_r']:.3f}"
        r1 = f"P@1 {m['val_precision_at_1']:.3f}"
    return (
        f"| {dataset} | {label} | {result.parameters.get('metric_head', 0):,} | {quality} | {r1} | "
        f"{result.best_epoch} | {seconds:.0f} s |"
    )


if __name__ == "__main__":
    main()
