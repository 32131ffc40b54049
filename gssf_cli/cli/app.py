"""The ``gssf`` command: thin Typer wiring (parse → build a config → call a stage → print).

A stage command's setting flags are generated from its config dataclass in :mod:`gssf_cli.core.config`
(:func:`gssf_cli.cli.options.config_flags`): one flag per field, spelled ``--field-name`` unless the field's ``flag``
metadata spells it, with the field's help and default; only ``file_only`` fields have none. Adding a setting to
a config therefore adds its flag, with no edit here. A generated flag is None when not given, which lets :func:`gssf_cli.core.config.resolve` apply the
precedence CLI > TOML file > dataclass default.

Heavy libraries (torch, mlflow, ray, onnx) are imported inside the commands that need them, so that
``gssf --help`` starts fast; :mod:`gssf_cli.core.config` imports only the standard library.

Command-line conventions (the contract scripts rely on): exit 0 success, 1 the work ran but failed its own check
(or an internal error), 2 bad usage or bad input, 130 interrupted (Ctrl-C, SIGTERM). Every error is one line on
stderr, ``gssf: error: ...`` (usage errors add ``(see gssf CMD --help)``); with ``--json`` it is also one JSON
object ``{"error", "kind", "exit_code"}`` on stdout, so stdout always holds exactly one JSON document. The
machinery for this lives in :class:`gssf_cli.cli.options.Group` (usage errors) and :func:`gssf_cli.cli.options.guarded` (errors of the work).
"""

from __future__ import annotations

import functools
import inspect
import os
import signal
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from gssf_cli import __version__
from gssf_cli.cli.options import (
    Command,
    Failure,
    Group,
    Settings,
    config_flags,
    guarded,
    report,
    with_default,
)
from gssf_cli.core.config import field_value, load_toml, resolve
from gssf_cli.core.errors import UserInputError
from gssf_cli.core.stage_configs import (
    RUN_REF,
    CompareConfig,
    EvaluateConfig,
    ExportConfig,
    IndexConfig,
    PrepareConfig,
    SearchConfig,
    TrainConfig,
    TuneConfig,
)

T = TypeVar("T")
C = TypeVar("C")


# ---------------------------------------------------------------------------------------------------------
# The app, its global options, and how every error is reported


app = typer.Typer(
    name="gssf",
    help="Experiment orchestrator for cross-modal metric learning with GSSF. Every stage is an MLflow run.",
    cls=Group,
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
        from gssf_cli.tracking.adapter import Tracker

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
            metavar="URI",
            help=with_default("MLflow tracking URI.", "$MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here"),
        ),
    ] = None,
    experiment: Annotated[
        str | None,
        typer.Option(
            "--experiment",
            metavar="NAME",
            help=with_default(
                "MLflow experiment name.", "$MLFLOW_EXPERIMENT_NAME, else gssf (gssf run: the pipeline's name)"
            ),
        ),
    ] = None,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show full tracebacks on errors (or set GSSF_DEBUG=1).")
    ] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    ctx.obj = GlobalOptions(tracking_uri, experiment, debug or os.environ.get("GSSF_DEBUG") == "1")


def _options(ctx: typer.Context) -> GlobalOptions:
    return ctx.obj if isinstance(ctx.obj, GlobalOptions) else GlobalOptions()


def _stage_command(name: str, cls: type) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register a function as command ``name``, its ``settings`` parameter replaced by the flags of config ``cls``.

    Typer reads a command's options from its signature, so the registered wrapper carries a synthetic one:
    the function's own parameters (its explicit options) with the generated flags where ``settings`` stands.
    The function gets those flags back as one :class:`Settings`.
    """

    def register(fn: Callable[..., None]) -> Callable[..., None]:
        flags = config_flags(cls)
        own = inspect.signature(fn, eval_str=True).parameters
        if clash := sorted(flags.keys() & own.keys()):
            raise TypeError(f"{name}: parameters {clash} clash with fields of {cls.__name__}")
        keyword = inspect.Parameter.KEYWORD_ONLY
        parameters: list[inspect.Parameter] = []
        for parameter in own.values():
            if parameter.name == "settings":
                parameters += [
                    inspect.Parameter(flag.field, keyword, default=None, annotation=flag.annotation)
                    for flag in flags.values()
                ]
            else:
                parameters.append(parameter.replace(kind=keyword))

        @functools.wraps(fn)
        def command(**kwargs: Any) -> None:
            given = {field: kwargs.pop(field) for field in flags}
            fn(settings=Settings(given, flags), **kwargs)

        command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        command.__annotations__ = {parameter.name: parameter.annotation for parameter in parameters}
        return app.command(name, cls=Command)(command)

    return register


def _run_stage(
    ctx: typer.Context,
    cls: type[C],
    section: str,
    config_file: Path | None,
    cli_values: Callable[[], dict[str, Any]],
    call: Callable[[C, Any], T],
    *,
    beneath: Callable[[Any, dict[str, Any]], dict[str, Any]] | None = None,
    about: Callable[[], str] | None = None,
) -> T:
    """Resolve config ``cls`` from the flags, ``config_file`` and the defaults, then ``call(config, tracker)``.

    Everything runs under :func:`guarded`, including ``cli_values`` (parsing a flag can fail). ``beneath``
    supplies values below the file's, given the tracker and the values given so far (file and flags): a
    resumed run's saved config; ``about`` then names it in front of a config error (which run ``latest`` was).
    """

    def work() -> T:
        options = _options(ctx)
        flag_values = cli_values()
        file_values = load_toml(config_file) if config_file else {}
        tracker = None
        if beneath is not None:
            tracker = options.tracker()
            given = {**file_values, **{k: v for k, v in flag_values.items() if v is not None}}
            file_values = {**beneath(tracker, given), **file_values}
        try:
            config = resolve(cls, section, file_values, flag_values)
        except UserInputError as exc:
            if about is None:
                raise
            raise UserInputError(f"{about()}: {exc}") from None
        return call(config, options.tracker() if tracker is None else tracker)

    return guarded(ctx, work)


JsonOption = Annotated[
    bool, typer.Option("--json", help="Print machine-readable JSON instead of a table (errors too, on stdout).")
]
ConfigOption = Annotated[
    Path | None, typer.Option("--config", help="TOML file with settings; command-line flags override it.")
]


# ---------------------------------------------------------------------------------------------------------
# Commands


@_stage_command("prepare", PrepareConfig)
def prepare(
    ctx: typer.Context, settings: Settings, config: ConfigOption = None, json_output: JsonOption = False
) -> None:
    """Turn a source into a dataset folder (manifest + split arrays), logged as an MLflow run."""

    def call(resolved: PrepareConfig, tracker: Any) -> Any:
        from gssf_cli.stages import prepare as stage

        return stage.run(resolved, tracker)

    result = _run_stage(ctx, PrepareConfig, "prepare", config, settings.values, call)

    from gssf_cli.cli import tables

    tables.print_prepare(result.to_json(), json_output)


@_stage_command("train", TrainConfig)
def train(
    ctx: typer.Context,
    settings: Settings,
    resume: Annotated[
        str | None,
        typer.Option("--resume", metavar="RUN", help=f"Continue a run ({RUN_REF}) from its checkpoint."),
    ] = None,
    seeds: Annotated[
        str | None,
        typer.Option(
            "--seeds",
            metavar="S,S,...",
            help="Train once per seed (a train run each, under one 'seeds' run); tables give mean ± std and n.",
        ),
    ] = None,
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """Train encoders and a GSSF metric head; checkpoints every epoch, validation on dev, logged to MLflow."""
    resume_id: str | None = None
    if seeds is not None:
        _train_seeds(ctx, settings, seeds, resume, config, json_output)
        return

    def saved(tracker: Any, given: dict[str, Any]) -> dict[str, Any]:
        """The resumed run's config, read from the runs folder in effect now (flag, file, else the default)."""
        nonlocal resume_id
        from gssf_cli.stages.train import started_config

        resume_id = tracker.get_run(resume, stage="train").info.run_id
        try:
            return started_config(tracker, resume_id, Path(field_value(TrainConfig, "runs_dir", given, "train")))
        except UserInputError as exc:
            raise UserInputError(f"--resume {resume} is run {resume_id}: {exc}") from None

    def call(resolved: TrainConfig, tracker: Any) -> Any:
        from gssf_cli.stages import train as stage

        return stage.run(resolved, tracker, resume=resume_id, progress=_training_progress(json_output))

    beneath = saved if resume is not None else None
    about = (lambda: f"--resume {resume} is run {resume_id}") if resume is not None else None
    result = _run_stage(ctx, TrainConfig, "train", config, settings.values, call, beneath=beneath, about=about)

    from gssf_cli.cli import tables

    tables.print_training(result.to_json(), json_output)


def _train_seeds(
    ctx: typer.Context, settings: Settings, seeds: str, resume: str | None, config: Path | None, json_output: bool
) -> None:
    """``gssf train --seeds S,S,...``: one train run per seed under a ``seeds`` run, summarised as mean ± std."""

    def cli_values() -> dict[str, Any]:
        if resume is not None:
            raise UserInputError("--seeds starts new runs; --resume continues one: resume each seed's run by its id")
        if "--seed" in settings.given_flags():
            raise UserInputError("give --seed S for one run or --seeds S,S,... for several, not both")
        return settings.values()

    def call(resolved: TrainConfig, tracker: Any) -> Any:
        from gssf_cli.core.config import parse_int_list
        from gssf_cli.stages import train as stage

        parsed = parse_int_list(seeds, "--seeds") or ()
        return stage.run_seeds(resolved, parsed, tracker, progress=_training_progress(json_output))

    result = _run_stage(ctx, TrainConfig, "train", config, cli_values, call)

    from gssf_cli.cli import tables

    tables.print_seeds(result.to_json(), json_output)


@_stage_command("evaluate", EvaluateConfig)
def evaluate(
    ctx: typer.Context, settings: Settings, config: ConfigOption = None, json_output: JsonOption = False
) -> None:
    """Retrieval metrics (R@K, rSum, mAP / MAP@R, P@1) for embeddings or a trained run, logged to MLflow."""

    def call(resolved: EvaluateConfig, tracker: Any) -> Any:
        from gssf_cli.stages import evaluate as stage

        return stage.run(resolved, tracker)

    result = _run_stage(ctx, EvaluateConfig, "evaluate", config, settings.values, call)

    from gssf_cli.cli import tables

    tables.print_evaluation(result.to_json(), json_output)


@_stage_command("tune", TuneConfig)
def tune(
    ctx: typer.Context,
    settings: Settings,
    values: Annotated[
        str | None, typer.Option("--values", metavar="SPEC", help="SPEC for the single --param NAME, e.g. 8,16,32.")
    ] = None,
    resume: Annotated[
        str | None,
        typer.Option(
            "--resume",
            metavar="RUN",
            help=f"Continue an interrupted tune run ({RUN_REF}) with its own saved settings (no setting flags).",
        ),
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Search train settings (e.g. the block size) with Ray Tune; one MLflow child run per trial, best config."""
    if resume is not None:
        run_ref = resume

        def resumed() -> Any:
            given = settings.given_flags() + (["--values"] if values is not None else [])
            if given:
                raise UserInputError(
                    f"--resume continues the tune with its own saved settings: drop {', '.join(given)}"
                )
            from gssf_cli.stages import tune as stage

            return stage.resume(run_ref, _options(ctx).tracker(), progress=True)

        resumed_result = guarded(ctx, resumed)
        from gssf_cli.cli import tables

        tables.print_tune(resumed_result.to_json(), json_output)
        return

    def cli_values() -> dict[str, Any]:
        """``--param NAME --values SPEC`` becomes ``NAME=SPEC``; no ``--param`` at all is left to the config's check."""
        from gssf_cli.training.tune_plan import combine_param_options

        given = settings.values()
        return {**given, "params": combine_param_options(given["params"] or (), values)}

    def call(resolved: TuneConfig, tracker: Any) -> Any:
        from gssf_cli.stages import tune as stage

        return stage.run(resolved, tracker, progress=True)  # progress goes to stderr: --json stdout stays JSON

    result = _run_stage(ctx, TuneConfig, "tune", None, cli_values, call)

    from gssf_cli.cli import tables

    tables.print_tune(result.to_json(), json_output)


@_stage_command("export", ExportConfig)
def export(
    ctx: typer.Context,
    *,
    onnx: Annotated[bool, typer.Option("--onnx", help="Export ONNX graphs (the only format; required).")] = False,
    check: Annotated[
        Path | None,
        typer.Option(
            "--check", metavar="BUNDLE", help="Verify an existing bundle (checksums, checker, loading) instead."
        ),
    ] = None,
    settings: Settings,
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """Export a run as ONNX (encoders + metric head), gated by an ONNX Runtime parity check (exit 1 if outside)."""
    if check is not None:
        bundle = check

        def verify() -> dict[str, Any]:
            from gssf_cli.stages import export as stage

            return stage.verify_bundle(bundle)

        checked = guarded(ctx, verify)
        from gssf_cli.cli import tables

        tables.print_bundle_check(checked, json_output)
        return

    def cli_values() -> dict[str, Any]:
        if not onnx:
            raise UserInputError("pass --onnx (ONNX is the export format gssf writes)")
        return settings.values()

    def call(resolved: ExportConfig, tracker: Any) -> Any:
        from gssf_cli.stages import export as stage

        return stage.run(resolved, tracker)

    result = _run_stage(ctx, ExportConfig, "export", config, cli_values, call)

    from gssf_cli.cli import tables

    payload = result.to_json()
    if result.passed:
        tables.print_export(payload, json_output)
        return
    where = "its parity report is in the JSON" if json_output else "see the table"
    failure = Failure(
        "check_failed",
        f"ONNX Runtime outputs are outside the parity tolerance ({where}); nothing deployed, "
        f"the bundle is kept in {result.path}",
        1,
    )
    if json_output:  # stdout holds one JSON document: the result, which says what failed
        payload |= {"error": failure.message, "kind": failure.kind, "exit_code": failure.exit_code}
    tables.print_export(payload, json_output)
    raise typer.Exit(report(failure, as_json=False))


@_stage_command("compare", CompareConfig)
def compare(
    ctx: typer.Context,
    runs: Annotated[
        list[str],
        typer.Argument(
            metavar="RUN",
            help="Train runs (id, name or 'latest') or seeds runs (gssf train --seeds), the baseline first; A1,A2,A3 "
            "is one configuration over several seeds.",
            show_default=False,
        ),
    ],
    settings: Settings,
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """Paired significance tests between trained runs on one test split: differences, bootstrap CIs, p-values.

    Every run is measured on the same split and protocol; queries are the sampling unit (an image with its
    captions, cross-modal). Each run after the first is compared with the first. A comma-separated group
    (A1,A2,A3: several seeds of one configuration), or a seeds run, is averaged per query before the test, so that
    `gssf compare A1,A2,A3 B1,B2,B3` compares two configurations rather than two trained models: the test sees
    only the sampling of the test queries, not the variance of training.

    Tables and JSON label each argument by the seeds run's name, else its first run's name and how many more;
    `--name gssf=A1,A2,A3` names it instead.
    """

    def cli_values() -> dict[str, Any]:
        return {**settings.values(), "runs": tuple(runs) if runs else None}

    def call(resolved: CompareConfig, tracker: Any) -> Any:
        from gssf_cli.stages import compare as stage

        return stage.run(resolved, tracker)

    result = _run_stage(ctx, CompareConfig, "compare", config, cli_values, call)

    from gssf_cli.cli import tables

    tables.print_comparison(result.to_json(), json_output)


@_stage_command("index", IndexConfig)
def index(
    ctx: typer.Context,
    *,
    settings: Settings,
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """Build a faiss index of a gallery embedded by an exported bundle (ONNX Runtime, no torch), for gssf search.

    Each gallery row goes through the bundle's image encoder and metric head, so a caption's inner product with
    it is the learned GSSF score: flat is exact, hnsw and ivfpq approximate (--eval measures their recall@10
    against exact search, and the latency; ivfpq re-scores a --refine x k shortlist exactly). The folder holds the
    index, the ids (ivfpq: the vectors that --refine reads, memory-mapped) and a manifest naming the bundle by
    content; the build is an MLflow run.
    """

    def call(resolved: IndexConfig, tracker: Any) -> Any:
        from gssf_cli.cli import console
        from gssf_cli.stages import index as stage

        with console.rows_progress("embedding the gallery", resolved.gallery, json_output) as progress:
            return stage.run(resolved, tracker, progress)

    result = _run_stage(ctx, IndexConfig, "index", config, settings.values, call)
    from gssf_cli.cli import tables

    tables.print_index(result.to_json(), json_output)


@_stage_command("search", SearchConfig)
def search(
    ctx: typer.Context,
    *,
    settings: Settings,
    json_output: JsonOption = False,
) -> None:
    """Search an index built by gssf index: the k best gallery rows for a caption (or many), by the learned score.

    Captions are tokenised with the bundle's vocabulary and rule and encoded by its text encoder on ONNX
    Runtime; the index and its bundle are checked (checksums, and that the bundle is the one the index was built
    from) before anything is answered. Each hit shows its id and score and, when the index was built from a
    dataset's images (e.g. --gallery data/quickstart/test_ims.npy), that image's own captions, so that
    gssf search --text "red square" can be judged by eye (--json: "captions" per hit). Needs only onnxruntime,
    numpy and faiss (the search extra: pip install -e '.\\[search]' in a checkout).
    """

    def work() -> Any:
        from gssf_cli.deploy.indexes import run_search

        return run_search(resolve(SearchConfig, "search", {}, settings.values()))

    result = guarded(ctx, work)

    from gssf_cli.cli import tables

    tables.print_search(result.to_json(), json_output)


@app.command("ui", cls=Command)
def ui(
    ctx: typer.Context,
    host: Annotated[
        str, typer.Option("--host", help="Interface to serve on (loopback: this machine only).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to serve on.")] = 5000,
) -> None:
    """Serve the MLflow UI of this store (mlflow ui --app-name gssf), opening in Model training.

    The store is created or upgraded first under gssf's lock (mlflow.db.lock), so gssf commands started beside it
    never race it on a fresh store; then MLflow's own server takes over this process (Ctrl-C stops it).
    """

    def work() -> list[str]:
        from gssf_cli.tracking.store import ui_command

        tracker = ctx.obj.tracker()
        command = ui_command(tracker.tracking_uri, host, port)
        _ = tracker.experiment_id
        return command

    command = guarded(ctx, work)
    os.execv(command[0], command)


@app.command("run", cls=Command)
def run_pipeline(
    ctx: typer.Context,
    pipeline: Annotated[
        Path, typer.Argument(metavar="PIPELINE.toml", help="Pipeline file, e.g. pipelines/quickstart.toml.")
    ],
    force: Annotated[bool, typer.Option("--force", help="Re-run every stage even if cached.")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Say which stages would run and why; run nothing, log nothing.")
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Run a pipeline file: prepare → train → evaluate → tune → export under one parent MLflow run."""

    def work() -> Any:
        from gssf_cli.cli import console
        from gssf_cli.stages import pipeline as stage

        options = _options(ctx)
        loaded = stage.load_pipeline(pipeline)
        if options.experiment is None:
            options.experiment = loaded.name
        return stage.run(
            loaded,
            options.tracker(),
            force=force,
            progress=_training_progress(json_output),
            dry_run=dry_run,
            notify=console.note,
        )

    result = guarded(ctx, work)

    from gssf_cli.cli import tables

    tables.print_pipeline(result.to_json(), json_output)


def _training_progress(json_output: bool) -> Any:
    """Training progress on stderr: bars for people, plain per-epoch lines beside ``--json`` (no bars in logs)."""
    from gssf_cli.cli import console

    return console.TrainingProgress(plain=True) if json_output else console.TrainingProgress()


def main() -> None:
    """Console-script entry point. SIGTERM (``kill``, a scheduler's stop) interrupts like Ctrl-C, so every open
    run, a pipeline's parent included, ends KILLED instead of staying RUNNING, and the exit status is 130."""
    signal.signal(signal.SIGTERM, _terminate)
    app()


def _terminate(signum: int, frame: types.FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one clean shutdown: a second TERM does not cut it short
    from gssf_cli.core import stop

    stop.request()  # asked again between batches, should this interrupt land in a finalizer and be dropped
    raise KeyboardInterrupt
