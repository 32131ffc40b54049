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
