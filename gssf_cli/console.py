"""How results look in a terminal: rich tables for people, ``--json`` for scripts."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.table import Table

stdout = Console()
stderr = Console(stderr=True)


class TrainingProgress:
    """A rich bar per training epoch on stderr (loss and samples/s); satisfies
    :class:`gssf_cli.training.Progress`."""

    @contextlib.contextmanager
    def epoch(self, label: str, batches: int) -> Iterator[Callable[[float, float], None]]:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = (
            TextColumn(label),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  {task.fields[rate]:.0f} samples/s"),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=stderr, transient=True) as bar:
            task = bar.add_task("train", total=batches, loss=0.0, rate=0.0)
            yield lambda loss, rate: bar.update(task, advance=1, loss=loss, rate=rate)


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
            if isinstance(value, float) and _is_metric(key):
                table.add_row(key, f"{value:.4f}")
        stdout.print(table)
        if result.get("num_skipped"):
            stdout.print(f"{result['num_skipped']:.0f} queries had no relevant item and were skipped")
    if result.get("run_id"):
        stdout.print(f"MLflow run {result['run_id']}")


def _is_metric(key: str) -> bool:
    from gssf_cli import metrics

    try:
        metrics.get(key)
    except KeyError:
        return False
    return True


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


def print_tune(result: dict[str, Any], as_json: bool) -> None:
    """Every trial, best first (status, tuned values, metric, epochs), then the best trial and its config."""
    if as_json:
        print_json(result)
        return
    metric = result["metric"]
    table = Table(
        title=f"{len(result['trials'])} trials, by {metric} ({result['mode']}), scheduler {result['scheduler']}"
    )
    table.add_column("#", justify="right")
    table.add_column("trial")
    table.add_column("status")
    for name in result["tuned"]:
        table.add_column(name, justify="right")
    table.add_column(metric, justify="right")
    table.add_column("epochs", justify="right")
    table.add_column("head params", justify="right")
    table.add_column("s", justify="right")
    table.add_column("MLflow run")
    for rank, trial in enumerate(result["trials"], start=1):
        value = trial["metric"]
        table.add_row(
            str(rank),
            trial["trial_id"],
            trial["status"] + (f": {trial['error']}" if trial.get("error") else ""),
            *(_tuned_cell(trial["values"].get(name)) for name in result["tuned"]),
            "" if value is None else f"{value:.4g}",
            str(trial["epochs"]),
            "" if trial.get("head_params") is None else f"{trial['head_params']:,}",
            f"{trial['seconds']:.1f}",
            trial.get("run_id") or "",
        )
    stdout.print(table)
    best = result["best"]
    if best is not None:
        shown = ", ".join(f"{k}={_tuned_cell(v)}" for k, v in best["values"].items())
        stdout.print(f"best: trial {best['trial_id']} ({shown}) {metric} {best['metric']:.4g}")
    if result.get("best_config"):
        stdout.print(f"best config: [bold]{result['best_config']}[/] (gssf train --config {result['best_config']})")
    stdout.print(
        f"{result['seconds']:.1f} s in all, {result['trial_seconds']:.1f} s of training; "
        f"Ray results in {result['storage']}"
    )
    if result.get("run_id"):
        stdout.print(f"MLflow run {result['run_id']}")


def _tuned_cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_export(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(result)
        return
    parity = result["parity"]
    table = Table(title=f"ONNX parity ({'passed' if result['passed'] else 'FAILED'})")
    for column in ("graph", "checks", "max |ort - torch|", "max relative", "within tolerance"):
        table.add_column(column, justify="left" if column == "graph" else "right")
    for name, graph in parity["graphs"].items():
        sizes = ", ".join(f"B={c['batch']}" + (f" L={c['length']}" if "length" in c else "") for c in graph["checks"])
        table.add_row(
            name, sizes, f"{graph['max_abs_diff']:.2e}", f"{graph['max_rel_diff']:.2e}", _yes(graph["passed"])
        )
    stdout.print(table)
    retrieval = parity["retrieval"]
    keys = list(retrieval["metrics_torch"])
    compare = Table(title=f"retrieval on {retrieval['queries']:,} queries: PyTorch vs ONNX Runtime")
    compare.add_column("")
    for key in keys:
        compare.add_column(key, justify="right")
    compare.add_row("torch", *(f"{retrieval['metrics_torch'][k]:.4g}" for k in keys))
    compare.add_row("onnxruntime", *(f"{retrieval['metrics_onnx'][k]:.4g}" for k in keys))
    stdout.print(compare)
    stdout.print(
        f"top-10 lists identical for {100 * retrieval['top10_identical']:.1f}% of queries "
        f"({100 * retrieval['top10_equal_up_to_ties']:.1f}% up to near-ties); retrieval {_yes(retrieval['passed'])}"
    )
    if result["passed"]:
        where = f"bundle in [bold]{result['path']}[/]"
    else:
        where = f"parity gate FAILED, nothing deployed: bundle kept for inspection in [bold]{result['path']}[/]"
    stdout.print(f"{where} ({result['seconds']:.1f} s); MLflow run {result['export_run_id']}")


def print_bundle_check(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(result)
        return
    graphs = ", ".join(result["graphs"])
    stdout.print(
        f"bundle {result['path']} is valid: {graphs}; {len(result['files'])} files match their checksums "
        f"(from run {result['source_run_id']})"
    )


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"


def note(line: str) -> None:
    """One line of news on stderr (``--json`` keeps stdout clean)."""
    stderr.print(f"gssf: {line}", highlight=False, markup=False)


def print_pipeline(result: dict[str, Any], as_json: bool) -> None:
    """Each step (ran, cached or would run, and why), then the final model's metrics beside its bundle's."""
    from gssf_cli import metrics as registry

    if as_json:
        print_json(result)
        return
    dry = result["parent_run_id"] is None
    table = Table(title=f"pipeline {result['name']}" + (" (dry run: nothing ran)" if dry else ""))
    for column in ("stage", "status", "run", "seconds", "result", "why"):
        table.add_column(column)
    for stage in result["stages"]:
        summary = ", ".join(f"{k} {_short(v)}" for k, v in stage["summary"].items() if not isinstance(v, (dict, list)))
        table.add_row(
            stage["stage"],
            stage["status"],
            (stage["run_id"] or "")[:12],
            f"{stage['seconds']:.1f}",
            summary,
            stage.get("why", ""),
        )
    stdout.print(table)
    if dry:
        return
    metrics = result.get("metrics", {})
    for prefix, label in (("final_", "final model, test"), ("onnx_", "its ONNX bundle"), ("baseline_", "baseline")):
        shown = {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix)}
        headline = [k for names in registry.HEADLINE.values() for k in names if k in shown]
        if headline:
            stdout.print(f"{label}: " + ", ".join(f"{k} {shown[k]:.4g}" for k in headline))
    stdout.print(f"{result['seconds']:.1f} s; parent MLflow run {result['parent_run_id']}")


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
