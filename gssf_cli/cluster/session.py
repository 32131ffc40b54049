"""What gssf runs on Ray: tune trials, and the workers of data-parallel training. The only module that imports Ray.

**Tune trials.** Each trial is :func:`_train_trial`: the library's own training
(:func:`gssf_cli.training.loop.fit`, no tracker) reporting every epoch's metrics and checkpoint with
``ray.tune.report``, so ASHA can stop weak trials early and a crashed trial is retried (``--max-failures``)
from its last checkpoint via ``tune.get_checkpoint()``. A trial uses ``--cpus-per-trial`` threads
(``torch.set_num_threads`` and ``TrainConfig.threads``); with ``--workers-per-trial N`` it drives N Ray Train
workers instead. Trials never open the tracking store: a driver-side
Tune callback passes each trial's start, epochs and end to a :class:`~gssf_cli.training.tune_plan.TrialLog` as they happen
(the tune stage logs them to MLflow), and prints them as plain progress lines on stderr. An interrupted search
continues with ``Tuner.restore`` (``run_trials(..., resume=True)``).

**Data-parallel training** (``gssf train --workers N``): :func:`data_parallel` checks that Ray can place the
workers, and :meth:`DataParallel.fit` runs the library's :class:`~gssf_cli.training.loop.Trainer` on each of them
under Ray Train's ``TorchTrainer`` (:mod:`gssf_cli.modeling.distributed` for the split and the gather). Workers never
open the tracking store either: the primary one sends each epoch's summary to this process through a Ray queue.

A local Ray uses all CPUs, no dashboard, no usage stats, and a session folder in a short temporary directory
removed afterwards (Unix socket paths must stay under ~107 characters); results go under ``--storage``.

Joining a cluster (``--address``): ``HOST:6379`` (the driver runs here, as a Ray node's peer) or
``ray://HOST:10001`` (Ray Client, installed with gssf's ``all`` extra; the head node must be started with
``--ray-client-server-port``). An address where nothing listens fails
in seconds (exit 2) instead of ``ray.init``'s minutes of retries. What the user must set up:

- Ray 2.60 clusters use token authentication: set ``RAY_AUTH_MODE=token`` here, with the cluster's token in
  ``~/.ray/auth_token`` (where ``ray start`` writes it), in ``RAY_AUTH_TOKEN``, or in a file named by
  ``RAY_AUTH_TOKEN_PATH``. Without it ``ray.init`` is refused ("InvalidAuthToken") and gssf exits 2. A cluster
  started with ``RAY_AUTH_MODE=disabled`` (trusted networks only) needs nothing.
- The same Python, Ray and gssf (``pip install gssf``) on every node; ``--data`` (and any teacher file) at the
  same absolute path on every node; for ``gssf train --workers``, also the working folder and ``--runs-dir``
  (the primary worker writes the checkpoints there).
- ``--storage`` that every node and this machine can reach: a shared folder (NFS) or a URI such as
  ``s3://bucket/gssf`` (with the cloud credentials in the nodes' environment); trial checkpoints go there.
- MLflow needs no access from the cluster: only this process logs. Under Ray Client, Tune's callbacks would
  run on the head node, so none are installed there: the trials are logged from their results after ``fit()``
  (no live runs, no progress lines).
"""

from __future__ import annotations

import contextlib
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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gssf_cli.core.config import TrainConfig, TuneConfig, to_dict
from gssf_cli.core.errors import UserInputError
from gssf_cli.core.limits import head_parameters
from gssf_cli.training import tune_plan as tuning
from gssf_cli.training.tune_plan import TrialLog, TrialOutcome, TunePlan, describe_values

if TYPE_CHECKING:
    from gssf_cli.training.loop import EpochCallback, EpochSummary, FitResult, Progress, Trainer

RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AIR_NEW_OUTPUT": "0"}
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
"""A local Ray on loopback only. Ray has no authentication by default and, as a cluster node, advertises the
machine's external IP and binds its GCS, raylet and worker gRPC servers to every interface. With this switch
(read when ``ray`` is imported, and inherited by every Ray process) Ray treats the machine as a single node:
its node address is 127.0.0.1 and every server binds loopback. Only ``--address`` joins a cluster."""
MAX_TEMP_DIR = 40
"""Ray's Unix socket paths add ~65 characters to its temporary folder; AF_UNIX allows 107 in all."""


def _loopback_only() -> None:
    """See :data:`LOOPBACK_ENV`; also applied to an already imported Ray (read at call time there)."""
    os.environ.update(LOOPBACK_ENV)
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False  # type: ignore[attr-defined]


def short_temp_root() -> str:
    """Where Ray's session folder goes: the temporary folder if its path is short enough for Ray's sockets,
    else ``/tmp`` (a long ``TMPDIR`` made ``gssf tune`` fail with "AF_UNIX path too long")."""
    root = tempfile.gettempdir()
    if len(root) <= MAX_TEMP_DIR - len("/gssf-ray-XXXXXXXX"):
        return root
    for fallback in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(fallback) and os.access(fallback, os.W_OK | os.X_OK):
            return fallback
    raise UserInputError(
        f"TMPDIR {root} is too long for Ray's socket paths (over {MAX_TEMP_DIR} characters) and /tmp is not "
        "writable: set TMPDIR to a short folder"
    )


def check_reachable(address: str, timeout: float = 3.0) -> None:
    """Fail in seconds when nothing listens at ``--address``: ``ray.init`` would retry for minutes."""
    if address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UserInputError(f"--address {address}: expected HOST:PORT (e.g. 10.0.0.5:6379) or ray://HOST:10001")
    if not 0 < int(port) < 65536:
        raise UserInputError(f"--address {address}: {port} is not a port number (1-65535)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise UserInputError(
            f"--address {address}: no Ray cluster answers there ({exc.strerror or exc}); "
            "start one with `ray start --head` or fix the address"
        ) from None
    if not _speaks_grpc(f"{host}:{port}", timeout):
        raise UserInputError(
            f"--address {address}: something listens there, but not Ray (no gRPC answer in {timeout:g} s); "
            "give the head node's GCS port (6379 by default) or its Ray Client port (ray://HOST:10001)"
        )


def _speaks_grpc(target: str, timeout: float) -> bool:
    """Whether ``target`` completes a gRPC (HTTP/2) handshake, as Ray's GCS and Ray Client servers do: ``ray.init``
    against anything else (a web server, a proxy) retries for minutes instead of failing."""
    import grpc

    channel = grpc.insecure_channel(target)
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
        return True
    except grpc.FutureTimeoutError:
        return False
    finally:
        channel.close()


def storage_path(storage: str) -> str:
    """Ray wants an absolute path or a URI; a relative folder is taken from the working directory."""
    if "://" in storage:
        return storage
    path = Path(storage).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def experiment_path(storage: str, name: str) -> str:
    """Where Tune keeps experiment ``name`` under ``storage`` (a folder or a URI): what ``Tuner.restore`` reads."""
    return f"{storage.rstrip('/')}/{name}"


def callbacks_run_here(address: str | None) -> bool:
    """Whether Tune's callbacks run in this process. Under Ray Client (``ray://``) Tune's controller, and so
    every callback, runs on the cluster's head node, which cannot reach this process's tracking store."""
    return not (address or "").startswith("ray://")


def check_restorable(path: str, address: str | None, what: str) -> None:
    """Before a resumed tune opens its run: ``path`` still holds the Tune experiment (``tuner.pkl``)."""
    _ray_environment(address)
    from ray.tune import Tuner

    try:
        found = Tuner.can_restore(path)
    except (OSError, ValueError) as exc:
        raise UserInputError(f"{what}: cannot read its Ray results at {path}: {_first_line(str(exc))}") from None
    if not found:
        raise UserInputError(
            f"{what}: its Ray results folder {path} is gone (or holds no Tune experiment), so it cannot be resumed; "
            "start a new `gssf tune`"
        )


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
    _ray_environment(config.address)
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    spec = _trial_spec(plan, config, root or Path.cwd())
    callbacks = [_callback(name)] if callbacks_run_here(config.address) else []
    with (
        contextlib.redirect_stdout(sys.stderr),
        _quiet_ray_logs(),
        _driver(name, _Driver(plan, log, progress)),
        _ray_session(config.address) as ray_seconds,
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
            scheduler: Any = FIFOScheduler()
            if plan.scheduler == "asha":
                scheduler = ASHAScheduler(
                    time_attr="training_iteration",
                    max_t=plan.base.epochs,
                    grace_period=min(config.grace_period, plan.base.epochs),
                    reduction_factor=config.reduction_factor,
                )
            tuner = tune.Tuner(
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
        with _interrupt_watch() as interrupted:
            grid = tuner.fit()
        outcomes = [_outcome(grid[index], plan) for index in range(len(grid))]
    return RayRun(outcomes, ray_seconds[0], interrupted[0])


def _concurrency(config: TuneConfig) -> int:
    """Trials at once (0: as Tune's resources allow). A trial with workers holds no CPU itself, so Tune would start
    them all and their Ray Train runs would wait on each other's CPUs: as many as the cluster's CPUs can train."""
    if config.max_concurrent or config.workers_per_trial == 1:
        return config.max_concurrent
    import ray

    cpus = float(ray.cluster_resources().get("CPU", 0.0))
    return max(1, int(cpus // (config.workers_per_trial * config.cpus_per_trial)))


def _ray_environment(address: str | None) -> None:
    """Ray's settings for gssf (no usage stats, the old console output), and loopback only unless joining a
    cluster; before Ray is imported, as some are read then."""
    os.environ.update(RAY_ENV)
    if not address:
        _loopback_only()


class _Driver:
    """What the driver does with Tune's trial events: print a progress line, and pass the event to the
    :class:`~gssf_cli.training.tune_plan.TrialLog`. A failing log must not end the search (the trials' results are still in
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
        if isinstance(epoch, bool) or not isinstance(epoch, (int, float)) or not math.isfinite(epoch):
            return
        metrics = _result_metrics(result)
        value = metrics.get(self.plan.metric_key)
        shown = f"{value:.4g}" if value is not None else "?"
        self._say(trial, f"epoch {int(epoch)}/{self.plan.base.epochs}: {self.plan.metric} {shown}")
        if self.log is not None:
            self._call(self.log.trial_result, str(trial.trial_id), int(epoch), metrics)

    def ended(self, trial: Any, error: str | None = None) -> None:
        epochs = int((trial.last_result or {}).get("training_iteration") or 0)
        status = tuning.trial_status(error is not None, epochs, self.plan.base.epochs)
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
                    f"{_first_line(str(exc))}); the tune goes on, and what is missing is logged when it ends",
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


@contextlib.contextmanager
def _ray_session(address: str | None) -> Iterator[list[float]]:
    """Use a running Ray (this process's, or a cluster's with ``--address``) or start a local one and stop
    it afterwards, removing its session folder."""
    import ray

    elapsed = [0.0]
    if ray.is_initialized():
        yield elapsed
        return
    temp_dir: str | None = None
    started = time.perf_counter()
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        if address:
            ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
        else:
            temp_dir = tempfile.mkdtemp(prefix="gssf-ray-", dir=short_temp_root())
            ray.init(
                num_cpus=os.cpu_count() or 1,
                include_dashboard=False,
                _temp_dir=temp_dir,
                log_to_driver=False,
                logging_level=logging.ERROR,
            )
    except (ConnectionError, TimeoutError, RuntimeError, ValueError, ray.exceptions.AuthenticationError) as exc:
        _abandon(temp_dir)
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        hint = " (is it running? does it need RAY_AUTH_MODE=token and its token?)" if address else ""
        raise UserInputError(f"cannot start or join {where}{hint}: {_first_line(str(exc))}") from None
    except SystemExit as exc:
        # SIGTERM while ray.init runs reaches Ray's own handler (sys.exit(15)): gssf ends it as an interrupt.
        _abandon(temp_dir)
        if exc.code == 128 + signal.SIGTERM or exc.code == signal.SIGTERM:
            raise KeyboardInterrupt from None
        raise
    except BaseException:
        _abandon(temp_dir)
        raise
    if threading.current_thread() is threading.main_thread() and callable(sigterm):
        signal.signal(signal.SIGTERM, sigterm)  # ray.init installs sys.exit(15); gssf ends its runs KILLED instead
    elapsed[0] = time.perf_counter() - started
    try:
        yield elapsed
    finally:
        ray.shutdown()
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)


def _abandon(temp_dir: str | None) -> None:
    """After a failed or interrupted ``ray.init``: stop what it started and remove the session folder."""
    import ray

    with contextlib.suppress(Exception):
        ray.shutdown()
    if temp_dir:
        shutil.rmtree(temp_dir, ignore_errors=True)


@contextlib.contextmanager
def _quiet_ray_logs(name: str = "ray.tune") -> Iterator[None]:
    """Ray logs every trial (or worker) error with a full traceback; gssf reports each error in one line."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


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

    from gssf_cli.core.config import TrainConfig, from_dict
    from gssf_cli.data.dataset import Dataset
    from gssf_cli.modeling import checkpoint as ckpt
    from gssf_cli.training.loop import Trainer, fit

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

    if workers == 1:
        fit(config, Dataset(config.data), out_dir, resume_from=resume_from, on_epoch_end=report)
        return
    trainer = Trainer(config, Dataset(config.data), resume_from=resume_from)
    DataParallel(config, gpu=config.device == "cuda").fit(trainer, out_dir, on_epoch_end=report)


def _result_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The metrics training reported in one Tune result (a live result or a row of the results table), without
    Tune's own bookkeeping and the epoch number itself."""
    from ray.tune.result import AUTO_RESULT_KEYS

    skip = {*AUTO_RESULT_KEYS, "done", "trial_id", "epoch", "reported_at", "experiment_tag", "should_checkpoint"}
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
            return _error_line(error)
        if error:
            return _first_line(str(error))
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
    train_values = tuning.trial_values_or_none(plan, values)
    head = None
    if train_values is not None:
        head = head_parameters(
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


def _plain(value: Any) -> Any:
    """numpy scalars (Ray samples with numpy) as Python values, so configs and TOML take them."""
    item = getattr(value, "item", None)
    return item() if callable(item) else value


def _error_line(error: BaseException) -> str:
    """The trial's own exception (Ray wraps it), as one line."""
    cause = getattr(error, "cause", None) or error
    text = _first_line(str(cause)) or type(cause).__name__
    return text if isinstance(cause, UserInputError) else f"{type(cause).__name__}: {text}"


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


# Data-parallel training on Ray Train ---------------------------------------------------------------------------


@contextlib.contextmanager
def data_parallel(config: TrainConfig) -> Iterator[DataParallel]:
    """Ray, ready to train ``config`` on ``config.workers`` workers: a local Ray (bound to loopback), or the
    cluster at ``config.address``. Everything that can refuse — an address where nothing listens, more workers
    than the CPUs (``workers × threads``) or GPUs there — is checked before this yields, so before the caller
    opens a tracked run."""
    gpu = precheck(config)
    _ray_environment(config.address)
    import ray

    with contextlib.redirect_stdout(sys.stderr), _ray_session(config.address):
        where = f"the Ray cluster at {config.address}" if config.address else "this machine"
        resources = {k: float(v) for k, v in ray.cluster_resources().items()}
        if config.device == "auto":
            gpu = resources.get("GPU", 0.0) >= config.workers
        _check_placement(config, gpu, resources, where)
        yield DataParallel(config, gpu)


def precheck(config: TrainConfig) -> bool:
    """The checks of :func:`data_parallel` that need no Ray: an ``--address`` that answers as Ray does, or workers
    that this machine's CPUs and GPUs can all run at once. Whether the workers train on GPUs."""
    gpu = _wants_gpu(config)
    if config.address:
        check_reachable(config.address)
    else:
        _check_placement(config, gpu, _local_resources(), "this machine")
    return gpu


def _wants_gpu(config: TrainConfig) -> bool:
    """Whether the workers train on GPUs: ``--device cuda``, or ``auto`` where every worker can have one."""
    if config.device != "auto":
        return config.device == "cuda"
    import torch

    return not config.address and torch.cuda.device_count() >= config.workers


def _local_resources() -> dict[str, float]:
    import torch

    return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


def _check_placement(config: TrainConfig, gpu: bool, resources: Mapping[str, float], where: str) -> None:
    """Refuse ``--workers`` that ``resources`` (a Ray cluster's totals) cannot all run at once."""
    threads = config.worker_threads()
    cpus, have_cpus = config.workers * threads, int(resources.get("CPU", 0.0))
    if cpus > have_cpus:
        raise UserInputError(
            f"--workers {config.workers}: needs {cpus} CPUs ({threads} per worker, --threads), but {where} has "
            f"{have_cpus}; use fewer workers or threads"
        )
    have_gpus = int(resources.get("GPU", 0.0))
    if gpu and config.workers > have_gpus:
        raise UserInputError(
            f"--workers {config.workers} --device cuda: needs a GPU per worker, but {where} has {have_gpus}; "
            "use fewer workers"
        )


class DataParallel:
    """Training runs of ``config`` on Ray Train workers (see :func:`data_parallel`)."""

    def __init__(self, config: TrainConfig, gpu: bool) -> None:
        self.config, self.gpu = config, gpu

    def fit(
        self,
        trainer: Trainer,
        out_dir: Path,
        on_epoch_end: EpochCallback | None = None,
        progress: Progress | None = None,
    ) -> FitResult:
        """Train ``trainer``'s run (built here for its checks, and resumed if it was) on the workers into
        ``out_dir``, which every worker must reach at the same path (a shared folder on a cluster).

        ``TorchTrainer`` starts ``config.workers`` workers in one process group (gloo on CPUs, NCCL on GPUs); each
        builds the same :class:`~gssf_cli.training.loop.Trainer` as a :class:`~gssf_cli.modeling.distributed.Shard` of the group
        and trains its rows of every batch under DistributedDataParallel. The primary worker validates, writes the
        usual checkpoints into ``out_dir`` and sends each epoch's summary through a Ray queue; this process (the
        driver, the only one that logs) passes it to ``progress`` and ``on_epoch_end`` as it arrives. At the end
        ``trainer`` loads the last checkpoint, so it holds the trained weights, as after :meth:`Trainer.fit`.
        """
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer
        from ray.util.queue import Empty

        from gssf_cli.modeling import checkpoint as ckpt

        config, started, first = self.config, time.perf_counter(), trainer.epochs_done + 1
        resume = out_dir / ckpt.LAST if trainer.epochs_done > 0 else None
        failure: list[BaseException] = []
        with _scratch() as (storage, queue):
            loop = {
                "config": to_dict(trainer.config),
                "cwd": os.getcwd(),
                "out_dir": str(out_dir),
                "resume": None if resume is None else str(resume),
                "gpu": self.gpu,
                "queue": queue,
            }
            torch_trainer = TorchTrainer(
                _train_worker,
                train_loop_config=loop,
                torch_config=TorchConfig(backend="nccl" if self.gpu else "gloo"),
                scaling_config=ScalingConfig(
                    num_workers=config.workers, use_gpu=self.gpu, resources_per_worker={"CPU": config.worker_threads()}
                ),
                run_config=RunConfig(
                    name=f"gssf-train-{out_dir.name}",
                    storage_path=storage,
                    failure_config=FailureConfig(max_failures=0),
                ),
            )

            def run() -> None:
                try:
                    with _quiet_ray_logs("ray.train"):
                        torch_trainer.fit()
                except BaseException as exc:  # raised again in the driver's thread below
                    failure.append(exc)

            thread = threading.Thread(target=run, name="gssf-ray-train", daemon=True)
            thread.start()
            while thread.is_alive() or not queue.empty():
                try:
                    summary = queue.get(timeout=0.5)
                except Empty:
                    continue
                if progress is not None:
                    progress.epoch_done(summary)
                if on_epoch_end is not None:
                    on_epoch_end(summary.epoch, summary.metrics, out_dir / ckpt.LAST)
            thread.join()
        if failure:
            raise _worker_error(failure[0]) from failure[0]  # --debug shows the worker's own traceback
        trainer.load_checkpoint(out_dir / ckpt.LAST)
        return trainer.result(out_dir, config.epochs - first + 1, time.perf_counter() - started)


@contextlib.contextmanager
def _scratch() -> Iterator[tuple[str, Any]]:
    """What one Ray Train run needs besides its workers: a storage folder for Ray Train's own bookkeeping (gssf's
    checkpoints go to the run folder) and the queue the primary worker sends epoch summaries through. Both are
    gone afterwards, whatever happened."""
    from ray.util.queue import Queue

    storage = tempfile.mkdtemp(prefix="gssf-train-", dir=short_temp_root())
    try:
        queue = Queue(actor_options={"num_cpus": 0})
        try:
            yield storage, queue
        finally:
            with contextlib.suppress(Exception):
                queue.shutdown(force=True)
    finally:
        shutil.rmtree(storage, ignore_errors=True)


class _QueueProgress:
    """The primary worker's :class:`~gssf_cli.training.loop.Progress`: each epoch's summary goes to the driver."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    @contextlib.contextmanager
    def epoch(self, label: str, batches: int) -> Iterator[Callable[[float, float], None]]:
        yield lambda loss, rate: None

    @contextlib.contextmanager
    def validation(self, label: str, steps: int) -> Iterator[Callable[[str], None]]:
        yield lambda what: None

    def epoch_done(self, summary: EpochSummary) -> None:
        self.queue.put(summary)


def _train_worker(loop: dict[str, Any]) -> None:
    """One Ray Train worker: the library's trainer as its shard of the process group Ray Train set up."""
    import torch

    from gssf_cli.core.config import TrainConfig, from_dict
    from gssf_cli.data.dataset import Dataset
    from gssf_cli.modeling.distributed import Shard
    from gssf_cli.training.loop import Trainer

    cwd = Path(loop["cwd"])
    if not cwd.is_dir():
        raise UserInputError(
            f"the working folder {cwd} does not exist on a worker's node: run from a folder shared by every node"
        )
    os.chdir(cwd)
    config = from_dict(TrainConfig, loop["config"], "train")
    torch.set_num_threads(config.worker_threads())
    shard = Shard.current()
    device = torch.device("cpu")
    if loop["gpu"]:
        from ray.train.torch import get_device

        device = get_device()
    progress = _QueueProgress(loop["queue"]) if shard.primary else None
    resume = None if loop["resume"] is None else Path(loop["resume"])
    trainer = Trainer(config, Dataset(config.data), resume_from=resume, progress=progress, shard=shard, device=device)
    trainer.fit(Path(loop["out_dir"]))


def _worker_error(error: BaseException) -> BaseException:
    """A failed Ray Train run's first worker exception (a :class:`UserInputError` stays one), else ``error``."""
    failures = getattr(error, "worker_failures", None) or {}
    for cause in failures.values():
        cause = getattr(cause, "cause", None) or cause
        if isinstance(cause, UserInputError):
            return UserInputError(str(cause))
        return RuntimeError(f"a training worker failed: {_error_line(cause)}")
    return error
