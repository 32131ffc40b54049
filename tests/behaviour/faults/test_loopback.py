"""A local tune lets nobody in: every socket Ray opens listens on loopback, whatever TMPDIR is.

The tune runs as a user runs it (a subprocess of the CLI) with a long TMPDIR; while it runs, the test reads
the listening TCP sockets of the tune's whole process tree (driver, GCS, raylet, workers) from /proc.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gssf_cli.core.stage_configs import PrepareConfig
from gssf_cli.stages import prepare

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads sockets from /proc")


def _descendants(root: int) -> set[int]:
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        children = [child for child, parent in parents.items() if parent == pid and child not in found]
        found.update(children)
        frontier += children
    return found


def _socket_inodes(pids: set[int]) -> set[str]:
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    return inodes


def _address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_address)
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw[::-1])
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    address = ipaddress.IPv6Address(words)
    return address.ipv4_mapped or address


def _listening(inodes: set[str]) -> list[str]:
    """``address:port`` of every listening TCP socket among ``inodes``."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:
                host, port = fields[1].split(":")
                out.append(f"{_address(host)}:{int(port, 16)}")
    return out


def test_a_local_tune_listens_on_loopback_only(tmp_path: Path) -> None:
    prepare.run(
        PrepareConfig(
            dataset="synthetic", out=tmp_path / "data" / "syn", train_images=120, dev_images=20, test_images=20,
            regions=4, region_dim=8, concepts=6, vocab_size=30,
        )
    )  # fmt: skip
    long_tmp = tmp_path / ("t" * 60)
    long_tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env |= {"TMPDIR": str(long_tmp), "COLUMNS": "120", "NO_COLOR": "1"}
    command = [
        sys.executable, "-m", "gssf_cli", "tune", "--data", "data/syn", "--param", "block_size=4,8",
        "--base", "metric=bdiag", "--base", "embed_dim=16", "--base", "word_dim=8", "--base", "batch_size=32",
        "--epochs", "2", "--scheduler", "fifo", "--json",
    ]  # fmt: skip
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: set[str] = set()
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        seen.update(_listening(_socket_inodes(_descendants(proc.pid))))
        time.sleep(0.3)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert len(seen) >= 3, f"saw too few of Ray's sockets to judge: {seen}"
    outside = sorted(s for s in seen if not ipaddress.ip_address(s.rsplit(":", 1)[0]).is_loopback)
    assert not outside, f"listening beyond loopback: {outside}"
    assert not list(long_tmp.glob("gssf-ray-*")), "Ray's session folder must not go under a long TMPDIR"
