"""``gssf ui`` serves the store's MLflow UI after creating it under gssf's lock, so commands started beside it on a
fresh folder never race MLflow's own schema creation; bad input is one line and creates nothing."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import Result

from gssf_cli.tracking.ui_app import DEFAULT_VIEW_SCRIPT

Gssf = Callable[..., Result]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.server
def test_gssf_ui_creates_the_store_under_the_lock_and_serves_gssfs_ui(workdir: Path) -> None:
    port = _free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    server = subprocess.Popen([sys.executable, "-m", "gssf_cli", "ui", "--port", str(port)], cwd=workdir, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline, page = time.monotonic() + 90, None
        while page is None and time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as answer:
                    page = answer.read().decode()
            except OSError:
                time.sleep(0.3)
        assert page is not None, server.stderr.read() if server.poll() is not None else "no answer in 90 s"
        assert DEFAULT_VIEW_SCRIPT in page, "gssf's app: the UI opens in Model training"
        assert (workdir / "mlflow.db").is_file() and (workdir / "mlflow.db.lock").is_file()
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--port", "0"], "--port 0: must be between 1 and 65535"),
        (["--tracking-uri", "http://127.0.0.1:9/"], "tracking server http://127.0.0.1:9/ is not reachable"),
    ],
)
def test_bad_input_is_one_line_and_creates_nothing(gssf: Gssf, workdir: Path, args: list[str], said: str) -> None:
    options, command = (args, []) if args[0] == "--tracking-uri" else ([], args)
    result = gssf(*options, "ui", *command)
    assert result.exit_code == 2 and said in result.stderr
    assert list(workdir.iterdir()) == []
