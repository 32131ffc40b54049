"""The tracking store, before MLflow touches it: which store, whether it answers, and one writer at a time.

Store resolution: ``--tracking-uri`` > ``MLFLOW_TRACKING_URI`` > ``sqlite:///<cwd>/mlflow.db`` (artifacts then
go to ``<cwd>/mlruns``). Runs are addressed by id or by ``latest``.

First use of a store is checked (:func:`check_store`) and serialised (:func:`store_lock`): an http(s) server
is probed (TCP connect, then ``/health``: seconds, not minutes) before any work; a SQLite file's folder must
exist and be writable, and a file that a crashed schema migration left half-done (``_alembic_tmp_*`` tables)
is refused. Client creation (mlflow creates or migrates the schema there) and the get-or-create of the
experiment run under an OS file lock (``<db>.lock`` beside the file), so several commands started at once on
a fresh folder do not race to create the same tables. Logging is not serialised: mlflow sets
``PRAGMA busy_timeout = 20000`` on every SQLite session, so concurrent writers wait instead of failing.

Standard library only: the checks run before MLflow is imported.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import socket
import sqlite3
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from gssf_cli.core.errors import UserInputError, error_chain, first_line

PROBE_CONNECT_TIMEOUT_S = 5.0
PROBE_HTTP_TIMEOUT_S = 5.0
STORE_LOCK_TIMEOUT_S = 300.0
PROBE_API_PATH = "/api/2.0/mlflow/experiments/search?max_results=1"
"""What the probe asks of a server after ``/health``: one page of experiments, the cheapest call that goes
through MLflow's REST API and its backend store (a proxy or a broken store answers /health all the same)."""
MLFLOW_HTTP_SETTINGS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}
"""MLflow's HTTP client settings for gssf's commands, chosen, not inherited: MLflow's defaults (120 s per request,
7 retries with backoff factor 2) make one call against a server that stopped answering take over ten minutes,
and a server that fails its API 256 s. With these, a call gives up after at most 3 tries of 20 s plus 1 + 2 s of
backoff (≈ 63 s); a run then ends FAILED and its local checkpoint resumes it. A variable the user set wins."""


FIX_URI = "--tracking-uri / MLFLOW_TRACKING_URI"


def default_tracking_uri(cwd: Path | None = None) -> str:
    """The local SQLite store in the working directory."""
    return f"sqlite:///{(cwd or Path.cwd()).resolve() / 'mlflow.db'}"


def resolve_tracking_uri(flag: str | None = None) -> str:
    """``--tracking-uri`` wins over ``MLFLOW_TRACKING_URI``, which wins over the local SQLite default."""
    return flag or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


_GAVE_UP = re.compile(r"API request to (https?://[^/\s]+)\S* failed with exception (.*)", re.S)
_WHY = (
    ("timed out", "timed out"),
    ("refused", "refused the connection"),
    ("closed connection", "closed the connection"),
    ("reset by peer", "reset the connection"),
)


def lost_server(error: BaseException) -> tuple[str, str] | None:
    """``(server, why)`` when ``error``, or one it was raised from, is MLflow giving up on a request to a tracking
    server (timed out, refused, cut off) within its HTTP settings (:data:`MLFLOW_HTTP_SETTINGS`); else None."""
    for found in error_chain(error):
        if match := _GAVE_UP.search(str(found)):
            detail = match.group(2).lower()
            return match.group(1), next((said for words, said in _WHY if words in detail), "failed")
    return None


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative paths from the working directory), or None for
    another scheme or an in-memory database."""
    if not uri.startswith("sqlite:///"):
        return None
    raw = urllib.parse.unquote(uri[len("sqlite:///") :].split("?", 1)[0])
    if not raw or raw == ":memory:" or raw.startswith("file:"):
        return None
    return Path(raw).absolute()


def ui_command(uri: str, host: str, port: int) -> list[str]:
    """The ``mlflow ui`` command line that serves the local store ``uri`` with gssf's app (the UI opening in
    Model training; :mod:`gssf_cli.tracking.ui_app`) on ``host:port``. A server URI is refused: it has its UI."""
    if urllib.parse.urlsplit(uri).scheme.lower() in ("http", "https"):
        raise UserInputError(f"tracking store {uri} is a server, with its own UI: open {uri} in a browser")
    if not 0 < port < 65536:
        raise UserInputError(f"--port {port}: must be between 1 and 65535")
    return [sys.executable, "-m", "mlflow", "ui", "--app-name", "gssf", "--backend-store-uri", uri,
            "--host", host, "--port", str(port)]  # fmt: skip


def check_store(uri: str) -> None:
    """Fail in seconds, in one line, on a store that cannot work: an http(s) server that does not answer, or
    a SQLite file whose folder is missing or unwritable."""
    scheme = urllib.parse.urlsplit(uri).scheme.lower()
    if scheme in ("http", "https"):
        for name, value in MLFLOW_HTTP_SETTINGS.items():
            os.environ.setdefault(name, value)
        probe_server(uri)
        return
    path = sqlite_path(uri)
    if path is None:
        return
    where = f"tracking store {uri}"
    if not path.parent.is_dir():
        problem = "is not a folder" if path.parent.exists() else "does not exist"
        raise UserInputError(f"{where}: folder {path.parent} {problem}: create it or fix {FIX_URI}")
    if path.exists() and not path.is_file():
        raise UserInputError(f"{where}: {path} is not a file: fix {FIX_URI}")
    if not os.access(path.parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.R_OK | os.W_OK)):
        raise UserInputError(
            f"{where}: {path if path.exists() else path.parent} is not writable: "
            f"fix its permissions or point {FIX_URI} elsewhere"
        )


def probe_server(uri: str) -> None:
    """A tracking server must accept a TCP connection within ``PROBE_CONNECT_TIMEOUT_S`` and answer an HTTP
    request within ``PROBE_HTTP_TIMEOUT_S``; mlflow itself would retry for minutes before giving up."""
    parts = urllib.parse.urlsplit(uri)
    host = parts.hostname or ""
    try:
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError:
        raise UserInputError(f"tracking URI {uri} has an invalid port: fix {FIX_URI}") from None
    fix = f"start the tracking server, or fix {FIX_URI}"
    if not host:
        raise UserInputError(f"tracking URI {uri} names no host: fix {FIX_URI}")
    proxied = urllib.request.getproxies().get(parts.scheme.lower()) and not urllib.request.proxy_bypass(host)
    if not proxied:
        try:
            socket.create_connection((host, port), timeout=PROBE_CONNECT_TIMEOUT_S).close()
        except TimeoutError:
            raise UserInputError(
                f"tracking server {uri} is not reachable (no answer to a connection in "
                f"{PROBE_CONNECT_TIMEOUT_S:g} s): {fix}"
            ) from None
        except OSError as exc:
            raise UserInputError(f"tracking server {uri} is not reachable ({_os_reason(exc)}): {fix}") from None
    answer = _http_get(f"{uri.rstrip('/')}/health")
    if answer is None:
        return  # not a failure gssf can name (a TLS setting mlflow is configured for, a proxy quirk): mlflow judges
    if answer:
        raise UserInputError(f"tracking server {uri} {answer.replace('{where}', 'on /health')}: {fix}")
    answer = _http_get(f"{uri.rstrip('/')}{PROBE_API_PATH}")
    if answer:  # a server that answers /health but fails or hangs on its API is refused before any work
        raise UserInputError(
            f"tracking server {uri} {answer.replace('{where}', 'on its API')} (its /health answers): {fix}"
        )


def _http_get(url: str) -> str | None:
    """GET ``url`` within ``PROBE_HTTP_TIMEOUT_S``: "" when the server answered (any status below 500: a 401 or
    404 may be auth or a proxy, and mlflow will say), else what went wrong, as a phrase with ``{where}`` to fill
    in; None for a failure that is not the server's to judge here."""
    try:
        with urllib.request.urlopen(url, timeout=PROBE_HTTP_TIMEOUT_S):
            return ""
    except urllib.error.HTTPError as exc:
        return f"answers HTTP {exc.code} {{where}}" if exc.code >= 500 else ""
    except http.client.HTTPException as exc:
        return f"does not speak HTTP {{where}} ({first_line(exc)})"
    except OSError as exc:  # URLError, timeouts, resets, TLS errors
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        if isinstance(reason, (TimeoutError, ConnectionError)):
            return f"does not answer HTTP {{where}} within {PROBE_HTTP_TIMEOUT_S:g} s ({_os_reason(reason)})"
        return None


def _os_reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, socket.gaierror):
        return f"unknown host: {exc.strerror or exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return first_line(exc)


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive OS lock on ``<db>.lock`` beside a SQLite store (nothing for other stores), and refuse
    a store that a crashed schema migration left half-done.

    Why: mlflow creates and migrates the schema of a fresh SQLite file from every process that opens it, with
    no lock between processes; four commands started at once collide (duplicate tables or columns, and at
    worst a half-migrated file). The lock file stays; it is empty.
    """
    path = sqlite_path(uri)
    if path is None or sys.platform == "win32":
        yield
        return
    import fcntl

    lock_path = path.with_name(f"{path.name}.lock")
    try:
        handle = open(lock_path, "a")  # noqa: SIM115 - closed below, after the lock is released
    except OSError as exc:
        raise UserInputError(
            f"tracking store {uri}: cannot create lock file {lock_path} ({_os_reason(exc)}): "
            f"fix the folder's permissions or point {FIX_URI} elsewhere"
        ) from None
    with handle:
        deadline = time.monotonic() + STORE_LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise UserInputError(
                        f"tracking store {uri}: another process has held {lock_path} for over "
                        f"{STORE_LOCK_TIMEOUT_S:g} s (upgrading a large store's schema, or stuck): retry when it ends"
                    ) from None
                time.sleep(0.05)
        try:
            _refuse_half_migrated(path)
            _refuse_newer_schema(path)
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _refuse_half_migrated(path: Path) -> None:
    """A schema migration that died midway leaves ``_alembic_tmp_<table>`` behind; every later migration
    fails on it, and running one more could lose the table's rows. Say so instead of touching the file."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    try:
        # Read-write, not ``mode=ro``: a read-only connection cannot roll back a crashed writer's hot journal.
        with contextlib.closing(sqlite3.connect(path, timeout=20)) as db:
            tables = [str(row[0]) for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    except sqlite3.DatabaseError as exc:
        raise UserInputError(
            f"tracking store {path} cannot be read as a SQLite database ({exc}): restore a backup, or point "
            f"{FIX_URI} elsewhere"
        ) from None
    prefix = "_alembic_tmp_"
    leftovers = sorted(name for name in tables if name.startswith(prefix))
    if leftovers:
        # The copy is partial while the original still exists; once the original is dropped, it holds the rows.
        repairs = "; ".join(
            f"DROP TABLE {name}"
            if name[len(prefix) :] in tables
            else f"ALTER TABLE {name} RENAME TO {name[len(prefix) :]}"
            for name in leftovers
        )
        raise UserInputError(
            f"tracking store {path} was left half-migrated by an interrupted schema upgrade (leftover "
            f"table{'s' if len(leftovers) > 1 else ''} {', '.join(leftovers)}): copy the file aside, then restore "
            "a backup or repair it with "
            f"sqlite3 {path} '{repairs}' and `mlflow db upgrade sqlite:///{path}`"
        )


def known_schema_revisions() -> set[str] | None:
    """The store schema revisions the installed MLflow knows (its alembic migration files, read without importing
    MLflow), or None where they cannot be found."""
    import importlib.util

    spec = importlib.util.find_spec("mlflow")
    if spec is None or not spec.submodule_search_locations:
        return None
    versions = Path(next(iter(spec.submodule_search_locations))) / "store" / "db_migrations" / "versions"
    found = {file.name.split("_", 1)[0] for file in versions.glob("*.py") if not file.name.startswith("_")}
    return found or None


def _refuse_newer_schema(path: Path) -> None:
    """A store whose schema revision this MLflow does not know was written by a newer MLflow: MLflow itself calls it
    "out-of-date" and asks for ``mlflow db upgrade``, which cannot help. Say what happened before it is opened."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=20)) as db:
            rows = db.execute("SELECT version_num FROM alembic_version").fetchall()
    except sqlite3.DatabaseError:
        return  # no schema yet (a new store), or not one MLflow made: MLflow says which
    known = known_schema_revisions()
    found = [str(row[0]) for row in rows]
    if known is not None and found and not set(found) <= known:
        raise UserInputError(
            f"tracking store {path} has schema revision {found[0]}, which the installed MLflow does not know: a "
            "newer MLflow wrote it; upgrade MLflow (pip install -U mlflow), or point "
            f"{FIX_URI} elsewhere; the file is left as it is"
        )
