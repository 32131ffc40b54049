"""Kill ``gssf train`` at every phase of an epoch; ``--resume`` must end exactly where an uninterrupted run does.

How a kill lands at a precise phase without a hook in the product: the training runs in a forked child of the
test process, in which one library function is wrapped to SIGKILL the child at that point. It is a real kill:
no exception handler or ``finally`` runs, the files are left as they are, the MLflow run stays RUNNING. Then
``gssf train --resume RUN`` runs here, and the run must match an uninterrupted one: the weights of ``best/``
and ``checkpoint/`` tensor for tensor, the final metrics, every epoch's metrics in MLflow (each step once),
status FINISHED, and nothing else left in the run folder. Older versions named their leftovers without a
process id: those disk states are built from a real run's folders. SIGTERM is sent to real ``gssf``
processes: their runs (a pipeline's parent too) must end KILLED.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner, Result

from gssf_cli.cli.app import app
from gssf_cli.core import files
from gssf_cli.core.errors import UserInputError
from gssf_cli.modeling import checkpoint as ckpt
from gssf_cli.tracking.adapter import StageRun, Tracker
from gssf_cli.training.loop import Trainer

EPOCHS = 3
TRAIN = [
    "--metric", "gssf", "--block-size", "4", "--embed-dim", "16", "--word-dim", "8", "--batch-size", "16",
    "--epochs", str(EPOCHS), "--lr", "0.003", "--device", "cpu", "--seed", "3", "--threads", "1",
]  # fmt: skip
RUN_FILES = ["best", "checkpoint", "config.json"]


def _cli(*args: str) -> Result:
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "120", "NO_COLOR": "1"})


def _quality(metrics: dict[str, float]) -> dict[str, float]:
    """Everything but the throughput, which depends on the machine's load."""
    return {k: v for k, v in metrics.items() if k != "samples_per_s"}


@dataclass(frozen=True)
class Finished:
    """What an uninterrupted run ends with."""

    metrics: dict[str, float]
    weights: dict[str, dict[str, torch.Tensor]]
    history: dict[str, list[tuple[int, float]]]


def _history(run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every per-epoch metric of a run as (step, value) rows, in step order."""
    client = Tracker().client
    keys = [k for k in client.get_run(run_id).data.metrics if not k.startswith("final_") and k != "best_epoch"]
    return {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        for key in keys
        if key != "samples_per_s"
    }


def _finished(run_dir: Path, metrics: dict[str, float]) -> Finished:
    weights = {name: load_file(str(run_dir / name / ckpt.MODEL)) for name in (ckpt.BEST, ckpt.LAST)}
    return Finished(_quality(metrics), weights, _history(run_dir.name))


@pytest.fixture(autouse=True)
def _restore_torch_threads() -> Iterator[None]:
    """``--threads 1`` (same arithmetic in every process) must not slow the rest of the session down."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tiny_syn: Path, tmp_path_factory: pytest.TempPathFactory) -> Finished:
    """An uninterrupted run, in its own folder and tracking store."""
    where = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(where)
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
            mp.delenv(name, raising=False)
        result = _cli("train", "--data", str(tiny_syn), *TRAIN, "--json")
        assert result.exit_code == 0, result.stderr
        out = json.loads(result.stdout)
        finished = _finished(where / "runs" / out["run_id"], out["metrics"])
    assert set(finished.history) >= {"loss", "lr", "val_rsum", "best_rsum"}
    assert all([step for step, _ in rows] == list(range(1, EPOCHS + 1)) for rows in finished.history.values())
    return finished


def _assert_resumes_identically(run_id: str, reference: Finished) -> dict[str, Any]:
    result = _cli("train", "--resume", run_id, "--json")
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["run_id"] == run_id
    resumed = _finished(Path("runs") / run_id, out["metrics"])
    assert resumed.metrics == reference.metrics
    for name, tensors in reference.weights.items():
        got = resumed.weights[name]
        assert got.keys() == tensors.keys() and all(torch.equal(got[k], tensors[k]) for k in tensors), name
    assert resumed.history == reference.history
    run = Tracker().client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == str(EPOCHS) and run.data.tags["gssf.task"] == "cross_modal"
    assert sorted(p.name for p in (Path("runs") / run_id).iterdir()) == RUN_FILES
    return out


# ---------------------------------------------------------------------------------------------------------
# Kill points: each wraps one function in the child so that a given call SIGKILLs it


Arm = Callable[[pytest.MonkeyPatch], None]


def _kill() -> NoReturn:
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable")


def _nth(n: int, matches: Callable[..., bool] = lambda *a, **k: True) -> Callable[..., bool]:
    """True at the ``n``-th call whose arguments match."""
    seen = 0

    def check(*args: Any, **kwargs: Any) -> bool:
        nonlocal seen
        if matches(*args, **kwargs):
            seen += 1
            return seen == n
        return False

    return check


def _kill_at(owner: Any, name: str, when: Callable[..., bool], *, after: bool = False) -> Arm:
    """Kill the process at the call of ``owner.name`` for which ``when(*args)`` holds, before it (or after)."""

    def arm(mp: pytest.MonkeyPatch) -> None:
        real = getattr(owner, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not after and when(*args, **kwargs):
                _kill()
            result = real(*args, **kwargs)
            if after and when(*args, **kwargs):
                _kill()
            return result

        mp.setattr(owner, name, wrapper)

    return arm


def _named(prefix: str) -> Callable[..., bool]:
    return lambda path, *args, **kwargs: Path(path).name.startswith(prefix)


def _writing_checkpoint_rng(tensors: Any, path: str) -> bool:
    return Path(path).name == ckpt.RNG and Path(path).parent.name.startswith(".checkpoint.tmp-")


def _mid_epoch(epoch: int, batch: int) -> Arm:
    """Kill after ``batch`` optimizer steps of epoch number ``epoch`` (from 1; the trainer reports each batch to
    the context of :meth:`Trainer._epoch_progress`, whatever progress the CLI gave it)."""

    def arm(mp: pytest.MonkeyPatch) -> None:
        real_epoch = Trainer._train_epoch
        current = {"epoch": -1}

        def train_epoch(self: Trainer, number: int) -> dict[str, float]:
            current["epoch"] = number
            return real_epoch(self, number)

        @contextlib.contextmanager
        def counting() -> Iterator[Callable[[float, float], None]]:
            done = 0

            def advance(loss: float, rate: float) -> None:
                nonlocal done
                done += 1
                if current["epoch"] == epoch and done == batch:
                    _kill()

            yield advance

        mp.setattr(Trainer, "_train_epoch", train_epoch)
        mp.setattr(Trainer, "_epoch_progress", lambda self, label, batches: counting())

    return arm


@dataclass(frozen=True)
class KillPoint:
    phase: str  # the phases: (a) before the first checkpoint ... (e) before the epoch's metrics are logged
    arm: Arm
    left: frozenset[str]  # what the kill leaves in the run folder (leftovers without their process id and tag)
    logged: tuple[int, ...]  # the epochs (numbered from 1, the MLflow steps) whose metrics were logged before the kill
    resumes_after: int  # the epochs done when --resume starts (it starts with epoch resumes_after + 1)


def _point(phase: str, arm: Arm, left: str, logged: tuple[int, ...] = (), resumes_after: int = 0) -> KillPoint:
    return KillPoint(phase, arm, frozenset(["config.json", *left.split()]), logged, resumes_after)


_CKPT_TMP, _BEST_TMP = _named(".checkpoint.tmp-"), _named(".best.tmp-")
KILL_POINTS: dict[str, KillPoint] = {
    # Epochs are numbered from 1, as gssf numbers them.
    # (a) before the first checkpoint: the run starts again at epoch 1 from its config.json
    "logging the run's start": _point("a", _kill_at(StageRun, "log_params", _nth(1)), ""),
    "mid-epoch 1": _point("a", _mid_epoch(1, 7), ""),
    "validation of epoch 1": _point("a", _kill_at(Trainer, "_validate", _nth(1)), ""),
    "best/ of epoch 1 written, no checkpoint yet": _point(
        "a", _kill_at(ckpt, "save", _nth(1, _named("best")), after=True), "best"
    ),
    # (b) mid-write of a checkpoint: a partial .checkpoint.tmp-*
    "writing the first checkpoint": _point(
        "b", _kill_at(ckpt, "save_file", _nth(1, _writing_checkpoint_rng)), "best .checkpoint.tmp"
    ),
    "writing epoch 2's checkpoint": _point(
        "b",
        _kill_at(ckpt, "save_file", _nth(2, _writing_checkpoint_rng)),
        "best checkpoint .checkpoint.tmp",
        (1,),
        resumes_after=1,
    ),
    # (c) between the two renames (no checkpoint/ at all), or before the old folder is removed
    "between the renames of the first checkpoint": _point(
        "c", _kill_at(Path, "rename", _nth(1, _CKPT_TMP)), "best .checkpoint.tmp", resumes_after=1
    ),
    "between the renames of epoch 2's checkpoint": _point(
        "c", _kill_at(Path, "rename", _nth(2, _CKPT_TMP)), "best .checkpoint.old .checkpoint.tmp", (1,), resumes_after=2
    ),
    "between the renames of best/ at epoch 1": _point("c", _kill_at(Path, "rename", _nth(1, _BEST_TMP)), ".best.tmp"),
    "removing epoch 1's checkpoint after epoch 2's": _point(
        "c",
        _kill_at(shutil, "rmtree", _nth(2, _named(".checkpoint.old-"))),
        "best checkpoint .checkpoint.old",
        (1,),
        resumes_after=2,
    ),
    # (d) mid-epoch and during validation, with a checkpoint on disk
    "mid-epoch 2": _point("d", _mid_epoch(2, 5), "best checkpoint", (1,), resumes_after=1),
    "validation of epoch 2": _point(
        "d", _kill_at(Trainer, "_validate", _nth(2)), "best checkpoint", (1,), resumes_after=1
    ),
    "start of epoch 3": _point(
        "d",
        _kill_at(Trainer, "_train_epoch", lambda self, epoch: epoch == 3),
        "best checkpoint",
        (1, 2),
        resumes_after=2,
    ),
    # (e) epoch 2 checkpointed, its metrics not logged yet; and the final logging after the last epoch
    "epoch 2 checkpointed, its metrics not logged": _point(
        "e",
        _kill_at(StageRun, "log_metrics", lambda self, metrics, step=None: step == 2),
        "best checkpoint",
        (1,),
        resumes_after=2,
    ),
    "final logging after the last epoch": _point(
        "e", _kill_at(StageRun, "log_artifacts", _nth(1)), "best checkpoint", (1, 2, 3), resumes_after=3
    ),
}


def _killed_run(arm: Arm, data: Path) -> str:
    """Train in a forked child that ``arm`` makes SIGKILL itself; the id of the run it leaves."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 3
        try:
            torch.set_num_threads(1)
            with pytest.MonkeyPatch.context() as mp:
                arm(mp)
                _cli("train", "--data", str(data), *TRAIN, "--json")
        except BaseException:
            code = 4
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"kill point not reached ({status})"
    (run_dir,) = Path("runs").iterdir()
    assert Tracker().client.get_run(run_dir.name).info.status == "RUNNING"
    return run_dir.name


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_a_kill_at_any_phase_resumes_to_the_uninterrupted_run(
    point: str, tiny_syn: Path, workdir: Path, reference: Finished
) -> None:
    kill = KILL_POINTS[point]
    run_id = _killed_run(kill.arm, tiny_syn)
    run_dir = workdir / "runs" / run_id
    assert {p.name.split("-")[0] for p in run_dir.iterdir()} == kill.left
    assert Tracker().metric_steps(run_id, "loss") == list(kill.logged)
    out = _assert_resumes_identically(run_id, reference)
    assert out["epochs_run"] == EPOCHS - kill.resumes_after


def test_leftovers_named_by_older_versions_are_recovered(tiny_syn: Path, workdir: Path, reference: Finished) -> None:
    """An older version named leftovers without a process id: a complete one is put back, and once it is over
    an hour old the rest goes."""
    run_id = _killed_run(KILL_POINTS["between the renames of epoch 2's checkpoint"].arm, tiny_syn)
    run_dir = workdir / "runs" / run_id
    an_hour_ago = time.time() - 2 * 3600
    for leftover in run_dir.glob(".checkpoint.*"):
        kind = leftover.name.split(".")[2].split("-")[0]
        renamed = leftover.rename(run_dir / f".checkpoint.{kind}-{os.urandom(4).hex()}")
        os.utime(renamed, (an_hour_ago, an_hour_ago))
    assert not (run_dir / ckpt.LAST).exists()
    assert ckpt.saved_state(run_dir / ckpt.LAST)["epochs_done"] == 2  # the complete tmp, newer than the old folder
    _assert_resumes_identically(run_id, reference)


def test_a_run_without_checkpoint_or_config_cannot_resume(tiny_syn: Path, workdir: Path) -> None:
    """Neither a checkpoint, nor ``config.json``, nor the config the run recorded at its creation (an older
    run): nothing says how it started."""
    from gssf_cli.stages.train import STARTED_TAG

    run_id = _killed_run(KILL_POINTS["validation of epoch 1"].arm, tiny_syn)
    (workdir / "runs" / run_id / ckpt.RUN_CONFIG).unlink()
    Tracker().client.delete_tag(run_id, STARTED_TAG)
    result = _cli("train", "--resume", run_id)
    assert result.exit_code == 2 and "has no local checkpoint" in result.stderr


def test_the_next_command_ends_a_killed_writers_run_killed(tiny_syn: Path, workdir: Path) -> None:
    """A SIGKILLed train leaves its run RUNNING; the next command that opens a run in the store marks it KILLED
    (and says why in a tag), while a RUNNING run of a writer on another host stays as it is. It still resumes."""
    from gssf_cli.core.files import machine_id
    from gssf_cli.tracking.adapter import DEAD_REASON_TAG, WRITER_TAG
    from tests.conftest import tiny_synthetic_args

    run_id = _killed_run(KILL_POINTS["validation of epoch 1"].arm, tiny_syn)
    client = Tracker().client
    elsewhere = "".join("1" if c == "0" else "0" for c in machine_id()[:8]) + machine_id()[8:]
    other = client.create_run(client.get_run(run_id).info.experiment_id, tags={WRITER_TAG: f"1.{elsewhere}"})
    assert _cli(*tiny_synthetic_args("data/next")).exit_code == 0
    killed = client.get_run(run_id)
    assert killed.info.status == "KILLED" and DEAD_REASON_TAG in killed.data.tags
    assert client.get_run(other.info.run_id).info.status == "RUNNING"
    assert _cli("train", "--resume", run_id).exit_code == 0
    assert client.get_run(run_id).info.status == "FINISHED"


# ---------------------------------------------------------------------------------------------------------
# SIGTERM: runs end KILLED, not RUNNING


def _gssf_process(workdir: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "COLUMNS": "120"}
    return subprocess.Popen(
        [sys.executable, "-m", "gssf_cli", *args],
        cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _wait_for(proc: subprocess.Popen[str], ready: Callable[[], bool], seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None and not ready():
        time.sleep(0.01)
    assert proc.poll() is None, f"{proc.args} ended before the signal: {proc.communicate()}"


def _checkpointed(workdir: Path) -> bool:
    return any(workdir.glob("runs/*/checkpoint/state.json"))


def test_sigterm_ends_the_run_killed_and_resume_finishes_it(tiny_syn: Path, workdir: Path, reference: Finished) -> None:
    proc = _gssf_process(workdir, "train", "--data", str(tiny_syn), *TRAIN, "--json")
    _wait_for(proc, lambda: _checkpointed(workdir))
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in stderr, stderr
    (run_dir,) = (workdir / "runs").iterdir()
    assert Tracker().client.get_run(run_dir.name).info.status == "KILLED"
    assert f"run {run_dir.name} ended KILLED; continue it with: gssf train --resume {run_dir.name}" in stderr, stderr
    _assert_resumes_identically(run_dir.name, reference)


def test_sigterm_ends_a_pipeline_and_its_stage_killed(workdir: Path) -> None:
    (workdir / "p.toml").write_text(
        '[pipeline]\nname = "sigterm"\n\n'
        '[prepare]\ndataset = "synthetic"\nout = "data/s"\ntrain_images = 64\ndev_images = 16\ntest_images = 16\n'
        "regions = 4\nregion_dim = 8\nconcepts = 6\nvocab_size = 30\n\n"
        '[train]\nmetric = "gssf"\nblock_size = 4\nembed_dim = 16\nword_dim = 8\nbatch_size = 16\nepochs = 200\n'
    )
    proc = _gssf_process(workdir, "run", "p.toml", "--json")
    _wait_for(proc, lambda: _checkpointed(workdir))
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in stderr, stderr
    tracker = Tracker(experiment="sigterm")
    (parent,) = tracker.client.search_runs([tracker.experiment_id], "tags.`gssf.stage` = 'run'")
    stages = {r.data.tags["gssf.stage"]: r.info.status for r in tracker.child_runs(parent.info.run_id)}
    assert parent.info.status == "KILLED" and stages == {"prepare": "FINISHED", "train": "KILLED"}


# ---------------------------------------------------------------------------------------------------------
# Staging folders (prepare, export) of killed processes


def _in_child(work: Callable[[], Any]) -> None:
    """Run ``work`` in a forked child that it is expected to SIGKILL."""
    pid = os.fork()
    if pid == 0:
        try:
            work()
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status


def test_staging_folders_of_dead_processes_are_removed(tmp_path: Path) -> None:
    out = tmp_path / "data" / "d"

    def killed_while_writing() -> None:
        with files.staged_folder(out) as staging:
            (staging / "half").write_text("x")
            _kill()

    _in_child(killed_while_writing)
    (dead,) = (tmp_path / "data").iterdir()
    assert dead.name.startswith(".d.partial-") and not out.exists()
    old_style = tmp_path / "data" / ".d.partial-0123abcd"
    old_style.mkdir()
    recent_old_style = tmp_path / "data" / ".d.partial-4567cdef"
    recent_old_style.mkdir()
    os.utime(old_style, (time.time() - 7200, time.time() - 7200))
    live = subprocess.Popen(["sleep", "60"])
    try:
        owned = tmp_path / "data" / f".d.partial-{live.pid}-89abcdef"
        owned.mkdir()
        with files.staged_folder(out) as staging:
            (staging / "manifest.json").write_text("{}")
        left = sorted(p.name for p in (tmp_path / "data").iterdir())
        assert left == sorted(["d", owned.name, recent_old_style.name])  # a live writer's and a recent one stay
    finally:
        live.kill()
        live.wait()


def test_a_kill_between_the_renames_of_a_staging_folder_keeps_the_new_output(tmp_path: Path) -> None:
    out = tmp_path / "d"
    out.mkdir()
    (out / "version").write_text("old")

    def killed_between_renames() -> None:
        with pytest.MonkeyPatch.context() as mp:
            _kill_at(Path, "rename", _named(".d.partial-"))(mp)
            with files.staged_folder(out, force=True) as staging:
                (staging / "version").write_text("new")

    _in_child(killed_between_renames)
    assert not out.exists() and len(list(tmp_path.iterdir())) == 2  # the new one staged, the old one retired
    with pytest.raises(UserInputError, match="already exists"), files.staged_folder(out):
        pass
    assert (out / "version").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["d"]
