"""Data-parallel training's checks that need no Ray (placement on this machine) and how a failed worker is
reported (real Ray Train runs: tests/behaviour/test_cluster_training.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gssf_cli.cluster.train_workers import precheck
from gssf_cli.core.errors import UserInputError
from gssf_cli.core.stage_configs import TrainConfig


def _ray_started() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def test_precheck_refuses_more_workers_than_cpus_without_starting_ray() -> None:
    cpus = os.cpu_count() or 1
    started = _ray_started()
    too_many = TrainConfig(data=Path("d"), workers=cpus + 1, device="cpu")
    with pytest.raises(
        UserInputError,
        match=rf"--workers {cpus + 1}: needs {cpus + 1} CPUs \(1 per worker, --threads\), but this machine has {cpus}; use fewer workers or threads",
    ):
        precheck(too_many)
    threads = TrainConfig(data=Path("d"), workers=2, threads=cpus, device="cpu")
    with pytest.raises(UserInputError, match=rf"needs {2 * cpus} CPUs \({cpus} per worker"):
        precheck(threads)
    assert precheck(TrainConfig(data=Path("d"), workers=cpus, device="cpu")) is False, "fits, and on CPUs"
    assert _ray_started() == started, "the checks run before Ray"


def test_precheck_refuses_gpu_workers_without_gpus() -> None:
    import torch

    gpus = torch.cuda.device_count()
    with pytest.raises(
        UserInputError,
        match=rf"--workers {gpus + 1} --device cuda: needs a GPU per worker, but this machine has {gpus}",
    ):
        precheck(TrainConfig(data=Path("d"), workers=gpus + 1, threads=1, device="cuda"))


def test_a_failed_training_worker_is_reported_by_its_own_error() -> None:
    """Ray Train ends a run whose worker raised with a ``WorkerGroupError`` of every worker's exception: a bad-input
    error stays one (exit 2, its message), anything else becomes one line naming it."""
    from ray.exceptions import RayTaskError
    from ray.train import WorkerGroupError

    from gssf_cli.cluster.train_workers import _worker_error

    refused = UserInputError("data/syn: the dev split cannot rank")
    error = _worker_error(WorkerGroupError("failed", {0: refused}))
    assert isinstance(error, UserInputError) and str(error) == "data/syn: the dev split cannot rank"
    crashed = RayTaskError("train_fn", "Traceback ...", RuntimeError("CUDA out of memory"))
    error = _worker_error(WorkerGroupError("failed", {1: crashed}))
    assert isinstance(error, RuntimeError)
    assert str(error) == "a training worker failed: RuntimeError: CUDA out of memory"
    other = ValueError("no workers")
    assert _worker_error(other) is other


def test_a_lost_training_worker_is_not_an_internal_error() -> None:
    """A worker whose process or node died (Ray's health check fails) used to be reported as an internal error;
    it is a :class:`WorkerLostError` (one line, exit 1), which the train stage completes with the resume command."""
    from ray.train import WorkerGroupError

    from gssf_cli.cluster.train_workers import _worker_error
    from gssf_cli.core.errors import WorkerLostError

    class WorkerHealthCheckFailedError(RuntimeError):
        pass

    error = _worker_error(WorkerGroupError("failed", {1: WorkerHealthCheckFailedError("worker 1 missed 3 polls")}))
    assert isinstance(error, WorkerLostError)
    assert str(error) == "a training worker was lost (WorkerHealthCheckFailedError: worker 1 missed 3 polls)"
    # The survivor's collective, cut by the dead peer, may reach the driver first (seen in CI): still a lost worker.
    cut = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:43757. This is "
                       "typically caused by a remote worker crashing.")  # fmt: skip
    error = _worker_error(WorkerGroupError("failed", {0: cut}))
    assert isinstance(error, WorkerLostError) and "Connection closed by peer" in str(error)


def test_a_restarted_worker_group_continues_from_the_runs_last_checkpoint(tmp_path: Path) -> None:
    """With ``--max-failures``, Ray Train restarts the group by calling every worker's function again with the
    same arguments: each then starts from the checkpoint an earlier attempt wrote, and a group that never wrote
    one starts where the run does (the beginning, or the resumed checkpoint)."""
    from gssf_cli.cluster.train_workers import DataParallel, _resume_point
    from gssf_cli.modeling import checkpoint as ckpt

    loop = {"out_dir": str(tmp_path), "resume": None}
    assert _resume_point(loop) is None
    assert _resume_point(loop | {"resume": "elsewhere/checkpoint"}) == Path("elsewhere/checkpoint")
    model = torch.nn.Linear(2, 2)
    ckpt.save(tmp_path / ckpt.LAST, model, {"epoch": 1}, torch.optim.AdamW(model.parameters()))
    assert _resume_point(loop) == tmp_path / ckpt.LAST
    trainer = SimpleNamespace(config=TrainConfig(data=Path("d"), workers=2, max_failures=3), epochs_done=0)
    built = DataParallel(trainer.config, gpu=False)._torch_trainer(trainer, tmp_path, None, str(tmp_path), None)
    assert built.run_config.failure_config.max_failures == 3


def test_a_failing_epoch_callback_ends_the_ray_train_run_before_it_raises(tiny_syn: Path, tmp_path: Path) -> None:
    """The driver's epoch callback fails (a tune trial's report, once Tune stopped the trial): the error reaches the
    caller, and Ray Train's run, with the thread that drives it, has ended by then — none is left training."""
    import threading

    from gssf_cli.cluster.train_workers import data_parallel
    from gssf_cli.data.dataset import Dataset
    from gssf_cli.training.loop import Trainer
    from tests.conftest import tiny_train_config

    config = tiny_train_config(tiny_syn, workers=2, epochs=3)
    assert isinstance(config, TrainConfig)

    def fail(epoch: int, metrics: dict[str, float], folder: Path) -> None:
        raise RuntimeError(f"the log failed at epoch {epoch}")

    with data_parallel(config) as workers:
        with pytest.raises(RuntimeError, match="the log failed at epoch 1"):
            workers.fit(Trainer(config, Dataset(tiny_syn)), tmp_path / "run", on_epoch_end=fail)
        assert [t for t in threading.enumerate() if t.name == "gssf-ray-train"] == []
