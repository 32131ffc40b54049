"""Data-parallel training on Ray Train (``gssf train --workers N``).

**Data-parallel training** (``gssf train --workers N``): :func:`data_parallel` checks that Ray can place the
workers, and :meth:`DataParallel.fit` runs the library's :class:`~gssf_cli.training.loop.Trainer` on each of them
under Ray Train's ``TorchTrainer`` (:mod:`gssf_cli.modeling.distributed` for the split and the gather). Workers never
open the tracking store either: the primary one sends each epoch's summary to this process through a Ray queue.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gssf_cli.cluster.session import (
    check_reachable,
    error_line,
    quiet_ray_logs,
    ray_environment,
    ray_session,
    ray_temp_folder,
)
from gssf_cli.core.config import to_dict
from gssf_cli.core.errors import UserInputError, WorkerLostError
from gssf_cli.core.stage_configs import TrainConfig

if TYPE_CHECKING:
    from gssf_cli.training.loop import EpochCallback, EpochSummary, FitResult, Progress, Trainer


@contextlib.contextmanager
def data_parallel(config: TrainConfig) -> Iterator[DataParallel]:
    """Ray, ready to train ``config`` on ``config.workers`` workers: a local Ray (bound to loopback), or the
    cluster at ``config.address``. Everything that can refuse — an address where nothing listens, more workers
    than the CPUs (``workers × threads``) or GPUs there — is checked before this yields, so before the caller
    opens a tracked run."""
    gpu = precheck(config)
    ray_environment(config.address)
    import ray

    with contextlib.redirect_stdout(sys.stderr), ray_session(config.address):
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
        from ray.util.queue import Empty

        from gssf_cli.modeling import checkpoint as ckpt

        config, started, first = self.config, time.perf_counter(), trainer.epochs_done + 1
        resume = out_dir / ckpt.LAST if trainer.epochs_done > 0 else None
        failure: list[BaseException] = []
        with _scratch() as (storage, queue):
            torch_trainer = self._torch_trainer(trainer, out_dir, resume, storage, queue)

            def run() -> None:
                try:
                    with quiet_ray_logs("ray.train"):
                        torch_trainer.fit()
                except BaseException as exc:  # raised again in the driver's thread below
                    failure.append(exc)

            thread = threading.Thread(target=run, name="gssf-ray-train", daemon=True)
            thread.start()
            try:
                while thread.is_alive() or not queue.empty():
                    try:
                        summary = queue.get(timeout=0.5)
                    except Empty:
                        continue
                    if progress is not None:
                        progress.epoch_done(summary)
                    if on_epoch_end is not None:
                        on_epoch_end(summary.epoch, summary.metrics, out_dir / ckpt.LAST)
            except BaseException:
                # The driver's side failed (a callback, Ctrl-C): without the queue the primary worker's next epoch
                # fails, so Ray Train's run ends, and its thread with it, before this raises.
                with contextlib.suppress(Exception):
                    queue.shutdown(force=True)
                thread.join()
                raise
            thread.join()
        if failure:
            raise _worker_error(failure[0]) from failure[0]  # --debug shows the worker's own traceback
        trainer.load_checkpoint(out_dir / ckpt.LAST)
        return trainer.result(out_dir, config.epochs - first + 1, time.perf_counter() - started)

    def _torch_trainer(self, trainer: Trainer, out_dir: Path, resume: Path | None, storage: str, queue: Any) -> Any:
        """Ray Train's ``TorchTrainer`` for ``trainer``'s run: ``config.workers`` workers of ``worker_threads()``
        CPUs (and a GPU each on CUDA), each running :func:`_train_worker`; up to ``config.max_failures`` restarts of
        the group after a lost worker, each from the run's last checkpoint (:func:`_resume_point`)."""
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        config = self.config
        loop = {
            "config": to_dict(trainer.config),
            "cwd": os.getcwd(),
            "out_dir": str(out_dir),
            "resume": None if resume is None else str(resume),
            "gpu": self.gpu,
            "queue": queue,
        }
        return TorchTrainer(
            _train_worker,
            train_loop_config=loop,
            torch_config=TorchConfig(backend="nccl" if self.gpu else "gloo"),
            scaling_config=ScalingConfig(
                num_workers=config.workers, use_gpu=self.gpu, resources_per_worker={"CPU": config.worker_threads()}
            ),
            run_config=RunConfig(
                name=f"gssf-train-{out_dir.name}",
                storage_path=storage,
                failure_config=FailureConfig(max_failures=config.max_failures),
            ),
        )


@contextlib.contextmanager
def _scratch() -> Iterator[tuple[str, Any]]:
    """What one Ray Train run needs besides its workers: a storage folder for Ray Train's own bookkeeping (gssf's
    checkpoints go to the run folder) and the queue the primary worker sends epoch summaries through. Both are
    gone afterwards, whatever happened."""
    from ray.util.queue import Queue

    storage = ray_temp_folder("gssf-train-")
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

    from gssf_cli.core.config import from_dict
    from gssf_cli.core.stage_configs import TrainConfig
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
    resume = _resume_point(loop)
    trainer = Trainer(config, Dataset(config.data), resume_from=resume, progress=progress, shard=shard, device=device)
    trainer.fit(Path(loop["out_dir"]))


def _resume_point(loop: dict[str, Any]) -> Path | None:
    """Where a worker starts: the run folder's last checkpoint when there is one — a resumed run's, or the one an
    earlier attempt of this group wrote before Ray Train restarted it (``--max-failures``) — else the beginning.
    Every worker reads the same folder and none repairs it (the primary's next save does), so all see the same
    state and the restarted group continues as one."""
    from gssf_cli.modeling import checkpoint as ckpt

    last = Path(loop["out_dir"]) / ckpt.LAST
    if (last / ckpt.STATE).is_file():
        return last
    return None if loop["resume"] is None else Path(loop["resume"])


def _worker_error(error: BaseException) -> BaseException:
    """What a failed Ray Train run says in one line: a worker's :class:`UserInputError` stays one; a lost worker —
    whichever worker reported first, the lost one or a peer whose collective it cut — is a
    :class:`WorkerLostError`; else the first worker's exception; ``error`` when no worker's is known."""
    causes = [getattr(c, "cause", None) or c for c in (getattr(error, "worker_failures", None) or {}).values()]
    for cause in causes:
        if isinstance(cause, UserInputError):
            return UserInputError(str(cause))
    for cause in causes:
        if _lost(cause):
            return WorkerLostError(f"a training worker was lost ({error_line(cause)})")
    if causes:
        return RuntimeError(f"a training worker failed: {error_line(causes[0])}")
    return error


def _lost(cause: BaseException) -> bool:
    return any(mark in type(cause).__name__ for mark in LOST_WORKER_ERRORS) or any(
        words in str(cause) for words in LOST_PEER_WORDS
    )


LOST_PEER_WORDS = ("Connection closed by peer", "Connection reset by peer", "caused by a remote worker crashing")
"""How gloo words a collective that a dead worker cut (the surviving worker's error, which may reach the driver
first): the peer was lost, not the training code at fault."""
LOST_WORKER_ERRORS = ("HealthCheck", "ActorDied", "ActorError", "NodeDied", "WorkerCrashed", "ActorUnavailable")
"""Ray's ways of saying a worker's process or node is gone (``WorkerHealthCheckFailedError``, ``ActorDiedError``,
``RayActorError``, ...), by the names of their types: a lost worker, not a failure of the training code."""
