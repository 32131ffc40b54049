"""The ``gssf`` command: thin Typer wiring (parse → build a config → call a stage → print).

Heavy libraries (torch, mlflow, ray, onnx) are imported inside the commands that need them, so that
``gssf --help`` starts fast.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from gssf_cli import __version__
from gssf_cli.errors import CheckFailedError, UserInputError

T = TypeVar("T")

app = typer.Typer(
    name="gssf",
    help="Experiment orchestrator for cross-modal metric learning with GSSF. Every stage is an MLflow run.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@dataclass
class GlobalOptions:
    tracking_uri: str | None = None
    experiment: str | None = None
    debug: bool = False

    def tracker(self) -> Any:
        from gssf_cli.tracking import Tracker

        return Tracker(self.tracking_uri, self.experiment)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"gssf {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    ctx: typer.Context,
    tracking_uri: Annotated[
        str | None,
        typer.Option(
            "--tracking-uri",
            help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here).",
        ),
    ] = None,
    experiment: Annotated[
        str | None, typer.Option("--experiment", help="MLflow experiment name (default: gssf).")
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    ctx.obj = GlobalOptions(tracking_uri, experiment, debug or os.environ.get("GSSF_DEBUG") == "1")


def _options(ctx: typer.Context) -> GlobalOptions:
    return ctx.obj if isinstance(ctx.obj, GlobalOptions) else GlobalOptions()


def guarded(ctx: typer.Context, work: Callable[[], T]) -> T:
    """Run ``work`` turning known failures into one line on stderr and the contract's exit codes."""
    debug = _options(ctx).debug
    try:
        return work()
    except UserInputError as exc:
        if debug:
            raise
        _error(f"error: {exc}")
        raise typer.Exit(2) from None
    except CheckFailedError as exc:
        if debug:
            raise
        _error(f"check failed: {exc}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        _error("interrupted")
        raise typer.Exit(130) from None
    except Exception as exc:
        if debug:
            raise
        _error(f"internal error: {type(exc).__name__}: {exc} (re-run with --debug for the traceback)")
        raise typer.Exit(1) from None


def _error(message: str) -> None:
    first_line = " ".join(str(message).split("\n")[0].split())
    print(f"gssf: {first_line}", file=sys.stderr)


JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of a table.")]
ConfigOption = Annotated[
    Path | None, typer.Option("--config", help="TOML file with settings; command-line flags override it.")
]


@app.command()
def prepare(
    ctx: typer.Context,
    dataset: Annotated[
        str | None, typer.Option("--dataset", help="Kind: synthetic | digits | precomp | features.")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Dataset folder to create, e.g. data/syn.")] = None,
    source: Annotated[Path | None, typer.Option("--source", help="Input folder or file (precomp, features).")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (generation and splits).")] = None,
    force: Annotated[bool | None, typer.Option("--force", help="Replace an existing output folder.")] = None,
    train_images: Annotated[int | None, typer.Option(help="synthetic: train images.")] = None,
    dev_images: Annotated[int | None, typer.Option(help="synthetic: dev images.")] = None,
    test_images: Annotated[int | None, typer.Option(help="synthetic: test images.")] = None,
    regions: Annotated[int | None, typer.Option(help="synthetic: regions per image.")] = None,
    region_dim: Annotated[int | None, typer.Option(help="synthetic: region feature size.")] = None,
    concepts: Annotated[int | None, typer.Option(help="synthetic: latent concepts.")] = None,
    vocab_size: Annotated[int | None, typer.Option(help="synthetic: vocabulary size.")] = None,
    captions_per_image: Annotated[int | None, typer.Option(help="Captions per image (5 for COCO/F30K).")] = None,
    min_word_count: Annotated[int | None, typer.Option(help="precomp: minimum count of a vocabulary word.")] = None,
    dev_fraction: Annotated[float | None, typer.Option(help="features/digits: share of data for dev.")] = None,
    test_fraction: Annotated[float | None, typer.Option(help="features: share of data for test.")] = None,
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """Turn a source into a dataset folder (manifest + split arrays), logged as an MLflow run."""
    cli = {k: v for k, v in locals().items() if k not in ("ctx", "config", "json_output")}

    def work() -> Any:
        from gssf_cli.config import PrepareConfig, load_toml, resolve
        from gssf_cli.stages import prepare as stage

        file_values = load_toml(config) if config else {}
        resolved = resolve(PrepareConfig, "prepare", file_values, cli)
        return stage.run(resolved, _options(ctx).tracker())

    result = guarded(ctx, work)
    from gssf_cli import console

    console.print_prepare(result.to_json(), json_output)


@app.command()
def evaluate(
    ctx: typer.Context,
    embeddings: Annotated[
        Path | None,
        typer.Option(
            "--embeddings",
            help=".npz with images+texts (cross-modal), features+labels, or queries/query_labels/gallery/gallery_labels.",
        ),
    ] = None,
    run: Annotated[
        str | None, typer.Option("--run", help="A trained run (id or 'latest'): evaluate it on its dataset.")
    ] = None,
    data: Annotated[Path | None, typer.Option("--data", help="With --run: use this dataset folder instead.")] = None,
    protocol: Annotated[str | None, typer.Option(help="all | f30k-1k | coco-1k | coco-5k (cross-modal).")] = None,
    split: Annotated[
        str | None, typer.Option(help="Use {split}_-prefixed keys of the file (default: test if present).")
    ] = None,
    k: Annotated[str | None, typer.Option("--k", help="Cut-offs for R@K, e.g. 1,5,10.")] = None,
    metric: Annotated[str | None, typer.Option(help="cosine (L2-normalise first) or dot.")] = None,
    memory_budget_mb: Annotated[int | None, typer.Option(help="Memory for score chunks, MiB.")] = None,
    plots: Annotated[bool | None, typer.Option("--plots/--no-plots", help="Log plots to MLflow.")] = None,
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """Retrieval metrics (R@K, rSum, mAP / MAP@R, P@1) for embeddings or a trained run, logged to MLflow."""

    def work() -> Any:
        from gssf_cli.config import EvaluateConfig, load_toml, parse_int_list, resolve
        from gssf_cli.stages import evaluate as stage

        cli = {
            "embeddings": embeddings,
            "run": run,
            "data": data,
            "protocol": protocol,
            "split": split,
            "ks": parse_int_list(k, "--k"),
            "metric": metric,
            "memory_budget_mb": memory_budget_mb,
            "plots": plots,
        }
        resolved = resolve(EvaluateConfig, "evaluate", load_toml(config) if config else {}, cli)
        return stage.run(resolved, _options(ctx).tracker())

    result = guarded(ctx, work)
    from gssf_cli import console

    console.print_evaluation(result.to_json(), json_output)


@app.command()
def train(
    ctx: typer.Context,
    data: Annotated[Path | None, typer.Option("--data", help="Dataset folder from `gssf prepare`.")] = None,
    metric: Annotated[str | None, typer.Option(help="cosine | diag | bdiag | dense | gssf.")] = None,
    block_size: Annotated[int | None, typer.Option(help="Block size d for bdiag/gssf (divides --embed-dim).")] = None,
    metric_norm: Annotated[str | None, typer.Option(help="Score normalisation: none | frobenius | spectral.")] = None,
    embed_dim: Annotated[int | None, typer.Option(help="Embedding size D.")] = None,
    word_dim: Annotated[int | None, typer.Option(help="Word embedding size.")] = None,
    pooling: Annotated[str | None, typer.Option(help="Region pooling: mean | max | attention.")] = None,
    mlp: Annotated[bool | None, typer.Option("--mlp/--no-mlp", help="2-layer MLP residual on projections.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Pairs per batch.")] = None,
    lr: Annotated[float | None, typer.Option(help="AdamW learning rate.")] = None,
    lr_decay_epoch: Annotated[int | None, typer.Option(help="Epoch from which lr is multiplied by --lr-decay.")] = None,
    lr_decay: Annotated[float | None, typer.Option(help="Learning-rate decay factor.")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="Weight decay of the metric head.")] = None,
    warmup_epochs: Annotated[int | None, typer.Option(help="Epochs summing over all negatives first.")] = None,
    margin: Annotated[float | None, typer.Option(help="Hinge margin.")] = None,
    loss: Annotated[str | None, typer.Option(help="triplet | infonce.")] = None,
    temperature: Annotated[float | None, typer.Option(help="InfoNCE temperature.")] = None,
    distill_weight: Annotated[float | None, typer.Option(help="Structure-aware distillation weight (0 = off).")] = None,
    distill_kind: Annotated[str | None, typer.Option(help="Distillation distance: mae | mse.")] = None,
    distill_use_metric: Annotated[
        bool | None,
        typer.Option("--distill-use-metric/--distill-use-cosine", help="Relations from the learned metric."),
    ] = None,
    teacher: Annotated[
        Path | None, typer.Option(help="Teacher features .npz (images, texts) for the train split.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda.")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch (0 = default).")] = None,
    resume: Annotated[
        str | None, typer.Option("--resume", help="Continue a run (id or 'latest') from its checkpoint.")
    ] = None,
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """Train encoders and a GSSF metric head; checkpoints every epoch, validation on dev, logged to MLflow."""
    cli = {k: v for k, v in locals().items() if k not in ("ctx", "config", "json_output", "resume")}

    def work() -> Any:
        from gssf_cli.config import TrainConfig, load_toml, resolve
        from gssf_cli.stages import train as stage

        options = _options(ctx)
        tracker = options.tracker()
        file_values = load_toml(config) if config else {}
        resume_id = None
        if resume is not None:
            resume_id = tracker.get_run(resume, stage="train").info.run_id
            file_values = {**stage.saved_config(resume_id, cli.get("runs_dir")), **file_values}
        resolved = resolve(TrainConfig, "train", file_values, cli)
        return stage.run(resolved, tracker, resume=resume_id, progress=not json_output)

    result = guarded(ctx, work)
    from gssf_cli import console

    console.print_training(result.to_json(), json_output)


@app.command()
def tune(
    ctx: typer.Context,
    param: Annotated[
        list[str] | None,
        typer.Option(
            "--param",
            help="Parameter to tune, repeatable: NAME=SPEC, or NAME with --values. SPEC: A,B,C (grid) | LO:HI | "
            "LO:HI:log; block_size also divisors | divisors:LO:HI (of the embedding size; NAME alone = divisors).",
        ),
    ] = None,
    values: Annotated[
        str | None, typer.Option("--values", help="SPEC for the single --param NAME, e.g. 8,16,32.")
    ] = None,
    data: Annotated[Path | None, typer.Option("--data", help="Dataset folder from `gssf prepare`.")] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", help="Base train config TOML (as `gssf train --config` reads it) for every trial."),
    ] = None,
    base: Annotated[
        list[str] | None,
        typer.Option("--base", help="Base train setting KEY=VALUE, repeatable, e.g. --base metric=bdiag."),
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(help="Epochs per trial (the budget ASHA stops weak trials before).")
    ] = None,
    metric: Annotated[
        str | None,
        typer.Option("--metric", help="Metric to optimise (default: rsum cross-modal, map_at_r label-based; or loss)."),
    ] = None,
    mode: Annotated[str | None, typer.Option(help="max | min (default: what the metric means).")] = None,
    trials: Annotated[
        int | None, typer.Option(help="Samples: each grid point runs once per sample (default 1 grid, 8 ranges).")
    ] = None,
    scheduler: Annotated[str | None, typer.Option(help="asha (stop weak trials early) | fifo.")] = None,
    grace_period: Annotated[int | None, typer.Option(help="ASHA: epochs before a trial may be stopped.")] = None,
    reduction_factor: Annotated[int | None, typer.Option(help="ASHA: keep the best 1/N at each rung.")] = None,
    cpus_per_trial: Annotated[int | None, typer.Option(help="CPUs (and torch threads) per trial.")] = None,
    max_concurrent: Annotated[
        int | None, typer.Option(help="Trials running at once (0 = as many as the CPUs allow).")
    ] = None,
    max_failures: Annotated[int | None, typer.Option(help="Retries of a crashed trial from its checkpoint.")] = None,
    address: Annotated[
        str | None,
        typer.Option("--address", help="Join a running Ray cluster (HOST:6379 or ray://HOST:10001) instead."),
    ] = None,
    storage: Annotated[
        str | None, typer.Option("--storage", help="Ray results and trial checkpoints (default .gssf/ray; or a URI).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the random search (ranges).")] = None,
    json_output: JsonOption = False,
) -> None:
    """Search train settings (e.g. the block size) with Ray Tune; one MLflow child run per trial, best config."""

    def work() -> Any:
        from gssf_cli.config import TuneConfig, resolve
        from gssf_cli.stages import tune as stage
        from gssf_cli.tuning import combine_param_options

        cli = {
            "params": combine_param_options(param or [], values),
            "data": data,
            "base": tuple(base or ()),
            "base_config": config,
            "epochs": epochs,
            "metric": metric,
            "mode": mode,
            "trials": trials,
            "scheduler": scheduler,
            "grace_period": grace_period,
            "reduction_factor": reduction_factor,
            "cpus_per_trial": cpus_per_trial,
            "max_concurrent": max_concurrent,
            "max_failures": max_failures,
            "address": address,
            "storage": storage,
            "seed": seed,
        }
        resolved = resolve(TuneConfig, "tune", {}, cli)
        return stage.run(resolved, _options(ctx).tracker(), progress=not json_output)

    result = guarded(ctx, work)
    from gssf_cli import console

    console.print_tune(result.to_json(), json_output)


@app.command()
def export(
    ctx: typer.Context,
    onnx: Annotated[bool, typer.Option("--onnx", help="Export ONNX graphs (the only format; required).")] = False,
    check: Annotated[
        Path | None, typer.Option("--check", help="Verify an existing bundle (checksums, checker, loading) instead.")
    ] = None,
    run: Annotated[str | None, typer.Option("--run", help="The trained run: id or 'latest'.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Bundle folder (default exports/<run id>).")] = None,
    opset: Annotated[int | None, typer.Option(help="ONNX opset (dynamo exporter, 18-23).")] = None,
    atol: Annotated[float | None, typer.Option(help="Parity: absolute tolerance.")] = None,
    rtol: Annotated[float | None, typer.Option(help="Parity: relative tolerance.")] = None,
    split: Annotated[str | None, typer.Option(help="Dataset split for the parity check (default test).")] = None,
    force: Annotated[bool | None, typer.Option("--force", help="Replace an existing bundle.")] = None,
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """Export a run as ONNX (encoders + metric head), gated by an ONNX Runtime parity check (exit 1 if outside)."""

    def work() -> Any:
        from gssf_cli.config import ExportConfig, load_toml, resolve
        from gssf_cli.stages import export as stage

        if check is not None:
            return stage.verify_bundle(check)
        if not onnx:
            raise UserInputError("pass --onnx (ONNX is the export format gssf writes)")
        cli = {"run": run, "out": out, "opset": opset, "atol": atol, "rtol": rtol, "split": split, "force": force}
        resolved = resolve(ExportConfig, "export", load_toml(config) if config else {}, cli)
        return stage.run(resolved, _options(ctx).tracker())

    result = guarded(ctx, work)
    from gssf_cli import console

    if isinstance(result, dict):
        console.print_bundle_check(result, json_output)
        return
    console.print_export(result.to_json(), json_output)
    if not result.passed:
        _error("check failed: ONNX Runtime outputs are outside the parity tolerance (see the table)")
        raise typer.Exit(1)


@app.command("run")
def run_pipeline(
    ctx: typer.Context,
    pipeline: Annotated[Path, typer.Argument(help="Pipeline file, e.g. pipelines/quickstart.toml.")],
    force: Annotated[bool, typer.Option("--force", help="Re-run every stage even if cached.")] = False,
    json_output: JsonOption = False,
) -> None:
    """Run a pipeline file: prepare → train → evaluate → tune → export under one parent MLflow run."""

    def work() -> Any:
        from gssf_cli.stages import pipeline as stage

        options = _options(ctx)
        if not pipeline.is_file():
            raise UserInputError(f"pipeline file {pipeline} not found (see pipelines/ for examples)")
        if options.experiment is None:
            options.experiment = stage.load_pipeline(pipeline).name
        return stage.run(pipeline, options.tracker(), force=force, progress=not json_output)

    result = guarded(ctx, work)
    from gssf_cli import console

    console.print_pipeline(result.to_json(), json_output)


def main() -> None:
    """Console-script entry point."""
    app()
