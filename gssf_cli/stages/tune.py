"""Stage ``tune``: search train settings (the block size above all) with Ray Tune; one MLflow writer.

How a tune runs:

1. :func:`gssf_cli.tuning.make_plan` checks everything it can before Ray starts (parameter names, value
   syntax, block sizes against D for every grid combination, files, the metric) — a mistake costs a second.
2. Ray: a local instance by default (all CPUs, no dashboard, no usage stats, its session folder in a short
   temporary directory removed afterwards — Unix socket paths must stay under ~107 characters — and the
   results under ``--storage``, ``.gssf/ray`` by default). Each trial is :func:`_train_trial`: the library's
   own training (:func:`gssf_cli.stages.train.run`, no tracker) reporting every epoch's metrics and checkpoint
   with ``ray.tune.report``, so ASHA can stop weak trials early and a crashed trial is retried
   (``--max-failures``) from its last checkpoint via ``tune.get_checkpoint()``. A trial uses
   ``--cpus-per-trial`` threads (``torch.set_num_threads`` and ``TrainConfig.threads``).
3. MLflow, written by this process only: the tune run (a child of ``parent_run_id`` when given), and after
   ``Tuner.fit()`` one child run per trial replayed from the ResultGrid (tag ``mlflow.parentRunId``; params =
   the trial's full train config; per-epoch metrics with step = epoch and the trial's own timestamps; status
   FINISHED, FAILED, or KILLED when the scheduler stopped it early). Trials never open the tracking store:
   many processes writing one SQLite file lock or corrupt it, and on a cluster the file is not even there.
   Replaying after ``fit()`` rather than from a live ``tune.Callback`` also holds under Ray Client
   (``ray://``), where Tune's controller — and so every callback — runs on the cluster's head node.
4. On the tune run: ``trials.csv`` (the results table), ``config/best_train.toml`` (the best trial's full train
   config, top-level keys: ``gssf train --config`` loads it as is) and, when the block size is tuned,
   ``plots/block_size.png`` (the metric against the block size on a log2 axis, metric-head parameters on a
   second axis: the GSSF paper's Fig. 3). The same files land in ``<runs_dir>/<tune run>/``.
5. Ctrl-C: Tune stops the trials; what ran is still logged (unfinished trials KILLED), the tune run ends
   KILLED and the command exits 130. Every trial failing is exit 1 (the tune ran but found nothing).

Joining a cluster (``--address``): ``HOST:6379`` (the driver runs here, as a Ray node's peer) or
``ray://HOST:10001`` (Ray Client: needs ``pip install "ray[client]"`` here and a head node started with
``--ray-client-server-port``; gssf's own dependencies do not pull it in). An address where nothing listens fails
in seconds (exit 2) instead of ``ray.init``'s minutes of retries. What the user must set up:

- Ray 2.60 clusters use token authentication: set ``RAY_AUTH_MODE=token`` here, with the cluster's token in
  ``~/.ray/auth_token`` (where ``ray start`` writes it), in ``RAY_AUTH_TOKEN``, or in a file named by
  ``RAY_AUTH_TOKEN_PATH``. Without it ``ray.init`` is refused ("InvalidAuthToken") and gssf exits 2. A cluster
  started with ``RAY_AUTH_MODE=disabled`` (trusted networks only) needs nothing.
- The same Python, Ray and gssf (``pip install gssf``) on every node; ``--data`` (and any teacher file) at the
  same absolute path on every node.
- ``--storage`` that every node and this machine can reach: a shared folder (NFS) or a URI such as
  ``s3://bucket/gssf`` (with the cloud credentials in the nodes' environment); trial checkpoints go there.
- MLflow needs no access from the cluster: only this process logs.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gssf_cli import tuning
from gssf_cli.config import TuneConfig, dump_toml, to_dict
from gssf_cli.errors import CheckFailedError, UserInputError

if TYPE_CHECKING:
    from gssf_cli.tracking import StageRun, Tracker
    from gssf_cli.tuning import TunePlan

TRIAL_STAGE = "tune_trial"
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AIR_NEW_OUTPUT": "0"}


@dataclass(frozen=True)
class TrialOutcome:
    """One trial as the driver saw it, ready to log and print."""

    trial_id: str
    values: dict[str, Any]
    status: str
    metric: float | None
    epochs: int
    seconds: float
    error: str | None = None
    path: str = ""
    head_params: int | None = None
    run_id: str | None = None
    history: list[tuple[int, int, dict[str, float]]] = field(default_factory=list, repr=False)
    start_ms: int | None = None
    end_ms: int | None = None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("history", "start_ms", "end_ms"):
            out.pop(key)
        return out


@dataclass(frozen=True)
class TuneResult:
    run_id: str | None
    metric: str
    metric_key: str
    mode: str
    scheduler: str
    tuned: list[str]
    trials: list[dict[str, Any]]
    best: dict[str, Any] | None
    best_config: str | None
    out_dir: str
    storage: str
    seconds: float
    trial_seconds: float
    ray_start_seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def run(
    config: TuneConfig,
    tracker: Tracker | None = None,
    parent_run_id: str | None = None,
    progress: bool = True,
) -> TuneResult:
    """Plan and check the search (before Ray), run the trials on Ray, log the tune run and one child per trial.

    Raises :class:`CheckFailedError` (after logging) when every trial failed, and ``KeyboardInterrupt`` (after
    logging what ran; the tune run ends KILLED) when Ctrl-C stopped the search.
    """
    plan = tuning.make_plan(config)
    if tracker is not None:
        _ = tracker.experiment_id
    if config.address:
        check_reachable(config.address)
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        tune_run: StageRun | None = None
        if tracker is not None:
            tune_run = stack.enter_context(
                tracker.start_run("tune", run_name=f"tune {', '.join(plan.names)}", parent_run_id=parent_run_id)
            )
            _log_start(tune_run, config, plan)
        run_id = tune_run.run_id if tune_run is not None else uuid.uuid4().hex
        storage = storage_path(config.storage)
        ray_run = run_trials(plan, config, f"tune-{run_id}", storage, progress)
        outcomes = ray_run.outcomes
        if tracker is not None and tune_run is not None:
            outcomes = [replace(o, run_id=_log_trial(tracker, tune_run.run_id, o, plan)) for o in outcomes]
        ranked = sorted(outcomes, key=lambda o: tuning.rank_key(o.metric, plan.mode))
        best = next((o for o in ranked if o.metric is not None), None)
        out_dir = plan.base.runs_dir / run_id
        best_file = _write_outputs(out_dir, ranked, best, plan, tune_run)
        seconds = time.perf_counter() - started
        if tune_run is not None:
            _log_end(tune_run, ranked, best, plan, seconds)
        if ray_run.interrupted:
            raise KeyboardInterrupt
        if best is None:
            first = next((o for o in ranked if o.error), None)
            why = f"; first error ({first.trial_id}): {first.error}" if first else ""
            raise CheckFailedError(f"no trial reported {plan.metric} ({len(ranked)} trials){why}")
    return TuneResult(
        run_id=tune_run.run_id if tune_run is not None else None,
        metric=plan.metric,
        metric_key=plan.metric_key,
        mode=plan.mode,
        scheduler=config.scheduler,
        tuned=list(plan.names),
        trials=[o.to_json() for o in ranked],
        best=best.to_json() if best is not None else None,
        best_config=str(best_file) if best_file is not None else None,
        out_dir=str(out_dir),
        storage=storage,
        seconds=round(seconds, 2),
        trial_seconds=round(sum(o.seconds for o in outcomes), 2),
        ray_start_seconds=round(ray_run.ray_start_seconds, 2),
    )


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds when nothing listens at ``--address``: ``ray.init`` would retry for minutes."""
    if address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UserInputError(f"--address {address}: expected HOST:PORT (e.g. 10.0.0.5:6379) or ray://HOST:10001")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise UserInputError(
            f"--address {address}: no Ray cluster answers there ({exc.strerror or exc}); "
            "start one with `ray start --head` or fix the address"
        ) from None


def storage_path(storage: str) -> str:
    """Ray wants an absolute path or a URI; a relative folder is taken from the working directory."""
    if "://" in storage:
        return storage
    path = Path(storage).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


@dataclass(frozen=True)
class RayRun:
    """What :func:`run_trials` saw: each trial, Ray's start-up seconds (0 if it was running), and whether
    Ctrl-C ended the search early."""

    outcomes: list[TrialOutcome]
    ray_start_seconds: float
    interrupted: bool


def run_trials(plan: TunePlan, config: TuneConfig, name: str, storage: str, progress: bool = False) -> RayRun:
    """Run every trial of ``plan`` on Ray. Ray's console output goes to stderr so that ``--json`` keeps
    stdout clean."""
    os.environ.update(RAY_ENV)
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    spec = _trial_spec(plan, config)
    scheduler: Any = FIFOScheduler()
    if config.scheduler == "asha":
        scheduler = ASHAScheduler(
            time_attr="training_iteration",
            max_t=plan.base.epochs,
            grace_period=min(config.grace_period, plan.base.epochs),
            reduction_factor=config.reduction_factor,
        )
    with contextlib.redirect_stdout(sys.stderr), _quiet_ray_logs(), _ray_session(config) as ray_seconds:
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(_train_trial, spec=spec), {"cpu": config.cpus_per_trial}),
            param_space=_search_space(plan),
            tune_config=tune.TuneConfig(
                metric=plan.metric_key,
                mode=plan.mode,
                scheduler=scheduler,
                num_samples=plan.num_samples,
                search_alg=BasicVariantGenerator(random_state=config.seed, max_concurrent=config.max_concurrent),
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage,
                verbose=0,
                failure_config=tune.FailureConfig(max_failures=config.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                callbacks=[_progress_callback(plan)] if progress else [],
            ),
        )
        with _sigint_watch() as interrupted:
            grid = tuner.fit()
        outcomes = [_outcome(grid[index], plan) for index in range(len(grid))]
    return RayRun(outcomes, ray_seconds[0], interrupted[0])


@contextlib.contextmanager
def _sigint_watch() -> Iterator[list[bool]]:
    """Tell whether Ctrl-C stopped ``Tuner.fit()``, and put the SIGINT handler back.

    Why: Tune catches the first Ctrl-C, stops the trials and returns normally, so a stopped search would
    look finished. Tune installs its own handler for the search and reinstates the previous one only when
    the signal arrives — so the previous handler being back in place afterwards means an interrupt.
    """
    import ray

    watching = (
        threading.current_thread() is threading.main_thread()
        and os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0") == "0"
        and not ray.util.client.ray.is_connected()
    )
    before = signal.getsignal(signal.SIGINT)
    flag = [False]
    try:
        yield flag
    finally:
        if watching:
            flag[0] = signal.getsignal(signal.SIGINT) is before
            signal.signal(signal.SIGINT, before)


@contextlib.contextmanager
def _ray_session(config: TuneConfig) -> Iterator[list[float]]:
    """Use a running Ray (this process's, or a cluster's with ``--address``) or start a local one and stop
    it afterwards, removing its session folder."""
    import ray

    elapsed = [0.0]
    if ray.is_initialized():
        yield elapsed
        return
    temp_dir: str | None = None
    started = time.perf_counter()
    try:
        if config.address:
            ray.init(address=config.address, log_to_driver=False, logging_level=logging.ERROR)
        else:
            temp_dir = tempfile.mkdtemp(prefix="gssf-ray-")
            ray.init(
                num_cpus=os.cpu_count() or 1,
                include_dashboard=False,
                _temp_dir=temp_dir,
                log_to_driver=False,
                logging_level=logging.ERROR,
            )
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as exc:
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)
        where = f"the Ray cluster at {config.address}" if config.address else "a local Ray instance"
        hint = " (is it running? does it need RAY_AUTH_MODE=token and its token?)" if config.address else ""
        raise UserInputError(f"cannot start or join {where}{hint}: {_first_line(str(exc))}") from None
    elapsed[0] = time.perf_counter() - started
    try:
        yield elapsed
    finally:
        ray.shutdown()
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)


@contextlib.contextmanager
def _quiet_ray_logs() -> Iterator[None]:
    """Ray logs every trial error with a full traceback; the outcome table already names each error."""
    logger = logging.getLogger("ray.tune")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _trial_spec(plan: TunePlan, config: TuneConfig) -> dict[str, Any]:
    """What every trial shares. Paths are made absolute here: Ray runs trials in their own folders."""
    base = to_dict(plan.base)
    base["data"] = str(plan.base.data.expanduser().resolve())
    if plan.base.teacher is not None:
        base["teacher"] = str(plan.base.teacher.expanduser().resolve())
    return {
        "base": base,
        "root": str(Path.cwd()),
        "cpus": config.cpus_per_trial,
        "metric_key": plan.metric_key,
    }


def _search_space(plan: TunePlan) -> dict[str, Any]:
    from ray import tune

    space: dict[str, Any] = {}
    for dim in plan.dimensions:
        if dim.kind == "grid":
            space[dim.name] = tune.grid_search(list(dim.values))
        elif dim.kind == "uniform":
            space[dim.name] = tune.uniform(dim.low, dim.high)
        elif dim.kind == "loguniform":
            space[dim.name] = tune.loguniform(dim.low, dim.high)
        elif dim.kind == "randint":
            space[dim.name] = tune.randint(int(dim.low), int(dim.high) + 1)
        else:
            space[dim.name] = tune.lograndint(int(dim.low), int(dim.high) + 1)
    return space


def _train_trial(values: dict[str, Any], spec: dict[str, Any]) -> None:
    """Ray function trainable: one trial is one library training run that reports after every epoch.

    The reported checkpoint is the run's whole folder (``checkpoint/`` and ``best/``): a retried trial
    restores both and resumes by id, so the best epoch seen before the crash still counts.
    """
    import json

    import torch
    from ray import tune

    from gssf_cli.config import TrainConfig, from_dict
    from gssf_cli.stages import train

    cpus = int(spec["cpus"])
    torch.set_num_threads(cpus)
    tuned = {k: _plain(v) for k, v in values.items()}
    if "teacher" in tuned:
        tuned["teacher"] = str(Path(spec["root"]) / Path(str(tuned["teacher"])).expanduser())
    config = from_dict(TrainConfig, {**spec["base"], **tuned, "threads": cpus, "runs_dir": "runs"}, "train")
    trial_id = tune.get_context().get_trial_id()
    metric_key = str(spec["metric_key"])
    resume: str | None = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        folder = config.runs_dir / trial_id
        shutil.rmtree(folder, ignore_errors=True)
        checkpoint.to_directory(str(folder))
        state = json.loads((folder / train.LAST / "state.json").read_text())
        if state["epoch"] + 1 >= config.epochs:
            return
        resume = trial_id

    def report(epoch: int, metrics: dict[str, float], checkpoint_folder: Path) -> None:
        if metric_key not in metrics:
            raise UserInputError(f"--metric: trials report no {metric_key!r}; they report {', '.join(sorted(metrics))}")
        tune.report(
            {**metrics, "epoch": epoch, "reported_at": time.time()},
            checkpoint=tune.Checkpoint.from_directory(str(checkpoint_folder.parent)),
        )

    train.run(config, tracker=None, resume=resume, progress=False, on_epoch_end=report)


def _progress_callback(plan: TunePlan) -> Any:
    """A driver-side callback printing one line per trial event on stderr (it logs nothing)."""
    from ray.tune import Callback

    epochs, metric, key = plan.base.epochs, plan.metric, plan.metric_key

    class Progress(Callback):
        def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict, **info: Any) -> None:
            value = result.get(key)
            shown = f"{value:.4g}" if isinstance(value, (int, float)) else "?"
            print(
                f"gssf tune: trial {trial.trial_id} ({_describe(trial.config)}) "
                f"epoch {int(result.get('epoch', 0)) + 1}/{epochs}: {metric} {shown}",
                file=sys.stderr,
            )

        def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            print(f"gssf tune: trial {trial.trial_id} ({_describe(trial.config)}) failed", file=sys.stderr)

    return Progress()


def _outcome(result: Any, plan: TunePlan) -> TrialOutcome:
    from ray.tune.result import AUTO_RESULT_KEYS

    last = dict(result.metrics or {})
    values = {k: _plain(v) for k, v in (result.config or {}).items()}
    skip = {*AUTO_RESULT_KEYS, "done", "trial_id", "epoch", "reported_at", "experiment_tag", "should_checkpoint"}
    rows: dict[int, tuple[int, dict[str, float], float, float]] = {}
    frame = result.metrics_dataframe
    if frame is not None and not frame.empty and "epoch" in frame.columns:
        for record in frame.to_dict("records"):
            epoch = record.get("epoch")
            if not isinstance(epoch, (int, float)) or math.isnan(epoch):
                continue
            metrics = {
                str(k): float(v)
                for k, v in record.items()
                if str(k) not in skip
                and not str(k).startswith("config/")
                and isinstance(v, (int, float))
                and not isinstance(v, bool)
                and math.isfinite(v)
            }
            stamp = float(record.get("reported_at") or record.get("timestamp") or time.time())
            rows[int(epoch)] = (int(stamp * 1000), metrics, float(record.get("time_total_s") or 0.0), stamp)
    history = [(epoch, stamp, metrics) for epoch, (stamp, metrics, _, _) in sorted(rows.items())]
    failed = result.error is not None
    seconds = max((total for _, _, total, _ in rows.values()), default=0.0)
    start_ms = end_ms = None
    if rows:
        end_ms = max(stamp for stamp, _, _, _ in rows.values())
        start_ms = int(end_ms - seconds * 1000)
    train_values = _train_values(plan, values)
    head = None
    if train_values is not None:
        head = tuning.metric_head_parameters(
            str(train_values["metric"]), int(train_values["embed_dim"]), int(train_values["block_size"])
        )
    return TrialOutcome(
        trial_id=str(last.get("trial_id") or Path(str(result.path)).name),
        values=values,
        status=tuning.trial_status(failed, len(history), plan.base.epochs),
        metric=tuning.best_value((m.get(plan.metric_key, math.nan) for _, _, m in history), plan.mode),
        epochs=len(history),
        seconds=round(seconds, 3),
        error=_error_line(result.error) if failed else None,
        path=str(result.path),
        head_params=head,
        history=history,
        start_ms=start_ms,
        end_ms=end_ms,
    )


def _train_values(plan: TunePlan, values: Mapping[str, Any]) -> dict[str, Any] | None:
    try:
        return tuning.trial_train_values(plan, values)
    except UserInputError:
        return None


def _log_start(run_: StageRun, config: TuneConfig, plan: TunePlan) -> None:
    from gssf_cli.data.manifest import load_manifest, manifest_digest

    run_.log_config("tune", to_dict(config))
    base = to_dict(plan.base)
    run_.log_params(base, prefix="base.")
    run_.log_text(dump_toml(base), "config/base_train.toml")
    manifest = load_manifest(plan.base.data, verify=False)
    run_.log_dataset(
        str(manifest["name"]),
        plan.base.data,
        manifest_digest(plan.base.data),
        context="tuning",
        tags={"kind": str(manifest["kind"])},
    )
    run_.set_tags(
        {
            "gssf.tune.metric": plan.metric,
            "gssf.tune.mode": plan.mode,
            "gssf.tune.params": ", ".join(f"{d.name}={d.describe()}" for d in plan.dimensions),
            "gssf.task": plan.task,
        }
    )


def _log_trial(tracker: Tracker, tune_run_id: str, outcome: TrialOutcome, plan: TunePlan) -> str:
    train_values = _train_values(plan, outcome.values) or {}
    tags = {
        "gssf.tune.trial_id": outcome.trial_id,
        "gssf.tune.trial_path": outcome.path,
        "gssf.tune.values": _describe(outcome.values),
        "gssf.task": plan.task,
    }
    if train_values:
        tags["gssf.metric"] = str(train_values["metric"])
    if outcome.error:
        tags["gssf.error"] = outcome.error[:5000]
    if outcome.status == "KILLED":
        tags["gssf.tune.stopped"] = f"stopped early after {outcome.epochs} of {plan.base.epochs} epochs"
    metrics: list[tuple[int, int, Mapping[str, float]]] = list(outcome.history)
    return tracker.record_run(
        TRIAL_STAGE,
        run_name=f"trial {_describe(outcome.values)}",
        status=outcome.status,
        parent_run_id=tune_run_id,
        params={f"train.{k}": v for k, v in train_values.items()} or outcome.values,
        history=metrics,
        tags=tags,
        start_time_ms=outcome.start_ms,
        end_time_ms=outcome.end_ms,
    )


def _write_outputs(
    out_dir: Path, ranked: list[TrialOutcome], best: TrialOutcome | None, plan: TunePlan, run_: StageRun | None
) -> Path | None:
    """``trials.csv``, the best train config and the block-size plot, in ``out_dir`` and on the tune run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = results_csv(ranked, plan)
    (out_dir / "trials.csv").write_text(table, encoding="utf-8")
    if run_ is not None:
        run_.log_text(table, "trials.csv")
    best_file = None
    if best is not None:
        best_file = out_dir / "best_train.toml"
        text = dump_toml(tuning.trial_train_values(plan, best.values))
        best_file.write_text(text, encoding="utf-8")
        if run_ is not None:
            run_.log_text(text, "config/best_train.toml")
    if plan.tunes("block_size"):
        figure = block_size_figure(ranked, plan)
        if figure is not None:
            from gssf_cli import plots

            figure.savefig(out_dir / "block_size.png", dpi=120)
            if run_ is not None:
                run_.log_figure(figure, "plots/block_size.png")
            plots.close(figure)
    return best_file


def _log_end(
    run_: StageRun, ranked: list[TrialOutcome], best: TrialOutcome | None, plan: TunePlan, seconds: float
) -> None:
    counts = {status: sum(o.status == status for o in ranked) for status in ("FINISHED", "KILLED", "FAILED")}
    metrics: dict[str, float] = {f"trials_{k.lower()}": float(v) for k, v in counts.items()}
    metrics["trials"] = float(len(ranked))
    metrics["seconds"] = seconds
    if best is not None and best.metric is not None:
        metrics[f"best_{plan.metric}"] = best.metric
    run_.log_metrics(metrics)
    if best is not None:
        run_.set_tags({"gssf.tune.best_trial": best.trial_id, "gssf.tune.best_run": best.run_id or ""})
        run_.log_params({f"best.{k}": v for k, v in best.values.items()})


def results_csv(ranked: list[TrialOutcome], plan: TunePlan) -> str:
    """The results table: one row per trial, best first."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    names = list(plan.names)
    writer.writerow(
        ["rank", "trial_id", "run_id", "status", *names, plan.metric, "epochs", "seconds", "head_params", "error"]
    )
    for rank, o in enumerate(ranked, start=1):
        writer.writerow(
            [
                rank,
                o.trial_id,
                o.run_id or "",
                o.status,
                *(o.values.get(n, "") for n in names),
                "" if o.metric is None else o.metric,
                o.epochs,
                o.seconds,
                "" if o.head_params is None else o.head_params,
                o.error or "",
            ]
        )
    return buffer.getvalue()


def block_size_figure(outcomes: list[TrialOutcome], plan: TunePlan) -> Any:
    """The metric against the block size (log2 axis; every trial a dot — hollow if the scheduler stopped it
    before its budget — and the best per size a line) with the metric head's parameter count on a second
    axis: the accuracy/size trade-off of the GSSF paper's Fig. 3. ``--scheduler fifo`` gives every size the
    full budget, which is what that figure compares."""
    done = [o for o in outcomes if o.metric is not None]
    if not done:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    pick = max if plan.mode == "max" else min
    sizes = sorted({int(o.values["block_size"]) for o in done})
    best = [pick(float(o.metric or 0) for o in done if o.values["block_size"] == size) for size in sizes]
    params = [max((o.head_params or 0) for o in done if o.values["block_size"] == size) for size in sizes]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for stopped in (False, True):
        group = [o for o in done if (o.status == "KILLED") == stopped]
        if group:
            ax.scatter(
                [int(o.values["block_size"]) for o in group],
                [float(o.metric or 0.0) for o in group],
                s=40,
                zorder=3,
                facecolors="white" if stopped else "tab:blue",
                edgecolors="tab:blue",
                label="trial stopped early" if stopped else "trial",
            )
    ax.plot(sizes, best, color="tab:blue", label=f"{plan.metric}, best per size")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes)
    ax.set_xticklabels([str(s) for s in sizes])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(f"block size d (D = {plan.base.embed_dim})")
    ax.set_ylabel(f"{plan.metric} ({'higher' if plan.mode == 'max' else 'lower'} is better)")
    ax.grid(True, which="both", alpha=0.3)
    twin = ax.twinx()
    twin.plot(sizes, params, marker="s", linestyle="--", color="tab:orange", label="metric-head parameters")
    twin.set_ylabel("metric-head parameters")
    if all(p > 0 for p in params):
        twin.set_yscale("log")
        twin.yaxis.set_minor_formatter(NullFormatter())
    twin.set_yticks(params)
    twin.set_yticklabels([f"{p:,}" for p in params])
    handles, labels = ax.get_legend_handles_labels()
    twin_handles, twin_labels = twin.get_legend_handles_labels()
    ax.legend(handles + twin_handles, labels + twin_labels, loc="best", fontsize="small")
    ax.set_title(f"block-size search, {'several metrics' if plan.tunes('metric') else plan.base.metric}")
    fig.tight_layout()
    return fig


def _plain(value: Any) -> Any:
    """numpy scalars (Ray samples with numpy) as Python values, so configs and TOML take them."""
    item = getattr(value, "item", None)
    return item() if callable(item) else value


def _describe(values: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={_short(v)}" for k, v in values.items())


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _error_line(error: BaseException) -> str:
    """The trial's own exception (Ray wraps it), as one line."""
    cause = getattr(error, "cause", None) or error
    text = _first_line(str(cause)) or type(cause).__name__
    return text if isinstance(cause, UserInputError) else f"{type(cause).__name__}: {text}"


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else ""
