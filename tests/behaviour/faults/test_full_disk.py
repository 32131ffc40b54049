"""A full disk loses nothing: on a small tmpfs mounted for the test, the filesystem fills up in the middle of a
checkpoint, of the best copy, of an export bundle, of an index build, of a ``prepare`` and of a write to the SQLite
store. Each command ends with one line that names the full filesystem (``gssf: disk full: ...``, exit 1); what was
committed before stays intact and loads; no partial file is left under a final name; and once the space is freed,
the interrupted command resumes (a training) or runs again.

How the disk fills "in the middle" without a hook in the product: the library function that starts the write
(:func:`gssf_cli.modeling.checkpoint.save`, :func:`gssf_cli.core.files.staged_folder`) is wrapped, in this process,
to fill the filesystem first; the write itself is the product's own. Needs ``mount`` (root): skipped elsewhere, and
a failure under CI, where it must run.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from gssf_cli.cli.app import app
from gssf_cli.core import files
from gssf_cli.modeling import checkpoint as ckpt
from gssf_cli.tracking.adapter import Tracker
from tests.conftest import tiny_synthetic_args

DISK_BYTES = 24 * 2**20
TRAIN = ["--metric", "gssf", "--block-size", "4", "--embed-dim", "16", "--word-dim", "8", "--batch-size", "16",
         "--lr", "0.003", "--device", "cpu", "--threads", "1"]  # fmt: skip


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of :data:`DISK_BYTES`, unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(mount)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"CI must be able to mount a tmpfs for the full-disk tests: {done.stderr.strip()}")
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path) -> Path:
    """Write a file on ``disk`` until the filesystem is full; its path (remove it to free the space)."""
    filler = disk / "filler"
    with filler.open("ab") as out, contextlib.suppress(OSError):
        while True:
            out.write(b"\0" * 2**16)
            out.flush()
    return filler


def _cli(*args: str) -> Result:
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "120", "NO_COLOR": "1"})


def _says_disk_full(result: Result, disk: Path) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("gssf:")]
    assert len(lines) == 1 and result.stderr.strip().endswith(lines[0]), result.stderr
    assert lines[0].startswith(f"gssf: disk full: no space left on {disk} ("), lines[0]
    return lines[0]


def _no_partial_files(folder: Path) -> None:
    """Nothing under a temporary name is left (``.NAME.partial-*``, ``.NAME.tmp-*``): the failed write cleaned up."""
    left = [p for p in folder.rglob(".*") if p.name != ".gssf"]
    assert not left, left


@pytest.fixture
def filled_at(monkeypatch: pytest.MonkeyPatch, disk: Path) -> Callable[[str, Callable[..., bool]], list[Path]]:
    """Wrap a library function so that the call that ``when(*args)`` picks fills ``disk`` before running."""

    def wrap(target: str, when: Callable[..., bool]) -> list[Path]:
        module, name = target.rsplit(".", 1)
        owner: Any = __import__(module, fromlist=[name])
        real = getattr(owner, name)
        fillers: list[Path] = []

        def filling(*args: Any, **kwargs: Any) -> Any:
            if not fillers and when(*args, **kwargs):
                fillers.append(_fill(disk))
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, filling)
        return fillers

    return wrap


@pytest.mark.parametrize("what", [ckpt.LAST, ckpt.BEST])
def test_a_full_disk_in_a_checkpoint_keeps_the_last_one_and_the_run_resumes(
    what: str, workdir: Path, disk: Path, filled_at: Callable[..., list[Path]]
) -> None:
    assert _cli(*tiny_synthetic_args()).exit_code == 0
    fillers = filled_at("gssf_cli.modeling.checkpoint.save", lambda folder, model, state, *rest: (
        folder.name == what and state["epochs_done"] == 2))  # fmt: skip
    runs = disk / "runs"
    failed = _cli("train", "--data", "data/syn", "--runs-dir", str(runs), "--epochs", "3", *TRAIN)
    assert fillers, f"no {what} was saved at epoch 2: {failed.stderr}"
    line = _says_disk_full(failed, disk)
    (run_dir,) = runs.iterdir()
    assert line.endswith(f"continue it with: gssf train --resume {run_dir.name}"), line
    assert Tracker().client.get_run(run_dir.name).info.status == "FAILED"
    _no_partial_files(runs)
    assert sorted(p.name for p in run_dir.iterdir()) == ["best", "checkpoint", "config.json"]
    saved = {name: ckpt.load(run_dir / name) for name in (ckpt.LAST, ckpt.BEST)}
    assert saved[ckpt.LAST].state["epochs_done"] == 1, "the committed checkpoint is the one before"
    assert saved[ckpt.BEST].state["epochs_done"] == (2 if what == ckpt.LAST else 1), "best/ is saved before"

    fillers[0].unlink()
    resumed = _cli("train", "--resume", run_dir.name, "--json")
    assert resumed.exit_code == 0, resumed.stderr
    assert json.loads(resumed.stdout)["epochs_run"] == 2, "epochs 2 and 3, from the checkpoint of epoch 1"
    assert ckpt.load(run_dir / ckpt.LAST).state["epochs_done"] == 3
    assert Tracker().client.get_run(run_dir.name).info.status == "FINISHED"
    _no_partial_files(runs)


@pytest.fixture
def trained(workdir: Path) -> str:
    """A finished tiny run on the normal disk, to export and index."""
    assert _cli(*tiny_synthetic_args()).exit_code == 0
    done = _cli("train", "--data", "data/syn", "--epochs", "1", *TRAIN, "--json")
    assert done.exit_code == 0, done.stderr
    return str(json.loads(done.stdout)["run_id"])


STAGED = {
    "export": "gssf_cli.core.files.staged_folder",
    "index": "gssf_cli.deploy.index_folder.staged_folder",
    "prepare": "gssf_cli.stages.prepare.staged_folder",
}


def _command(kind: str, out: Path, run_id: str) -> list[str]:
    if kind == "export":
        return ["export", "--onnx", "--run", run_id, "--out", str(out)]
    if kind == "index":
        return ["index", "--bundle", "exports/tiny", "--gallery", "data/syn/test_ims.npy", "--out", str(out)]
    return [*tiny_synthetic_args(str(out)), "--seed", "1"]


@pytest.mark.parametrize("kind", list(STAGED))
def test_a_full_disk_in_a_folder_write_leaves_no_folder_and_runs_again(
    kind: str, trained: str, disk: Path, filled_at: Callable[..., list[Path]]
) -> None:
    if kind == "index":
        assert _cli("export", "--onnx", "--run", trained, "--out", "exports/tiny").exit_code == 0
    before = {p: p.read_bytes() for p in Path("data/syn").iterdir()}
    out = disk / "out" / kind
    fillers = filled_at(STAGED[kind], lambda target, *rest: Path(target) == out)
    _says_disk_full(_cli(*_command(kind, out, trained)), disk)
    assert fillers and not out.exists(), "a failed write leaves no folder under its final name"
    _no_partial_files(disk / "out")
    assert {p: p.read_bytes() for p in Path("data/syn").iterdir()} == before

    fillers[0].unlink()
    again = _cli(*_command(kind, out, trained))
    assert again.exit_code == 0, again.stderr
    assert (out / files.MANIFEST).is_file()


def test_a_full_disk_under_the_store_keeps_what_it_held(
    workdir: Path, disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = disk / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    assert _cli(*tiny_synthetic_args()).exit_code == 0
    first = _cli("train", "--data", "data/syn", "--epochs", "1", *TRAIN, "--json")
    assert first.exit_code == 0, first.stderr
    filler = _fill(disk)
    line = _says_disk_full(_cli("train", "--data", "data/syn", "--epochs", "1", *TRAIN), disk)
    assert f"writing {store}: the tracking store kept what it held before" in line, line
    with contextlib.closing(sqlite3.connect(store)) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    run_id = json.loads(first.stdout)["run_id"]
    assert Tracker().client.get_run(run_id).info.status == "FINISHED"

    filler.unlink()
    again = _cli("train", "--data", "data/syn", "--epochs", "1", *TRAIN, "--json")
    assert again.exit_code == 0, again.stderr
