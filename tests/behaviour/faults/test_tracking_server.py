"""A tracking server that answers ``/health`` but fails or hangs on its API is refused in one line within seconds,
before any work (it used to cost 256 s of retries, or hang gssf for over 15 minutes); MLflow's HTTP settings are
gssf's own, so a server that stops answering mid-run costs a bounded time."""

from __future__ import annotations

import http.server
import os
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from typer.testing import Result

from gssf_cli.tracking.store import MLFLOW_HTTP_SETTINGS, PROBE_HTTP_TIMEOUT_S

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
