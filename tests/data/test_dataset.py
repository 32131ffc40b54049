"""Dataset kinds and the manifest contract: one writer per kind, checksums verified once per process."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from gssf_cli import limits
from gssf_cli.data import WRITERS, writer
from gssf_cli.data import manifest as manifest_module
from gssf_cli.data.manifest import load_manifest
from gssf_cli.errors import UserInputError


def test_every_dataset_kind_has_a_writer() -> None:
    assert tuple(WRITERS) == limits.DATASET_KINDS
    assert all(callable(writer(kind)) for kind in WRITERS)


def test_checksums_are_verified_once_while_files_are_unchanged(
    tiny_syn: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "syn"
    shutil.copytree(tiny_syn, folder)
    hashed: list[str] = []
    real = manifest_module.sha256_file

    def counting(path: Path) -> str:
        hashed.append(path.name)
        return real(path)

    monkeypatch.setattr(manifest_module, "sha256_file", counting)
    files = len(load_manifest(folder)["files"])
    load_manifest(folder)
    assert len(hashed) == files
    target = folder / "train_ims.npy"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    with pytest.raises(UserInputError, match=r"train_ims\.npy: checksum mismatch"):
        load_manifest(folder)
