"""A tracking server that answers ``/health`` but fails or hangs on its API is refused in one line within seconds,
before any work (it used to cost 256 s of retries, or hang gssf for over 15 minutes); MLflow's HTTP settings are
gssf's own, so a server that stops answering mid-run costs a bounded time."""

from __future__ import annotations

import contextlib
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import Result

from gssf_cli.tracking.store import MLFLOW_HTTP_SETTINGS, PROBE_HTTP_TIMEOUT_S
from tests.conftest import tiny_synthetic_args
from tests.mlflow_ui import mlflow_ui, rest

Gssf = Callable[..., Result]


def _server(api: Callable[[http.server.BaseHTTPRequestHandler], None]) -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/health":
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"OK")
            else:
                api(self)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _fails(handler: http.server.BaseHTTPRequestHandler) -> None:
    handler.send_response(500)
    handler.end_headers()


def _answers(handler: http.server.BaseHTTPRequestHandler) -> None:
    handler.send_response(200)
    handler.end_headers()


def _hangs(handler: http.server.BaseHTTPRequestHandler) -> None:
    time.sleep(3 * PROBE_HTTP_TIMEOUT_S)


@pytest.mark.parametrize(
    ("api", "said"),
    [
        (_fails, "answers HTTP 500 on its API (its /health answers)"),
        (_hangs, f"does not answer HTTP on its API within {PROBE_HTTP_TIMEOUT_S:g} s (timed out) (its /health"),
    ],
    ids=["fails", "hangs"],
)
def test_a_server_healthy_in_name_only_is_refused_before_any_work(
    gssf: Gssf, workdir: object, monkeypatch: pytest.MonkeyPatch, api: Callable[..., None], said: str
) -> None:
    for uri in _server(api):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        started = time.monotonic()
        result = gssf("prepare", "--dataset", "synthetic", "--out", "data/syn")
        elapsed = time.monotonic() - started
        assert result.exit_code == 2
        [line] = result.stderr.strip().splitlines()
        assert line.startswith(f"gssf: error: tracking server {uri} {said}") and "start the tracking server" in line
        assert elapsed < 15, f"refused after {elapsed:.0f} s"
        assert not (workdir / "data").exists()  # type: ignore[operator]


def test_mlflow_http_settings_are_chosen_and_a_users_win(gssf: Gssf, monkeypatch: pytest.MonkeyPatch) -> None:
    from gssf_cli.tracking.store import check_store

    for name in MLFLOW_HTTP_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")
    for uri in _server(_answers):
        check_store(uri)
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == MLFLOW_HTTP_SETTINGS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]


class _Valve:
    """A TCP relay to ``target`` on 127.0.0.1 that can stop answering: once :meth:`close` is called, new
    connections are accepted and never answered (as a server that hangs), open ones get nothing more."""

    def __init__(self, target: int) -> None:
        self.target, self.open = target, True
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.open = False

    def reopen(self) -> None:
        self.open = True

    def _accept(self) -> None:
        while True:
            client, _ = self.listener.accept()
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        while not self.open:
            time.sleep(0.05)  # hold the connection: the request is never answered
        upstream = socket.create_connection(("127.0.0.1", self.target))
        for source, sink in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := source.recv(65536):
                while not self.open:
                    time.sleep(0.05)  # silent, the connection held open
                sink.sendall(chunk)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


@pytest.mark.server
def test_a_server_that_stops_answering_mid_run_ends_it_in_bounded_time_and_resume_finishes_it(
    tmp_path: Path,
) -> None:
    """A real ``mlflow server`` behind a relay that stops answering once the first epoch is logged: the training
    ends in one line within the HTTP settings' bound (here the user's own, 2 s and no retry), its checkpoint on
    disk; once the server answers again, ``--resume`` finishes the same run."""
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    with mlflow_ui(server_dir, 90.0, "server", "server.db", "--workers", "1") as url:
        valve = _Valve(int(url.rsplit(":", 1)[1]))
        uri = f"http://127.0.0.1:{valve.port}"
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_HTTP_REQUEST_TIMEOUT": "2",
               "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "COLUMNS": "120", "NO_COLOR": "1"}  # fmt: skip
        gssf = [sys.executable, "-m", "gssf_cli"]
        done = subprocess.run([*gssf, *tiny_synthetic_args()], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        train = [*gssf, "train", "--data", "data/syn", "--epochs", "40", "--embed-dim", "16", "--block-size", "4",
                 "--word-dim", "8", "--batch-size", "16", "--device", "cpu", "--threads", "1"]  # fmt: skip
        proc = subprocess.Popen(train, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 120
            while not list((tmp_path / "runs").glob("*/checkpoint/state.json")) and time.monotonic() < deadline:
                time.sleep(0.05)
            valve.close()
            stopped = time.monotonic()
            _, err = proc.communicate(timeout=120)
            seconds = time.monotonic() - stopped
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 1, err
        (run_dir,) = (tmp_path / "runs").iterdir()
        line = err.strip().splitlines()[-1]
        assert line.startswith(f"gssf: tracking server: {uri} stopped answering"), line
        assert line.endswith(f"continue it with: gssf train --resume {run_dir.name}"), line
        assert seconds < 30, f"ended {seconds:.1f} s after the server stopped answering"
        assert (run_dir / "checkpoint" / "state.json").is_file()

        valve.reopen()
        resumed = subprocess.run([*gssf, "train", "--resume", run_dir.name, "--json"], cwd=tmp_path, env=env,
                                 capture_output=True, text=True, timeout=300)  # fmt: skip
        assert resumed.returncode == 0, resumed.stderr
        assert rest(url, "runs/get", run_id=run_dir.name)["run"]["info"]["status"] == "FINISHED"
