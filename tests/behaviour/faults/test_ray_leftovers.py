"""What a SIGKILLed driver leaves for Ray — its ``gssf-ray-*`` / ``gssf-train-*`` temporary folders and the Ray
agents still running from them — is removed by the next gssf that starts Ray; a live driver's are left alone."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from gssf_cli.cluster.session import WRITER_FILE, sweep_dead_temp_folders
from gssf_cli.core.files import writer_id


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def _folder(root: Path, name: str, writer: str) -> Path:
    folder = root / name
    (folder / "session_latest" / "sockets").mkdir(parents=True)
    (folder / WRITER_FILE).write_text(writer)
    return folder


def test_a_killed_drivers_folders_and_agents_go_a_live_ones_stay(tmp_path: Path) -> None:
    dead = _folder(tmp_path, "gssf-ray-dead0001", writer_id(_dead_pid()))
    train = _folder(tmp_path, "gssf-train-dead0002", writer_id(_dead_pid()))
    live = _folder(tmp_path, "gssf-ray-live0003", writer_id(os.getppid()))
    mine = _folder(tmp_path, "gssf-ray-mine0004", writer_id())
    agent = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", f"--session-dir={dead}/session_latest"]
    )
    try:
        while str(dead).encode() not in Path(f"/proc/{agent.pid}/cmdline").read_bytes():
            time.sleep(0.01)  # until the agent's exec has replaced the forked command line
        removed = sweep_dead_temp_folders(str(tmp_path))
        assert sorted(removed) == sorted([str(dead), str(train)])
        assert agent.wait(timeout=30) == -9, "the agent running from the dead session folder is stopped"
    finally:
        if agent.poll() is None:
            agent.kill()
    assert not dead.exists() and not train.exists() and live.exists() and mine.exists()
