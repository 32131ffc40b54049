"""The tracking store before MLflow touches it: which store, whether it answers, and one writer at a time."""

from __future__ import annotations

import hashlib
import os
import socket
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import Result

from gssf_cli.core.errors import UserInputError
from gssf_cli.tracking import store
from gssf_cli.tracking.adapter import Tracker
from gssf_cli.tracking.store import check_store, default_tracking_uri, probe_server, resolve_tracking_uri, sqlite_path
from tests.conftest import tiny_synthetic_args

PIPELINE = Path(__file__).resolve().parents[3] / "pipelines" / "quickstart.toml"


def test_uri_precedence(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_tracking_uri() == default_tracking_uri() == f"sqlite:///{workdir.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert resolve_tracking_uri() == "sqlite:///env.db"
    assert resolve_tracking_uri("http://127.0.0.1:1") == "http://127.0.0.1:1"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _one_line_error(result: Result) -> str:
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gssf: error: "), result.stderr
    return lines[0]


# Every command that tracks probes the server before any work. The arguments need not be valid beyond
# parsing: the tracker comes before the dataset or run they name is read.
TRACKED_COMMANDS = {
    "prepare": tiny_synthetic_args(),
    "train": ["train", "--data", "data/syn", "--epochs", "1"],
    "evaluate": ["evaluate", "--run", "latest"],
    "tune": ["tune", "--data", "data/syn", "--param", "block_size", "--values", "2,4"],
    "export": ["export", "--onnx", "--run", "latest"],
    "run": ["run", str(PIPELINE)],
}


@pytest.mark.parametrize("command", sorted(TRACKED_COMMANDS))
def test_unreachable_server_fails_fast_in_one_line(gssf: Callable[..., Result], workdir: Path, command: str) -> None:
    """A closed port: mlflow alone retries for minutes (about 260 s); the probe answers at once."""
    url = f"http://127.0.0.1:{_free_port()}"
    started = time.monotonic()
    result = gssf("--tracking-uri", url, *TRACKED_COMMANDS[command])
    elapsed = time.monotonic() - started
    line = _one_line_error(result)
    assert f"tracking server {url} is not reachable" in line
    assert "start the tracking server, or fix --tracking-uri / MLFLOW_TRACKING_URI" in line
    assert elapsed < 30, elapsed
    assert not (workdir / "data").exists() and not (workdir / "mlflow.db").exists()


def test_server_that_accepts_but_never_answers_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """TCP connects (the kernel completes the handshake) but no HTTP answer comes: bounded by the probe's
    HTTP timeout, not mlflow's two minutes per request times seven retries."""
    monkeypatch.setattr(store, "PROBE_HTTP_TIMEOUT_S", 0.5)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(UserInputError, match=r"does not answer HTTP on /health within 0.5 s \(timed out\)"):
            Tracker(url)
    assert time.monotonic() - started < 30


def test_sqlite_store_in_a_missing_folder_is_refused(gssf: Callable[..., Result], workdir: Path) -> None:
    line = _one_line_error(gssf("--tracking-uri", f"sqlite:///{workdir}/nowhere/mlflow.db", *tiny_synthetic_args()))
    assert f"folder {workdir}/nowhere does not exist: create it or fix --tracking-uri" in line
    assert not (workdir / "nowhere").exists() and not (workdir / "data").exists()
    (workdir / "afile").write_text("x")
    line = _one_line_error(gssf("--tracking-uri", "sqlite:///afile/mlflow.db", *tiny_synthetic_args()))
    assert f"folder {workdir}/afile is not a folder" in line


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes anywhere")
def test_sqlite_store_in_an_unwritable_folder_is_refused(gssf: Callable[..., Result], workdir: Path) -> None:
    locked = workdir / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        line = _one_line_error(gssf("--tracking-uri", f"sqlite:///{locked}/mlflow.db", *tiny_synthetic_args()))
    finally:
        locked.chmod(0o755)
    assert f"{locked} is not writable" in line


def test_half_migrated_store_is_refused_and_left_untouched(gssf: Callable[..., Result], workdir: Path) -> None:
    """A migration killed midway leaves ``_alembic_tmp_<table>``; mlflow would fail on it on every command
    (``table _alembic_tmp_experiments already exists``) or, migrating again, risk the table's rows."""
    assert gssf(*tiny_synthetic_args()).exit_code == 0
    db = workdir / "mlflow.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE _alembic_tmp_experiments (experiment_id INTEGER)")
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    line = _one_line_error(gssf(*tiny_synthetic_args("data/again")))
    assert f"tracking store {db} was left half-migrated" in line
    assert "leftover table _alembic_tmp_experiments" in line
    assert f"sqlite3 {db} 'DROP TABLE _alembic_tmp_experiments'" in line
    assert "mlflow db upgrade" in line
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    assert not (workdir / "data" / "again").exists()
    with pytest.raises(UserInputError, match="half-migrated"):
        Tracker()
    # The repair the message names makes the store usable again.
    with sqlite3.connect(db) as conn:
        conn.execute("DROP TABLE _alembic_tmp_experiments")
    assert gssf(*tiny_synthetic_args("data/again")).exit_code == 0


def test_leftover_of_a_dropped_table_is_renamed_back(workdir: Path) -> None:
    """Once the original table is gone, the temporary copy holds its rows: the repair renames, never drops."""
    db = workdir / "mlflow.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE _alembic_tmp_runs (run_uuid TEXT)")
    with pytest.raises(UserInputError, match="'ALTER TABLE _alembic_tmp_runs RENAME TO runs'"):
        Tracker()


def test_sqlite_path_of_a_uri(workdir: Path) -> None:
    assert sqlite_path("sqlite:////data/runs/mlflow.db") == Path("/data/runs/mlflow.db")
    assert sqlite_path("sqlite:///mlflow.db") == workdir / "mlflow.db", "relative to the working directory"
    assert sqlite_path("sqlite:///my%20runs/m.db?timeout=5") == workdir / "my runs" / "m.db"
    for uri in ("sqlite:///:memory:", "sqlite:///", "sqlite:///file:m.db?mode=memory", "http://h:5000", "file:///x"):
        assert sqlite_path(uri) is None, uri


def test_check_store_refuses_a_database_that_is_a_folder(tmp_path: Path) -> None:
    (tmp_path / "mlflow.db").mkdir()
    with pytest.raises(UserInputError, match=r"mlflow\.db is not a file: fix --tracking-uri / MLFLOW_TRACKING_URI"):
        check_store(f"sqlite:///{tmp_path}/mlflow.db")
    check_store(f"sqlite:///{tmp_path}/other.db")
    check_store("databricks")  # not a store gssf can check: left to mlflow
    assert [p.name for p in tmp_path.iterdir()] == ["mlflow.db"], "checking creates nothing"


def test_probe_refuses_a_uri_without_host_or_with_a_bad_port() -> None:
    with pytest.raises(UserInputError, match="names no host"):
        probe_server("http://:5000")
    with pytest.raises(UserInputError, match="has an invalid port"):
        probe_server("http://127.0.0.1:99999")


@pytest.mark.skipif(sys.platform == "win32", reason="an OS file lock beside the SQLite file")
def test_store_lock_is_one_writer_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fcntl

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with store.store_lock(uri):
        assert (tmp_path / "mlflow.db.lock").is_file() and not (tmp_path / "mlflow.db").exists()
    monkeypatch.setattr(store, "STORE_LOCK_TIMEOUT_S", 0.2)
    with open(tmp_path / "mlflow.db.lock", "a") as other:  # another holder (its own open file: its own lock)
        fcntl.flock(other.fileno(), fcntl.LOCK_EX)
        held = r"another process has held .*mlflow\.db\.lock for over 0\.2 s"
        with pytest.raises(UserInputError, match=held), store.store_lock(uri):
            pass
        fcntl.flock(other.fileno(), fcntl.LOCK_UN)
    with store.store_lock(uri), store.store_lock("http://127.0.0.1:1"):
        pass  # free again; a server needs no lock
