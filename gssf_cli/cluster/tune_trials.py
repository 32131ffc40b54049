"""Tune trials on Ray (``gssf tune``): the search, the trial function and the driver-side events.

**Tune trials.** Each trial is :func:`_train_trial`: the library's own training
(:func:`gssf_cli.training.loop.fit`, no tracker) reporting every epoch's metrics and checkpoint with
``ray.tune.report``, so ASHA can stop weak trials early and a crashed trial is retried (``--max-failures``)
from its last checkpoint via ``tune.get_checkpoint()``. A trial uses ``--cpus-per-trial`` threads
(``torch.set_num_threads`` and ``TrainConfig.threads``); with ``--workers-per-trial N`` it drives N Ray Train
workers instead. Trials never open the tracking store: a driver-side
Tune callback passes each trial's start, epochs and end to a :class:`~gssf_cli.training.tune_results.TrialLog` as they happen
(the tune stage logs them to MLflow), and prints them as plain progress lines on stderr. An interrupted search
continues with ``Tuner.restore`` (``run_trials(..., resume=True)``); under ASHA, with the decisions
:mod:`gssf_cli.cluster.durable_asha` kept, which Tune itself does not.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gssf_cli.cluster.durable_asha import REPLAYED, durable_asha
from gssf_cli.cluster.session import (
    callbacks_run_here,
    error_line,
    experiment_path,
    quiet_ray_logs,
    ray_environment,
    ray_session,
)
from gssf_cli.cluster.train_workers import DataParallel
from gssf_cli.core.config import from_dict, to_dict
from gssf_cli.core.errors import UserInputError, first_line
from gssf_cli.core.stage_configs import TrainConfig, TuneConfig
from gssf_cli.training import tune_plan, tune_results
from gssf_cli.training.tune_plan import TunePlan
from gssf_cli.training.tune_results import TrialLog, TrialOutcome, describe_values


@contextlib.contextmanager
def connected(address: str | None) -> Iterator[list[float]]:
    """Ray, started (or the cluster at ``address`` joined) before the caller opens its tracked runs, so that a
    cluster refusing the connection leaves no run behind; yields Ray's start-up seconds. :func:`run_trials` inside
    uses this session."""
    ray_environment(address)
    with contextlib.redirect_stdout(sys.stderr), ray_session(address) as seconds:
        yield seconds


@dataclass(frozen=True)
class RayRun:
    """What :func:`run_trials` saw: each trial, Ray's start-up seconds (0 if it was running), and whether
    Ctrl-C (or SIGTERM) ended the search early."""

    outcomes: list[TrialOutcome]
    ray_start_seconds: float
    interrupted: bool


def run_trials(
    plan: TunePlan,
    config: TuneConfig,
    name: str,
    storage: str,
    progress: bool = False,
    log: TrialLog | None = None,
    *,
    resume: bool = False,
    root: Path | None = None,
) -> RayRun:
    """Run every trial of ``plan`` on Ray as experiment ``name`` under ``storage`` — or, with ``resume``, continue
    that experiment where it stopped (unfinished and errored trials go on from their last checkpoints; finished
    ones are kept, not re-run).

    ``log`` receives each trial's start, epochs and end as they happen; ``progress`` prints one plain line per
    such event on stderr. Neither works under Ray Client (see :func:`callbacks_run_here`): the caller then logs
    from the outcomes. ``root`` is the folder relative trial paths (a tuned teacher file) are read from: the
    working directory the tune started in. Ray's console output goes to stderr so that ``--json`` keeps stdout
    clean.
    """
    ray_environment(config.address)
    from ray import tune

    spec = _trial_spec(plan, config, root or Path.cwd())
    callbacks = [_callback(name)] if callbacks_run_here(config.address) else []
    with (
        contextlib.redirect_stdout(sys.stderr),
        quiet_ray_logs(),
        _driver(name, _Driver(plan, log, progress)),
        ray_session(config.address) as ray_seconds,
    ):
        # Only now: under Ray Client, ray.init never runs the hook that puts with_parameters' objects in the store.
        # A trial with workers is only their driver: the workers ask Ray Train for their own CPUs, and the trial
        # holds no CPU (a fraction would leave the workers short of whole ones); Ray wants some resource, so 1 byte.
        resources: dict[str, float] = {"cpu": config.cpus_per_trial}
        if config.workers_per_trial > 1:
            resources = {"cpu": 0, "memory": 1}
        trainable = tune.with_resources(tune.with_parameters(_train_trial, spec=spec), resources)
        if resume:
            tuner = tune.Tuner.restore(
                experiment_path(storage, name), trainable, resume_unfinished=True, resume_errored=True
            )
        else:
            tuner = _new_tuner(plan, config, name, storage, trainable, callbacks)
        with _interrupt_watch() as interrupted:
            grid = tuner.fit()
        outcomes = [_outcome(grid[index], plan) for index in range(len(grid))]
    return RayRun(outcomes, ray_seconds[0], interrupted[0])


def _new_tuner(
    plan: TunePlan, config: TuneConfig, name: str, storage: str, trainable: Any, callbacks: list[Any]
) -> Any:
    """A Tuner for a new search: ``plan``'s space and scheduler (ASHA or FIFO), results under ``storage/name``."""
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    scheduler: Any = FIFOScheduler()
    if plan.scheduler == "asha":
        folder = experiment_path(storage, name) if "://" not in storage else None
        grace = min(config.grace_period, plan.base.epochs)
        scheduler = durable_asha(folder, plan.base.epochs, grace, config.reduction_factor)
    return tune.Tuner(
        trainable,
        param_space=_search_space(plan),
        tune_config=tune.TuneConfig(
            metric=plan.metric_key,
            mode=plan.mode,
            scheduler=scheduler,
            num_samples=plan.num_samples,
            search_alg=BasicVariantGenerator(random_state=config.seed, max_concurrent=_concurrency(config)),
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=callbacks,
        ),
    )


def _concurrency(config: TuneConfig) -> int:
    """Trials at once (0: as Tune's resources allow). A trial with workers holds no CPU itself, so Tune would start
    them all and their Ray Train runs would wait on each other's CPUs: as many as the cluster's CPUs can train."""
    if config.max_concurrent or config.workers_per_trial == 1:
        return config.max_concurrent
    import ray

    cpus = float(ray.cluster_resources().get("CPU", 0.0))
    return max(1, int(cpus // (config.workers_per_trial * config.cpus_per_trial)))


class _Driver:
    """What the driver does with Tune's trial events: print a progress line, and pass the event to the
    :class:`~gssf_cli.training.tune_results.TrialLog`. A failing log must not end the search (the trials' results are still in
    Ray's storage, and the tune stage fills gaps after ``fit()``): the first failure is reported on stderr, later
    ones are silent, and every event is still tried."""

    def __init__(self, plan: TunePlan, log: TrialLog | None, progress: bool) -> None:
        self.plan, self.log, self.progress = plan, log, progress
        self.warned = False

    def started(self, trial: Any) -> None:
        values = {k: _plain(v) for k, v in (trial.config or {}).items()}
        self._say(trial, "started")
        if self.log is not None:
            self._call(self.log.trial_started, str(trial.trial_id), values, str(trial.path or ""))

    def result(self, trial: Any, result: Mapping[str, Any]) -> None:
        epoch = result.get("epoch")
        if (
            result.get(REPLAYED)
            or isinstance(epoch, bool)
            or not isinstance(epoch, (int, float))
            or not math.isfinite(epoch)
        ):
            return
        metrics = _result_metrics(result)
        value = metrics.get(self.plan.metric_key)
        shown = f"{value:.4g}" if value is not None else "?"
        self._say(trial, f"epoch {int(epoch)}/{self.plan.base.epochs}: {self.plan.metric} {shown}")
        if self.log is not None:
            self._call(self.log.trial_result, str(trial.trial_id), int(epoch), metrics)

    def ended(self, trial: Any, error: str | None = None) -> None:
        epochs = int((trial.last_result or {}).get("epoch") or 0)
        status = tune_plan.trial_status(error is not None, epochs, self.plan.base.epochs)
        how = {"FAILED": f": {error}", "KILLED": f", stopped early after {epochs} of {self.plan.base.epochs} epochs"}
        self._say(trial, f"{status}{how.get(status, f' after {epochs} epochs')}")
        if self.log is not None:
            self._call(self.log.trial_ended, str(trial.trial_id), status, epochs, error)

    def retrying(self, trial: Any) -> None:
        self._say(trial, "crashed; retrying from its last checkpoint")

    def _say(self, trial: Any, what: str) -> None:
        if self.progress:
            values = describe_values({k: _plain(v) for k, v in (trial.config or {}).items()})
            print(f"gssf tune: trial {trial.trial_id} ({values}) {what}", file=sys.stderr, flush=True)

    def _call(self, method: Callable[..., None], *args: Any) -> None:
        try:
            method(*args)
        except Exception as exc:
            if not self.warned:
                self.warned = True
                print(
                    f"gssf: warning: could not log a trial to the tracking store ({type(exc).__name__}: "
                    f"{first_line(exc)}); the tune goes on, and what is missing is logged when it ends",
                    file=sys.stderr,
                    flush=True,
                )


_DRIVERS: dict[str, _Driver] = {}
"""The driver of each experiment running in this process, by experiment name (see :func:`_callback`)."""


@contextlib.contextmanager
def _driver(name: str, driver: _Driver) -> Iterator[None]:
    _DRIVERS[name] = driver
    try:
        yield
    finally:
        _DRIVERS.pop(name, None)


def _callback(name: str) -> Any:
    """Tune's driver-side callback for experiment ``name``: it forwards each trial event to the :class:`_Driver`
    registered under that name in this process.

    Why by name: Tune pickles the callbacks into the experiment's ``tuner.pkl`` and ``Tuner.restore`` unpickles
    them. The callback pickles as a call of this function, so ``tuner.pkl`` holds no tracking client (which
    cannot be pickled) and a resumed tune's events reach the resuming process's driver, through this version's
    code.
    """
    from ray.tune import Callback

    def driver() -> _Driver | None:
        return _DRIVERS.get(name)

    class DriverCallback(Callback):
        def __reduce__(self) -> tuple[Any, tuple[str]]:
            return (_callback, (name,))

        def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            if (found := driver()) is not None:
                found.started(trial)

        def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict, **info: Any) -> None:
            if (found := driver()) is not None:
                found.result(trial, result)

        def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            if (found := driver()) is not None:
                found.ended(trial)

        def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            if (found := driver()) is not None:
                found.ended(trial, _trial_error(trial))

        def on_trial_recover(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            if (found := driver()) is not None:
                found.retrying(trial)

    return DriverCallback()


@contextlib.contextmanager
def _interrupt_watch() -> Iterator[list[bool]]:
    """Tell whether Ctrl-C (or SIGTERM) stopped ``Tuner.fit()``, and put the signal handlers back.

    Why: Tune catches the first Ctrl-C, stops the trials, saves the experiment's state (what a resume continues
    from) and returns normally, so a stopped search would look finished. Tune installs its own handler for the
    search and reinstates the previous one only when the signal arrives — so the previous handler being back in
    place afterwards means an interrupt. SIGTERM is turned into that same Ctrl-C while ``fit()`` runs, so a
    ``kill`` also leaves a resumable state; a second one interrupts at once.
    """
    import ray

    watching = (
        threading.current_thread() is threading.main_thread()
        and os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0") == "0"
        and not ray.util.client.ray.is_connected()
    )
    before = signal.getsignal(signal.SIGINT)
    sigterm = signal.getsignal(signal.SIGTERM)
    if watching:
        signal.signal(signal.SIGTERM, lambda signum, frame: signal.raise_signal(signal.SIGINT))
    flag = [False]
    try:
        yield flag
    finally:
        if watching:
            flag[0] = signal.getsignal(signal.SIGINT) is before
            signal.signal(signal.SIGINT, before)
            signal.signal(signal.SIGTERM, sigterm)


def _trial_spec(plan: TunePlan, config: TuneConfig, root: Path) -> dict[str, Any]:
    """What every trial shares. Paths are made absolute here: Ray runs trials in their own folders."""
    base = to_dict(plan.base)
    base["data"] = str(plan.base.data.expanduser().resolve())
    if plan.base.teacher is not None:
        base["teacher"] = str(plan.base.teacher.expanduser().resolve())
    return {
        "base": base,
        "root": str(root),
        "cpus": config.cpus_per_trial,
        "workers": config.workers_per_trial,
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
    import torch
    from ray import tune

    from gssf_cli.core.config import from_dict
    from gssf_cli.data.dataset import Dataset
    from gssf_cli.modeling import checkpoint as ckpt
    from gssf_cli.training.loop import Trainer

    cpus = int(spec["cpus"])
    torch.set_num_threads(cpus)
    tuned = {k: _plain(v) for k, v in values.items()}
    if "teacher" in tuned:
        tuned["teacher"] = str(Path(spec["root"]) / Path(str(tuned["teacher"])).expanduser())
    workers = int(spec.get("workers", 1))
    values = {**spec["base"], **tuned, "threads": cpus, "runs_dir": "runs", "workers": workers}
    config = from_dict(TrainConfig, values, "train")
    out_dir = config.runs_dir / tune.get_context().get_trial_id()
    metric_key = str(spec["metric_key"])
    resume_from: Path | None = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        shutil.rmtree(out_dir, ignore_errors=True)
        checkpoint.to_directory(str(out_dir))
        resume_from = out_dir / ckpt.LAST

    def report(epoch: int, metrics: dict[str, float], checkpoint_folder: Path) -> None:
        if metric_key not in metrics:
            raise UserInputError(f"--metric: trials report no {metric_key!r}; they report {', '.join(sorted(metrics))}")
        tune.report(
            {**metrics, "epoch": epoch, "reported_at": time.time()},
            checkpoint=tune.Checkpoint.from_directory(str(checkpoint_folder.parent)),
        )

    trainer = Trainer(config, Dataset(config.data), resume_from=resume_from)
    if trainer.resumed_metrics:
        # The epoch the checkpoint holds, once more: a scheduler decision lost with a killed driver is made again.
        tune.report({**trainer.resumed_metrics, "epoch": trainer.epochs_done, "reported_at": time.time(), REPLAYED: 1})
    if workers == 1:
        trainer.fit(out_dir, on_epoch_end=report)
        return
    DataParallel(config, gpu=config.device == "cuda").fit(trainer, out_dir, on_epoch_end=report)


def _result_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The metrics training reported in one Tune result (a live result or a row of the results table), without
    Tune's own bookkeeping and the epoch number itself."""
    from ray.tune.result import AUTO_RESULT_KEYS

    skip = {
        *AUTO_RESULT_KEYS,
        "done",
        "trial_id",
        "epoch",
        "reported_at",
        "experiment_tag",
        "should_checkpoint",
        REPLAYED,
    }
    return {
        str(k): float(v)
        for k, v in result.items()
        if str(k) not in skip
        and not str(k).startswith("config/")
        and isinstance(v, (int, float))
        and not isinstance(v, bool)
        and math.isfinite(v)
    }


def _trial_error(trial: Any) -> str:
    """A failed trial's error as one line: the exception Tune pickled for it, read from the trial's local folder
    (Tune copies it to the storage only later), else from the storage, else Tune's text of it."""
    from ray import cloudpickle

    readers = (
        lambda: cloudpickle.loads(Path(trial.pickled_error_file).read_bytes()),
        trial.get_pickled_error,
        trial.get_error,
    )
    for read in readers:
        error: Any = None
        with contextlib.suppress(Exception):
            error = read()
        if isinstance(error, BaseException):
            return error_line(error)
        if error:
            return first_line(error)
    return "the trial failed"


def _outcome(result: Any, plan: TunePlan) -> TrialOutcome:
    last = dict(result.metrics or {})
    values = {k: _plain(v) for k, v in (result.config or {}).items()}
    rows: dict[int, tuple[int, dict[str, float], float, float]] = {}
    frame = result.metrics_dataframe
    if frame is not None and not frame.empty and "epoch" in frame.columns:
        for record in frame.to_dict("records"):
            epoch = record.get("epoch")
            if not isinstance(epoch, (int, float)) or math.isnan(epoch):
                continue
            metrics = _result_metrics(record)
            stamp = float(record.get("reported_at") or record.get("timestamp") or time.time())
            rows[int(epoch)] = (int(stamp * 1000), metrics, float(record.get("time_total_s") or 0.0), stamp)
    history = [(epoch, stamp, metrics) for epoch, (stamp, metrics, _, _) in sorted(rows.items())]
    failed = result.error is not None
    seconds = max((total for _, _, total, _ in rows.values()), default=0.0)
    start_ms = end_ms = None
    if rows:
        end_ms = max(stamp for stamp, _, _, _ in rows.values())
        start_ms = int(end_ms - seconds * 1000)
    train_values = tune_results.trial_values_or_none(plan, values)
    head = None
    if train_values is not None:
        from gssf_cli.modeling.model import head_dim
        from gssf_cli.modeling.similarity import head_parameters

        dim = head_dim(from_dict(TrainConfig, train_values, "train"))
        head = head_parameters(str(train_values["metric"]), dim, int(train_values["block_size"]))
    return TrialOutcome(
        trial_id=str(last.get("trial_id") or Path(str(result.path)).name),
        values=values,
        status=tune_plan.trial_status(failed, len(history), plan.base.epochs),
        metric=tune_plan.best_value((m.get(plan.metric_key, math.nan) for _, _, m in history), plan.mode),
        epochs=len(history),
        seconds=round(seconds, 3),
        error=error_line(result.error) if failed else None,
        path=str(result.path),
        head_params=head,
        history=history,
        start_ms=start_ms,
        end_ms=end_ms,
    )


def _plain(value: Any) -> Any:
    """numpy scalars (Ray samples with numpy) as Python values, so configs and TOML take them."""
    item = getattr(value, "item", None)
    return item() if callable(item) else value
