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


def main() -> None:
    """Console-script entry point."""
    app()
