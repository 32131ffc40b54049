"""``manifest.json``: written with every file's checksum, and re-checked (once per unchanged file) on load."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from gssf_cli.core.errors import UserInputError
from gssf_cli.data import manifest as manifest_module
from gssf_cli.data.manifest import FORMAT_VERSION, load_manifest, split_classes, split_label, write_manifest
from tests.conftest import tiny_synthetic_args
from tests.unit.stages.test_prepare import Gssf, _prepare_json

FIELDS = {
    "name": "tiny",
    "kind": "features",
    "task": "labels",
    "modalities": {"features": {"type": "features", "shape": [3], "dtype": "float32"}},
    "splits": {"train": {"items": 4, "classes": 2}},
}


def _tiny_dataset(folder: Path) -> Path:
    folder.mkdir()
    np.save(folder / "train_feats.npy", np.arange(12, dtype=np.float32).reshape(4, 3))
    np.save(folder / "train_labels.npy", np.array([0, 0, 1, 1]))
    write_manifest(folder, FIELDS)
    return folder


def test_write_then_load_round_trips_and_a_changed_byte_is_caught(tmp_path: Path) -> None:
    folder = _tiny_dataset(tmp_path / "d")
    manifest = load_manifest(folder)
    assert manifest["format_version"] == FORMAT_VERSION and manifest["name"] == "tiny"
    assert set(manifest["files"]) == {"train_feats.npy", "train_labels.npy"}
    assert manifest["files"]["train_labels.npy"]["bytes"] == (folder / "train_labels.npy").stat().st_size
    target = folder / "train_feats.npy"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0x01  # same size, one bit different
    stat = target.stat()
    target.write_bytes(bytes(data))
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # a new mtime, however coarse the clock
    with pytest.raises(UserInputError, match=r"train_feats\.npy: checksum mismatch with manifest\.json"):
        load_manifest(folder)
    assert load_manifest(folder, verify=False)["name"] == "tiny", "verify=False reads the fields only"


def test_a_listed_file_that_is_gone_is_named(tmp_path: Path) -> None:
    folder = _tiny_dataset(tmp_path / "d")
    (folder / "train_labels.npy").unlink()
    with pytest.raises(UserInputError, match=r"train_labels\.npy: listed in the manifest but missing"):
        load_manifest(folder)


def test_a_folder_that_is_not_a_dataset_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="not found: run `gssf prepare` first"):
        load_manifest(tmp_path / "nowhere")
    with pytest.raises(UserInputError, match=r"has no manifest\.json: it is not a gssf dataset"):
        load_manifest(tmp_path)


def test_another_format_version_or_a_damaged_field_is_one_line(tmp_path: Path) -> None:
    folder = _tiny_dataset(tmp_path / "d")
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(UserInputError, match=f"dataset format version {FORMAT_VERSION + 1} is not supported"):
        load_manifest(folder)
    path.write_text(json.dumps({**manifest, "splits": {"train": {"items": -1}}}))
    with pytest.raises(UserInputError, match=r"splits\.train\.items: expected a count \(an integer >= 0\), got -1"):
        load_manifest(folder)


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


def test_load_manifest_catches_a_changed_file(gssf: Gssf, workdir: Path) -> None:
    _prepare_json(gssf, *tiny_synthetic_args())
    caps = workdir / "data/syn/dev_caps.txt"
    caps.write_text(caps.read_text().replace("w", "v", 1))
    with pytest.raises(UserInputError, match="checksum mismatch"):
        load_manifest(workdir / "data/syn")


def test_a_split_says_whether_its_classes_were_trained_on() -> None:
    manifest = {
        "splits": {
            "train": {"items": 6, "classes": [0, 1, 2]},
            "dev": {"items": 2, "classes": [0, 2]},
            "test": {"items": 4, "classes": [3, 4]},
            "mixed": {"items": 2, "classes": [2, 3]},
        }
    }
    labels = {split: split_label(manifest, split) for split in manifest["splits"]}
    assert labels == {
        "train": "train",
        "dev": "dev (seen classes)",
        "test": "test (unseen classes)",
        "mixed": "mixed (partly seen classes)",
    }
    assert split_classes({"splits": {"train": {"images": 9}, "test": {"images": 3}}}, "test") is None
    assert split_label({"splits": {}}, "test") == "test"
