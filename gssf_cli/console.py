"""How results look in a terminal: rich tables for people, ``--json`` for scripts."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

stdout = Console()
stderr = Console(stderr=True)


def print_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")


def print_prepare(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(result)
        return
    table = Table(title=f"dataset {result['name']} ({result['kind']}, {result['task']})")
    table.add_column("split")
    keys = sorted({k for counts in result["splits"].values() for k in counts})
    for key in keys:
        table.add_column(key, justify="right")
    for split, counts in result["splits"].items():
        table.add_row(split, *(_cell(counts.get(k, "")) for k in keys))
    stdout.print(table)
    stdout.print(
        f"written to [bold]{result['path']}[/] in {result['seconds']:.2f} s "
        f"({result['bytes'] / 2**20:.1f} MiB), manifest sha256 {result['manifest_sha256'][:12]}"
    )
    if result.get("run_id"):
        stdout.print(f"MLflow run {result['run_id']}")


def _cell(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def print_evaluation(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(result)
        return
    sizes = ", ".join(f"{k} {v:,}" for k, v in result["sizes"].items())
    if result["task"] == "cross_modal":
        ks = sorted(int(key[5:]) for key in result if key.startswith("i2t_r") and key[5:].isdigit())
        table = Table(title=f"cross-modal retrieval, protocol {result['protocol']} ({sizes})")
        table.add_column("direction")
        for k in ks:
            table.add_column(f"R@{k}", justify="right")
        table.add_column("medr", justify="right")
        table.add_column("meanr", justify="right")
        for name, label in (("i2t", "image→text"), ("t2i", "text→image")):
            table.add_row(
                label,
                *(f"{result[f'{name}_r{k}']:.2f}" for k in ks),
                f"{result[f'{name}_medr']:.0f}",
                f"{result[f'{name}_meanr']:.1f}",
            )
        stdout.print(table)
        stdout.print(f"rSum {result['rsum']:.2f}   i2t mAP {result['i2t_map']:.2f}")
        if len(result.get("folds", [])) > 1:
            folds = "  ".join(f"{fold['rsum']:.1f}" for fold in result["folds"])
            stdout.print(f"rSum per fold: {folds}")
    else:
        table = Table(title=f"label-based retrieval ({sizes})")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key, value in result.items():
            if isinstance(value, float) and key != "seconds":
                table.add_row(key, f"{value:.4f}")
        stdout.print(table)
        if result.get("num_skipped"):
            stdout.print(f"{result['num_skipped']:.0f} queries had no relevant item and were skipped")
    if result.get("run_id"):
        stdout.print(f"MLflow run {result['run_id']}")


def print_training(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(result)
        return
    table = Table(title=f"best epoch {result['best_epoch'] + 1} (validation {result['validation_metric']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result["metrics"].items():
        table.add_row(key, f"{value:.4g}")
    stdout.print(table)
    params = result["parameters"]
    stdout.print(
        f"parameters: metric head {params.get('metric_head', 0):,} of {params.get('total', 0):,}; "
        f"{result['epochs_run']} epochs in {result['seconds']:.1f} s"
    )
    stdout.print(f"checkpoints in [bold]{result['out_dir']}[/]")
    stdout.print(f"MLflow run {result['run_id']}")
