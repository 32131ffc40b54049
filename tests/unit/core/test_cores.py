"""The default thread count: the cores no other process is busy on (so an OpenMP team never waits for a core that
another process holds), read from the kernel's run queue."""

from __future__ import annotations

import contextlib
import multiprocessing
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from gssf_cli.core import cores
from gssf_cli.core.cores import free_cores, runnable_threads, usable_cores
from gssf_cli.data.dataset import Dataset
from gssf_cli.training import loop
from tests.conftest import tiny_train_config


def _spin(until: float) -> None:
    while time.monotonic() < until:
        pass


@contextlib.contextmanager
def _busy(processes: int, seconds: float = 30.0) -> Iterator[None]:
    """``processes`` busy loops beside this one, stopped on leaving."""
    until = time.monotonic() + seconds
    spinning = [multiprocessing.get_context("fork").Process(target=_spin, args=(until,)) for _ in range(processes)]
    for process in spinning:
        process.start()
    time.sleep(0.2)
    try:
        yield
    finally:
        for process in spinning:
            process.terminate()
            process.join()


def test_the_run_queue_is_read_from_the_kernel_or_not_at_all(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    stat.write_text("cpu  1 2 3 4\nctxt 99\nprocs_running 3\nprocs_blocked 0\n")
    assert runnable_threads(stat) == 3
    stat.write_text("cpu  1 2 3 4\n")
    assert runnable_threads(stat) is None
    assert runnable_threads(tmp_path / "absent") is None


def test_free_cores_leave_out_the_cores_others_are_busy_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cores, "SAMPLE_SECONDS", 0.0)
    for running, free in ((1, usable_cores()), (2, max(1, usable_cores() - 1)), (10_000, 1)):
        monkeypatch.setattr(cores, "runnable_threads", lambda running=running: running)
        assert free_cores() == free
    monkeypatch.setattr(cores, "runnable_threads", lambda: None)
    assert free_cores() == usable_cores()  # a system that does not say: every core


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="the run queue is read from /proc/stat")
def test_a_busy_process_on_every_core_leaves_one_thread() -> None:
    assert 1 <= free_cores() <= usable_cores()
    with _busy(usable_cores()):
        assert free_cores() == 1


def test_training_threads_follow_the_setting_else_the_free_cores(
    tiny_syn: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(loop, "free_cores", lambda: 1)
        loop.Trainer(tiny_train_config(tiny_syn, threads=0), Dataset(tiny_syn))
        assert torch.get_num_threads() == 1
        monkeypatch.setattr(loop, "free_cores", lambda: 2)
        loop.Trainer(tiny_train_config(tiny_syn, threads=0), Dataset(tiny_syn))
        assert torch.get_num_threads() == 2
        loop.Trainer(tiny_train_config(tiny_syn, threads=1), Dataset(tiny_syn))
        assert torch.get_num_threads() == 1  # --threads N wins
    finally:
        torch.set_num_threads(before)
