"""What each command prints when it is done: a rich table for people, or with ``--json`` the same result as one
JSON document for scripts."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.table import Table

from gssf_cli.cli.console import print_json, stdout


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
    measured = _measured(result.get("dataset_info", {}), result.get("model_info", {}))
    if measured:
        stdout.print(measured, highlight=False, markup=False)
    if result.get("output"):
        stdout.print(f"results written to [bold]{result['output']}[/]")
    if result.get("run_id"):
        stdout.print(f"MLflow run {result['run_id']}")


def _measured(dataset: dict[str, Any], model: dict[str, Any]) -> str:
    """One line on what an evaluation measured: which model (or file), on which data."""
    if not dataset or not model:
        return ""
    if model.get("source") == "embeddings":
        return f"embeddings {model['path']} (sha256 {str(model['sha256'])[:12]}), {model['score']} scores"
    block = f", block size {model['block_size']}" if model.get("block_size") else ""
    epoch = f", best epoch {model['best_epoch']}" if model.get("best_epoch") is not None else ""
    return (
        f"model: {model.get('metric_head')} head{block} (D {model.get('embed_dim')}) of run "
        f"{model.get('train_run_id')}{epoch}; data: {dataset.get('name')} ({dataset.get('split')} split, manifest "
        f"sha256 {str(dataset.get('manifest_sha256'))[:12]})"
    )


def _is_metric(key: str) -> bool:
    from gssf_cli.core import metrics

    try:
        metrics.get(key)
    except KeyError:
        return False
    return True


def print_training(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(result)
        return
    table = Table(title=f"best epoch {result['best_epoch']} (validation {result['validation_metric']})")
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
    if result.get("model_id"):
        stdout.print(f"MLflow model models:/{result['model_id']} (load it with mlflow.pyfunc.load_model)")


def print_seeds(result: dict[str, Any], as_json: bool) -> None:
    """``gssf train --seeds``: per metric of the best epochs, mean ± sample std over the seeds, n, and each seed's
    value; then the runs."""
    if as_json:
        print_json(result)
        return
    runs = result["runs"]
    seeds = result["seeds"]
    table = Table(title=f"{len(seeds)} seeds, best epoch of each by validation {result['validation_metric']}")
    table.add_column("metric")
    table.add_column("mean ± std", justify="right")
    table.add_column("n", justify="right")
    for seed in seeds:
        table.add_column(f"seed {seed}", justify="right")
    for name, spread in result["summary"].items():
        digits = 4 if abs(spread["mean"]) < 10 else 2
        cells = [f"{r['metrics'][name]:.{digits}f}" for r in runs]
        table.add_row(name, f"{spread['mean']:.{digits}f} ± {spread['std']:.{digits}f}", str(spread["n"]), *cells)
    stdout.print(table)
    for seed, run in zip(seeds, runs, strict=True):
        stdout.print(f"seed {seed}: MLflow run {run['run_id']}, best epoch {run['best_epoch']}, {run['out_dir']}")
    if result.get("run_id"):
        stdout.print(f"MLflow run {result['run_id']} (the seeds together; compare groups with gssf compare)")


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
    table.add_column("status", no_wrap=True)
    for name in result["tuned"]:
        table.add_column(name, justify="right")
    table.add_column(metric, justify="right")
    table.add_column("epochs", justify="right")
    table.add_column("head params", justify="right")
    table.add_column("s", justify="right")
    table.add_column("MLflow run")
    errors = any(trial.get("error") for trial in result["trials"])
    if errors:
        table.add_column("error", overflow="fold")
    for rank, trial in enumerate(result["trials"], start=1):
        value = trial["metric"]
        table.add_row(
            str(rank),
            trial["trial_id"],
            trial["status"],
            *(_tuned_cell(trial["values"].get(name)) for name in result["tuned"]),
            "" if value is None else f"{value:.4g}",
            str(trial["epochs"]),
            "" if trial.get("head_params") is None else f"{trial['head_params']:,}",
            f"{trial['seconds']:.1f}",
            trial.get("run_id") or "",
            *([trial.get("error") or ""] if errors else []),
        )
    stdout.print(table)
    if result.get("configurations"):
        _print_configurations(result)
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


def _print_configurations(result: dict[str, Any]) -> None:
    """The tune summary per configuration across seeds: mean ± sample std and n of the finished trials."""
    metric = result["metric"]
    names = [n for n in result["tuned"] if n != "seed"]
    table = Table(title=f"{len(result['configurations'])} configurations across seeds, best mean first")
    table.add_column("#", justify="right")
    for name in names:
        table.add_column(name, justify="right")
    table.add_column(f"{metric} mean ± std", justify="right")
    table.add_column("n", justify="right")
    for rank, found in enumerate(result["configurations"], start=1):
        spread = found["metric"]
        cell = "" if spread is None else f"{spread['mean']:.4g} ± {spread['std']:.2g}"
        table.add_row(
            str(rank),
            *(_tuned_cell(found["values"].get(n)) for n in names),
            cell,
            "0" if spread is None else str(spread["n"]),
        )
    stdout.print(table)


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
    if result.get("model_id"):
        stdout.print(f"MLflow model models:/{result['model_id']} (mlflow.pyfunc.load_model serves it on ONNX Runtime)")
    if result.get("registered"):
        registered = result["registered"]
        stdout.print(f"registered as [bold]models:/{registered['name']}/{registered['version']}[/]")


def print_bundle_check(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(result)
        return
    graphs = ", ".join(result["graphs"])
    stdout.print(
        f"bundle {result['path']} is valid: {graphs}; {len(result['files'])} files match their checksums "
        f"(from run {result['source_run_id']})"
    )


def print_index(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(result)
        return
    from gssf_cli.core.files import format_bytes

    build = result["build"]
    table = Table(title=f"{result['kind']} index of {result['count']:,} vectors, D = {result['dim']}")
    for column in (
        "build s",
        "embed s",
        "vectors/s",
        "index size",
        *(("recall@10", "queries/s", "p50 ms") if result["eval"] else ()),
    ):
        table.add_column(column, justify="right")
    row = [f"{build['build_seconds']:.2f}", f"{build['embed_seconds']:.2f}", f"{build['vectors_per_second']:,.0f}",
           format_bytes(result["files"]["index.faiss"]["bytes"])]  # fmt: skip
    if result["eval"]:
        evaluation = result["eval"]
        row += [f"{evaluation['recall_at_10']:.4f}", f"{evaluation['queries_per_second']:,.0f}",
                f"{evaluation['latency_ms_p50']:.3f}"]  # fmt: skip
    table.add_row(*row)
    stdout.print(table)
    params = {**result["spec"]["build"], **result["spec"]["search"]}
    if params:
        stdout.print("parameters: " + ", ".join(f"{key} {value}" for key, value in params.items()), highlight=False)
    bundle = result["bundle"]
    stdout.print(f"index in [bold]{result['path']}[/], from bundle {bundle['digest'][:12]} (train run "
                 f"{bundle['source_run_id']}); MLflow run {result['run_id']}", highlight=False)  # fmt: skip


def print_search(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(result)
        return
    for query in result["queries"]:
        stdout.print(f"[bold]query:[/] {escape(query['query'])}", highlight=False)
        table = Table()
        for column in ("rank", "id", "score"):
            table.add_column(column, justify="left" if column == "id" else "right")
        for hit in query["results"]:
            table.add_row(str(hit["rank"]), escape(hit["id"]), f"{hit['score']:.4f}")
        stdout.print(table)


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"


def print_pipeline(result: dict[str, Any], as_json: bool) -> None:
    """Each step (ran, cached or would run, and why), then the final model's metrics beside its bundle's."""
    from gssf_cli.core import metrics as registry

    if as_json:
        print_json(result)
        return
    dry = result["dry_run"]
    all_cached = result["parent_run_id"] is None and not dry
    note = (
        " (dry run: nothing ran)" if dry else " (all cached: nothing ran, no MLflow run opened)" if all_cached else ""
    )
    table = Table(title=f"pipeline {result['name']}{note}")
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
    if not all_cached:
        stdout.print(f"{result['seconds']:.1f} s; parent MLflow run {result['parent_run_id']}")


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def print_comparison(result: dict[str, Any], as_json: bool) -> None:
    """One row per (metric, compared run): both values, the difference with its interval, the p-value and the
    verdict at the test's level; then what was compared on what, and how."""
    from gssf_cli.evaluation.comparison import format_p, format_value

    if as_json:
        print_json(result)
        return
    settings = result["settings"]
    confidence = round(100 * settings["confidence"])
    several = len(result["compared"]) > 1
    protocol = f", protocol {result['protocol']}" if result.get("protocol") else ""
    table = Table(
        title=f"{result['dataset']['name']}, {result['split']} split{protocol}: "
        f"{result['units']:,} paired units ({result['unit']})"
    )
    table.add_column("metric")
    if several:
        table.add_column("compared")
    for column in ("baseline", "compared" if not several else "value", "difference", f"{confidence}% CI", "p-value"):
        table.add_column(column, justify="right")
    table.add_column(f"at {100 - confidence:g}%")
    systems = {system["label"]: system for system in result["compared"]}
    previous = None
    for row in result["rows"]:
        metric = row["metric"]
        compared = systems.get(row["compared"], {})
        if several and previous is not None and row["compared"] != previous:
            table.add_section()
        previous = row["compared"]
        verdict = row["verdict"]
        style = {"better": "green", "worse": "red"}.get(verdict, "")
        table.add_row(
            metric,
            *([row["compared"]] if several else []),
            _across_runs(result["baseline"], metric, format_value(metric, row["baseline"])),
            _across_runs(compared, metric, format_value(metric, row["other"])),
            f"{row['difference']:+.4f}" if _fraction(metric) else f"{row['difference']:+.2f}",
            f"[{format_value(metric, row['ci_low'])}, {format_value(metric, row['ci_high'])}]",
            format_p(row["p_value"]),
            f"[{style}]{'significant, ' + verdict if verdict != 'n.s.' else 'n.s.'}[/]" if style else verdict,
        )
    stdout.print(table)
    _comparison_footer(result, several)


def _comparison_footer(result: dict[str, Any], several: bool) -> None:
    """Below the comparison table: the runs compared, how the interval and p were computed, what was not tested."""
    settings = result["settings"]
    baseline = result["baseline"]
    stdout.print(
        f"baseline: {baseline['label']} ({', '.join(run['run_id'] for run in baseline['runs'])})",
        highlight=False,
        markup=False,
    )
    if not several:
        other = result["compared"][0]
        stdout.print(
            f"compared: {other['label']} ({', '.join(run['run_id'] for run in other['runs'])})",
            highlight=False,
            markup=False,
        )
    stdout.print(
        f"difference = compared - baseline; paired bootstrap ({settings['bootstrap']:,} resamples of the units) "
        f"for the interval, paired sign-flip test ({settings['permutations']:,} permutations) for p; "
        f"seed {settings['seed']}",
        highlight=False,
        markup=False,
    )
    if result.get("not_tested"):
        stdout.print(f"not tested: {', '.join(result['not_tested'])} (medians are not means over units)")
    if result.get("run_id"):
        stdout.print(f"MLflow run {result['run_id']}")


def _across_runs(system: dict[str, Any], metric: str, mean: str) -> str:
    """A group's value: its mean ± the sample std over its runs (seeds), or the single run's value."""
    spread = system.get("spread", {}).get(metric)
    if not spread or spread["n"] < 2:
        return mean
    digits = 4 if _fraction(metric) else 2
    return f"{mean} ± {spread['std']:.{digits}f}"


def _fraction(metric: str) -> bool:
    from gssf_cli.core import metrics

    try:
        return metrics.get(metric).unit == "fraction"
    except KeyError:
        return False
