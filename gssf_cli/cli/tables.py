"""What each command prints when it is done: a rich table for people, or with ``--json`` the same result as one
JSON document for scripts. Every table goes through :func:`_print_table`, which fits it to the terminal's width
without cutting a value."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Column, Table

from gssf_cli.cli.console import print_json, stdout


def _print_table(table: Table, keys: int = 1) -> None:
    """Print ``table`` within the terminal's width, every value whole.

    Why not rich's own fitting: a table too wide for the terminal has its widest columns narrowed whatever their
    words, and what no longer fits is cut with ``…`` (``compar…``, ``signi… better``, half a run id). Here every
    column keeps at least its longest word (a ``no_wrap`` column, for ids and labels: its longest value), cells
    wrap between words only, and the space left goes to the columns that want it most. A table whose columns
    cannot all fit so is printed in parts, one below the other, each repeating the first ``keys`` columns (the
    row's name), as a wide data frame is printed. Only a column that cannot fit even alone is folded.
    """
    console = stdout.console()
    spans = [_span(console, column) for column in table.columns]
    parts = _parts(table, spans, keys, console.width)
    for number, indices in enumerate(parts):
        widths = _widths([spans[i] for i in indices], console.width - _frame(table, len(indices)))
        console.print(_part(table, indices, widths, spans, first=number == 0, last=number == len(parts) - 1))


def _span(console: Console, column: Column) -> tuple[int, int]:
    """The narrowest a column can be without breaking a word (or, ``no_wrap``, a value), and its natural width."""
    measured = [Measurement.get(console, console.options, cell) for cell in (column.header, *column.cells)]
    widest = max(1, *(m.maximum for m in measured))
    return (widest if column.no_wrap else max(1, *(m.minimum for m in measured))), widest


def _frame(table: Table, columns: int) -> int:
    """What a table of ``columns`` columns takes beside its cells' text: their padding and the rules between them
    (and around them, with an edge)."""
    _, right, _, left = table.padding
    rules = (columns - 1 + (2 if table.show_edge else 0)) if table.box else 0
    return rules + columns * (left + right) - (0 if table.pad_edge else left + right)


def _parts(table: Table, spans: Sequence[tuple[int, int]], keys: int, width: int) -> list[list[int]]:
    """The columns of each part: as many as fit at their narrowest, the first ``keys`` in every part."""
    keys = min(keys, len(spans))
    lead = list(range(keys))
    parts: list[list[int]] = []
    current = list(lead)
    for index in range(keys, len(spans)):
        wider = [*current, index]
        if len(current) > keys and sum(spans[i][0] for i in wider) + _frame(table, len(wider)) > width:
            parts.append(current)
            wider = [*lead, index]
        current = wider
    return [*parts, current]


def _widths(spans: Sequence[tuple[int, int]], room: int) -> list[int]:
    """Column widths within ``room``: natural if they fit; else each at least its narrowest, and the rest of the
    room given a cell at a time to the column that needs the most lines for its text (natural / width), so that the
    rows stay as short as they can; if not even the narrowest fit, every column in proportion to its narrowest
    (the cells fold)."""
    lows, highs = [low for low, _ in spans], [high for _, high in spans]
    if sum(highs) <= room:
        return highs
    if sum(lows) > room:
        return [max(1, low * room // sum(lows)) for low in lows]
    widths = list(lows)
    for _ in range(room - sum(lows)):
        wanting = max(range(len(widths)), key=lambda i: (highs[i] / widths[i], highs[i] - widths[i]))
        widths[wanting] += 1
    return widths


def _part(
    table: Table,
    indices: Sequence[int],
    widths: Sequence[int],
    spans: Sequence[tuple[int, int]],
    *,
    first: bool,
    last: bool,
) -> Table:
    """The table of columns ``indices`` of ``table`` at ``widths``: its title on the first part, its caption on the
    last; a cell folds rather than being cut where a column had to be narrower than a word."""
    part = copy.copy(table)
    part.columns, part.rows = [], []
    part.title = table.title if first else None
    part.caption = table.caption if last else None
    for index, width in zip(indices, widths, strict=True):
        column = table.columns[index]
        part.add_column(
            column.header,
            column.footer,
            header_style=column.header_style,
            footer_style=column.footer_style,
            style=column.style,
            justify=column.justify,
            vertical=column.vertical,
            overflow="fold",
            width=width,
            no_wrap=column.no_wrap and width >= spans[index][1],
            highlight=column.highlight,
        )
    cells = zip(*(list(table.columns[index].cells) for index in indices), strict=True)
    for row, values in zip(table.rows, cells, strict=True):
        part.add_row(*values, style=row.style, end_section=row.end_section)
    return part


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
    _print_table(table)
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
        _print_table(table)
        stdout.print(f"rSum {result['rsum']:.2f}   i2t mAP {result['i2t_map']:.2f}")
        for title, directions in EXTRA_TABLES:
            _print_directions(result, title, directions)
        for side, source in (result.get("intra_modal") or {}).items():
            what = "image→image" if side == "i2i" else "text→text"
            stdout.print(
                f"{what}: relevant = {source}"
                if source
                else f"{what}: not measured, the dataset says nothing of what is "
                "relevant among its items (generated data records concepts)",
                highlight=False,
            )
        if len(result.get("folds", [])) > 1:
            folds = "  ".join(f"{fold['rsum']:.1f}" for fold in result["folds"])
            stdout.print(f"rSum per fold: {folds}")
        if result.get("shortlist"):
            stdout.print(_shortlist_line(result["shortlist"]), highlight=False, markup=False)
    else:
        table = Table(title=f"label-based retrieval ({sizes})")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key, value in result.items():
            if isinstance(value, float) and _is_metric(key):
                table.add_row(key, f"{value:.4f}")
        _print_table(table)
        if result.get("num_skipped"):
            stdout.print(f"{result['num_skipped']:.0f} queries had no relevant item and were skipped")
    measured = _measured(result.get("dataset_info", {}), result.get("model_info", {}))
    if measured:
        stdout.print(measured, highlight=False, markup=False)
    if result.get("output"):
        stdout.print(f"results written to [bold]{result['output']}[/]")
    if result.get("run_id"):
        stdout.print(f"MLflow run {result['run_id']}")


EXTRA_TABLES: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("ECCV Caption (machine- and human-verified positives)", (("eccv_i2t", "image→text"), ("eccv_t2i", "text→image"))),
    ("CxC (Crisscrossed Captions positives)", (("cxc_i2t", "image→text"), ("cxc_t2i", "text→image"))),
    ("intra-modal retrieval", (("i2i", "image→image"), ("t2t", "text→text"))),
)
"""Metrics an evaluation may add beside the cross-modal table: by the stricter COCO protocols (``--protocol eccv``,
``cxc``) and within one modality (where the dataset says what is relevant), each a table of its directions."""
COLUMN_LABELS = {"rprecision": "R-P", "map_at_r": "mAP@R"}


def _print_directions(result: dict[str, Any], title: str, directions: tuple[tuple[str, str], ...]) -> None:
    """A table of the metrics named ``{direction}_{column}`` in ``result`` (``r1`` → R@1, ``map_at_r`` → mAP@R), when
    there are any."""
    columns = list(dict.fromkeys(key.removeprefix(f"{prefix}_") for prefix, _ in directions for key in result
                                 if key.startswith(f"{prefix}_") and isinstance(result[key], float)))  # fmt: skip
    if not columns:
        return
    table = Table(title=title)
    table.add_column("direction")
    for column in columns:
        label = COLUMN_LABELS.get(column, f"R@{column[1:]}" if column[1:].isdigit() else column)
        table.add_column(label, justify="right")
    for prefix, label in directions:
        values = [result.get(f"{prefix}_{column}") for column in columns]
        if any(v is not None for v in values):
            table.add_row(label, *("" if v is None else f"{v:.2f}" for v in values))
    _print_table(table)


def _shortlist_line(shortlist: dict[str, Any]) -> str:
    """What a shortlist evaluation is and missed, e.g. ``approximate: ... missed 54 of 1,000 (image→text) ...``."""
    missed = ", ".join(
        f"{shortlist['missed_top10'][d]:,} of {shortlist['of_top10'][d]:,} ({d}, {n:,} queries)"
        for d, n in shortlist["audited_queries"].items()
    )
    return (
        f"approximate: the top {shortlist['k']} by pooled embeddings re-scored by the interaction; "
        f"exact top-10 items it missed: {missed}"
    )


def _measured(dataset: dict[str, Any], model: dict[str, Any]) -> str:
    """One line on what an evaluation measured: which model (or file), on which data."""
    if not dataset or not model:
        return ""
    if model.get("source") == "embeddings":
        return f"embeddings {model['path']} (sha256 {str(model['sha256'])[:12]}), {model['score']} scores"
    block = f", block size {model['block_size']}" if model.get("block_size") else ""
    interaction = model.get("interaction", {}).get("kind", "none")
    if interaction != "none":
        block += f", {interaction} interaction"
    epoch = f", best epoch {model['best_epoch']}" if model.get("best_epoch") is not None else ""
    classes = f" of classes {dataset['classes']} in training" if dataset.get("classes") else ""
    return (
        f"model: {model.get('metric_head')} head{block} (D {model.get('embed_dim')}) of run "
        f"{model.get('train_run_id')}{epoch}; data: {dataset.get('name')} ({dataset.get('split')} split{classes}, manifest "
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
    _print_table(table)
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
    _print_table(table)
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
    table.add_column("trial", no_wrap=True)
    table.add_column("status", no_wrap=True)
    for name in result["tuned"]:
        table.add_column(name, justify="right")
    table.add_column(metric, justify="right")
    table.add_column("epochs", justify="right")
    table.add_column("head params", justify="right")
    table.add_column("s", justify="right")
    table.add_column("MLflow run", no_wrap=True)
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
    _print_table(table)
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
    _print_table(table)


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
        sizes = ", ".join(_check_size(c) for c in graph["checks"])
        table.add_row(
            name, sizes, f"{graph['max_abs_diff']:.2e}", f"{graph['max_rel_diff']:.2e}", _yes(graph["passed"])
        )
    _print_table(table)
    retrieval = parity["retrieval"]
    compare = Table(title=f"retrieval on {retrieval['queries']:,} queries: PyTorch vs ONNX Runtime")
    for column in ("metric", "torch", "onnxruntime", "same"):
        compare.add_column(column, justify="left" if column == "metric" else "right")
    different = set(retrieval.get("metrics_different", []))
    for key, value in retrieval["metrics_torch"].items():
        same = "up to ties" if key in different else "yes"
        compare.add_row(key, f"{value:.6g}", f"{retrieval['metrics_onnx'][key]:.6g}", same)
    _print_table(compare)
    changed = retrieval.get("relevant_ranks_changed")
    ranks = (
        ""
        if changed is None
        else (
            f"; {changed} relevant item(s) moved, {retrieval['relevant_ranks_changed_beyond_ties']} beyond float32 ties"
        )
    )
    stdout.print(
        f"top-10 lists identical for {100 * retrieval['top10_identical']:.1f}% of queries "
        f"({100 * retrieval['top10_equal_up_to_ties']:.1f}% up to near-ties){ranks}; retrieval "
        f"{_yes(retrieval['passed'])}"
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


def _check_size(check: dict[str, Any]) -> str:
    """A parity check's input size: ``B=16 L=12`` for a tower, ``8×5 R=11 L=9`` (images × captions) for a scorer."""
    if "batch" not in check:
        return f"{check['images']}×{check['captions']} R={check['regions']} L={check['length']}"
    return f"B={check['batch']}" + (f" L={check['length']}" if "length" in check else "")


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

    build, evaluation = result["build"], result["eval"]
    regions = result.get("regions_per_image")
    what = f"{result['count']:,} vectors" if regions is None else f"{result['count']:,} images × {regions} regions"
    tokens = "" if regions is None else "token "
    table = Table(title=f"{result['kind']} {tokens}index of {what}, D = {result['dim']}")
    late = regions is not None
    for column in (
        "build s",
        "embed s",
        "vectors/s",
        "index size",
        *(
            (("recall@10", "queries/s", "× exact") if late else ("recall@10", "queries/s", "p50 ms"))
            if evaluation
            else ()
        ),
    ):
        table.add_column(column, justify="right")
    row = [f"{build['build_seconds']:.2f}", f"{build['embed_seconds']:.2f}", f"{build['vectors_per_second']:,.0f}",
           format_bytes(result["files"]["index.faiss"]["bytes"])]  # fmt: skip
    if evaluation:
        last = f"{evaluation['speedup_over_exact']:.1f}" if late else f"{evaluation['latency_ms_p50']:.3f}"
        row += [f"{evaluation['recall_at_10']:.4f}", f"{evaluation['queries_per_second']:,.0f}", last]
    table.add_row(*row)
    _print_table(table)
    params = {**result["spec"]["build"], **result["spec"]["search"], **result.get("late_interaction", {})}
    if params:
        stdout.print("parameters: " + ", ".join(f"{key} {value}" for key, value in params.items()), highlight=False)
    bundle = result["bundle"]
    stdout.print(f"index in [bold]{result['path']}[/], from bundle {bundle['digest'][:12]} (train run "
                 f"{bundle['source_run_id']}); MLflow run {result['run_id']}", highlight=False)  # fmt: skip
    if result.get("model_id"):
        stdout.print(f"search model models:/{result['model_id']} (mlflow models serve answers captions with it)",
                     highlight=False)  # fmt: skip
    if result.get("registered"):
        registered = result["registered"]
        stdout.print(f"registered as [bold]models:/{registered['name']}/{registered['version']}[/] "
                     f"(alias {registered['alias']})", highlight=False)  # fmt: skip


def print_search(result: dict[str, Any], as_json: bool) -> None:
    """Per query, its hits: rank, id, score, and when the index has them the hit's own captions, one a line, so
    that a person can see whether the hits show what the query asks for."""
    if as_json:
        print_json(result)
        return
    for query in result["queries"]:
        stdout.print(f"[bold]query:[/] {escape(query['query'])}", highlight=False)
        captioned = any("captions" in hit for hit in query["results"])
        table = Table()
        for column in ("rank", "id", "score", *(("captions",) if captioned else ())):
            table.add_column(column, justify="right" if column in ("rank", "score") else "left")
        for hit in query["results"]:
            captions = ("\n".join(escape(line) for line in hit.get("captions", ())),) if captioned else ()
            table.add_row(str(hit["rank"]), escape(hit["id"]), f"{hit['score']:.4f}", *captions)
        _print_table(table, keys=2)
    evaluation = result.get("eval")
    if evaluation:
        stdout.print(
            f"recall@10 against exact search over the whole gallery: {evaluation['recall_at_10']:.4f} "
            f"({evaluation['queries']:,} queries; {evaluation['candidates_per_query']:,.1f} images re-scored per "
            f"query, per_word {evaluation['per_word']}; {evaluation['queries_per_second']:,.0f} queries/s, "
            f"{evaluation['speedup_over_exact']:.1f}× exact search's)",
            highlight=False,
        )


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
    rows = []
    for stage in result["stages"]:
        shown = {k: v for k, v in stage["summary"].items() if k not in _UNSHOWN and not isinstance(v, (dict, list))}
        on = f"{stage['summary']['on']}: " if stage["summary"].get("on") else ""
        summary = on + ", ".join(f"{k} {_short(v)}" for k, v in shown.items())
        cells = (stage["stage"], stage["status"], (stage["run_id"] or "")[:12], f"{stage['seconds']:.1f}", summary)
        rows.append((*cells, stage.get("why", "")))
    columns = ("stage", "status", "run", "seconds", "result", "why")
    kept = [i for i, name in enumerate(columns) if name not in ("seconds", "why") or any(_said(r[i]) for r in rows)]
    for i in kept:
        table.add_column(columns[i], no_wrap=columns[i] in ("stage", "status", "run"))
    for row in rows:
        table.add_row(*(row[i] for i in kept))
    _print_table(table)
    if dry:
        return
    metrics = result.get("metrics", {})
    tested = next((s["summary"].get("on") for s in result["stages"] if s["stage"] == "evaluate"), None) or "test"
    for prefix, label in (
        ("final_", f"final model, {tested}"),
        ("onnx_", "its ONNX bundle"),
        ("baseline_", "baseline"),
    ):
        shown = {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix)}
        headline = [k for names in registry.HEADLINE.values() for k in names if k in shown]
        if headline:
            stdout.print(f"{label}: " + ", ".join(f"{k} {shown[k]:.4g}" for k in headline))
    for line in _pipeline_answers(result):
        stdout.print(line)
    if not all_cached:
        stdout.print(f"{result['seconds']:.1f} s; parent MLflow run {result['parent_run_id']}")


def _pipeline_answers(result: dict[str, Any]) -> list[str]:
    """Which setting won the tune (against the other trials), and whether the final model beats the baseline by
    the paired test of ``gssf compare``: the two questions a tuned pipeline is run to answer."""
    lines = []
    tuned = result.get("tuned")
    if tuned:
        won = ", ".join(f"{k} = {v}" for k, v in tuned["values"].items())
        rest = [t for t in tuned["trials"] if t["values"] != tuned["values"] and t["metric"] is not None]
        others = "".join(f"; {', '.join(str(v) for v in t['values'].values())}: {t['metric']:.4g}" for t in rest)
        lines.append(f"tune: {won} won ({tuned['on']} {tuned['metric']} {tuned['value']:.4g} in its trial{others})")
    test = result.get("verdict")
    if test:
        lines.append(f"final vs baseline, paired over {test['units']:,} test units ({test['unit']}): {test['line']}")
    return lines


_UNSHOWN = ("on", "best_config")
"""Summary keys the pipeline table does not list as ``key value``: the split (it leads the cell) and the tune's
best config file (a long path; ``--json`` has it, and ``won`` says what it holds)."""


def _said(cell: str) -> bool:
    """Whether a cell says anything: a column of empty reasons or zero seconds (a dry run) is left out."""
    return cell not in ("", "0.0")


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def print_comparison(result: dict[str, Any], as_json: bool) -> None:
    """What was compared on what; then a table per compared group, against the baseline: for each metric both
    values, the difference with its interval, the p-value and the verdict at the test's level; then the runs of
    each group and how the interval and p were computed."""
    from gssf_cli.evaluation.comparison import format_p, format_value

    if as_json:
        print_json(result)
        return
    confidence = round(100 * result["settings"]["confidence"])
    protocol = f", protocol {result['protocol']}" if result.get("protocol") else ""
    stdout.print(
        f"{result['dataset']['name']}, {result['split']} split{protocol}: {result['units']:,} paired units "
        f"({result['unit']})",
        highlight=False,
        markup=False,
    )
    baseline = result["baseline"]
    for system in result["compared"]:
        table = Table(title=f"{escape(system['label'])} vs baseline {escape(baseline['label'])}")
        table.add_column("metric", no_wrap=True)
        for column in ("baseline", "compared", f"difference [{confidence}% CI]", "p-value"):
            table.add_column(column, justify="right")
        table.add_column(f"at {100 - confidence:g}%")
        for row in (row for row in result["rows"] if row["compared"] == system["label"]):
            metric, verdict = row["metric"], row["verdict"]
            difference = f"{row['difference']:+.4f}" if _fraction(metric) else f"{row['difference']:+.2f}"
            interval = f"[{format_value(metric, row['ci_low'])}, {format_value(metric, row['ci_high'])}]"
            style = {"better": "green", "worse": "red"}.get(verdict)
            table.add_row(
                metric,
                _across_runs(baseline, metric, format_value(metric, row["baseline"])),
                _across_runs(system, metric, format_value(metric, row["other"])),
                f"{difference} {escape(interval)}",
                format_p(row["p_value"]),
                f"[{style}]{verdict}[/]" if style else verdict,
            )
        _print_table(table)
    _comparison_footer(result)


def _comparison_footer(result: dict[str, Any]) -> None:
    """Below the comparison tables: the runs of each group, how the interval and p were computed, what was not
    tested."""
    settings = result["settings"]
    for role, system in (("baseline", result["baseline"]), *(("compared", other) for other in result["compared"])):
        stdout.print(
            f"{role}: {system['label']} ({', '.join(run['run_id'] for run in system['runs'])})",
            highlight=False,
            markup=False,
        )
    stdout.print(
        f"difference = compared - baseline; paired bootstrap ({settings['bootstrap']:,} resamples of the units) "
        f"for the interval, paired sign-flip test ({settings['permutations']:,} permutations) for p; "
        f"seed {settings['seed']}; better or worse: significant at the level, else n.s.",
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
