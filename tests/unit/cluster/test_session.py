"""What the Ray module checks before Ray starts: addresses and storage (real trials: tests/unit/stages/test_tune.py)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from gssf_cli.cluster.session import check_reachable, storage_path
from gssf_cli.core.errors import UserInputError


def test_an_address_where_nothing_listens_fails_in_seconds() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(UserInputError, match="no Ray cluster answers there"):
        check_reachable(f"127.0.0.1:{port}", timeout=2)
    with pytest.raises(UserInputError, match="expected HOST:PORT"):
        check_reachable("nowhere")
    check_reachable("auto")


def test_storage_is_absolute_or_a_uri(workdir: Path) -> None:
    assert storage_path("s3://bucket/gssf") == "s3://bucket/gssf"
    folder = Path(storage_path(".gssf/ray"))
    assert folder.is_absolute() and folder.is_dir() and folder == workdir.resolve() / ".gssf" / "ray"
