"""A writer is judged by host, boot and process id together: on a runs folder that several hosts share, another
host's live writer is never judged dead (its leftovers stay), and a writer from before this host's last reboot
is dead whatever its process id now names."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import torch

from gssf_cli.core.files import machine_id, writer_alive, writer_id
from gssf_cli.modeling import checkpoint as ckpt


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def _other(part: str) -> str:
    return "".join("0" if c != "0" else "1" for c in part)


def test_a_writer_is_host_boot_and_process() -> None:
    here, dead, live = machine_id(), _dead_pid(), os.getppid()
    host, boot = here[:8], here[8:]
    assert writer_id(live) == f"{live}.{here}"
    assert writer_alive(f"{live}.{here}") is True and writer_alive(f"{dead}.{here}") is False
    assert writer_alive(f"{dead}.{_other(host)}{boot}") is True, "another host's writer is never judged dead"
    assert writer_alive(f"{live}.{host}{_other(boot)}") is False, "a writer from before the reboot is gone"
    assert writer_alive(str(dead)) is False and writer_alive(str(live)) is True, "older names: the pid alone"
    assert writer_alive("nope") is None and writer_alive(f"{live}.abc") is None


def test_another_hosts_checkpoint_leftovers_stay_where_this_hosts_dead_ones_go(tmp_path: Path) -> None:
    """Two leftovers of an interrupted save beside a checkpoint: the one a dead process of this host wrote is
    removed; the one of a process of another host (its id dead here) is left for its writer."""
    model = torch.nn.Linear(2, 2)
    ckpt.save(tmp_path / ckpt.LAST, model, {"epoch": 2}, torch.optim.AdamW(model.parameters()))
    dead = _dead_pid()
    mine = tmp_path / f".{ckpt.LAST}.tmp-{dead}.{machine_id()}-0badc0de"
    theirs = tmp_path / f".{ckpt.LAST}.tmp-{dead}.{_other(machine_id()[:8])}{machine_id()[8:]}-1234abcd"
    for leftover in (mine, theirs):
        leftover.mkdir()
        (leftover / "model.safetensors").write_bytes(b"half")
    assert ckpt.recover(tmp_path / ckpt.LAST)
    assert not mine.exists() and theirs.exists()
