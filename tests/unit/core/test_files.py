"""Safe file handling: output folders that appear whole or not at all, checks that create nothing, checksums,
arrays opened without unpickling."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from gssf_cli.core.errors import UserInputError
from gssf_cli.core.files import (
    MANIFEST,
    check_float_array,
    check_output_folder,
    check_writable,
    format_bytes,
    iter_rows,
    link_or_copy,
    manifest_digest,
    open_array,
    sha256_file,
    staged_folder,
)


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_staged_folder_appears_only_when_the_block_completes(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b" / "out"
    with staged_folder(out) as staging:
        (staging / "x.txt").write_text("x")
        assert not out.exists() and staging.parent == out.parent
    assert (out / "x.txt").read_text() == "x"
    assert _tree(tmp_path) == {"a", "a/b", "a/b/out", "a/b/out/x.txt"}


def test_staged_folder_leaves_nothing_behind_when_the_block_raises(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(RuntimeError, match="half-way"), staged_folder(out) as staging:
        (staging / "x.txt").write_text("x")
        raise RuntimeError("half-way")
    assert _tree(tmp_path) == set(), "neither the staging folder nor the folders made for it are left"


def test_staged_folder_replaces_only_with_force(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(UserInputError, match="already exists: pass --force"), staged_folder(out):
        pass
    with pytest.raises(KeyboardInterrupt), staged_folder(out, force=True) as staging:
        (staging / "new.txt").write_text("new")
        raise KeyboardInterrupt
    assert _tree(tmp_path) == {"out", "out/old.txt"}, "an interrupted replacement keeps the old folder"
    with staged_folder(out, force=True) as staging:
        (staging / "new.txt").write_text("new")
    assert _tree(tmp_path) == {"out", "out/new.txt"}


def test_staged_folder_removes_what_an_interrupted_write_left(tmp_path: Path) -> None:
    """Leftovers named by a process that no longer writes (here: this one, between two writes) are removed."""
    out = tmp_path / "out"
    leftover = tmp_path / f".out.partial-{os.getpid()}-0badcafe"
    leftover.mkdir()
    (leftover / "half.npy").write_bytes(b"\x93NUMPY")
    other = tmp_path / ".other.partial-1-0badcafe"
    other.mkdir()
    with staged_folder(out) as staging:
        (staging / "x").write_text("x")
    assert _tree(tmp_path) == {"out", "out/x", ".other.partial-1-0badcafe"}


def test_check_output_folder_refuses_and_creates_nothing(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserInputError, match="already exists: pass --force to replace it, or choose another --to"):
        check_output_folder(tmp_path / "taken", option="--to")
    check_output_folder(tmp_path / "taken", force=True)
    with pytest.raises(UserInputError, match="exists and is not a folder"):
        check_output_folder(tmp_path / "afile", force=True)
    with pytest.raises(UserInputError, match=r"afile is a file, not a folder; choose another --out"):
        check_output_folder(tmp_path / "afile" / "deeper" / "out")
    check_output_folder(tmp_path / "new" / "deeper" / "out")
    assert _tree(tmp_path) == {"taken", "afile"}


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes anywhere")
def test_check_writable_refuses_a_read_only_folder(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(
            UserInputError, match=r"cannot write to the runs: .*locked is not writable; choose another -r"
        ):
            check_writable(locked / "runs", "the runs", "-r")
    finally:
        locked.chmod(0o755)


def test_checksums(tmp_path: Path) -> None:
    data = os.urandom(3 * 2**20 + 17)
    (tmp_path / "blob").write_bytes(data)
    assert sha256_file(tmp_path / "blob") == hashlib.sha256(data).hexdigest()
    (tmp_path / MANIFEST).write_text('{"files": {}}\n')
    digest = manifest_digest(tmp_path)
    assert digest == hashlib.sha256(b'{"files": {}}\n').hexdigest()
    (tmp_path / MANIFEST).write_text('{"files": {} }\n')
    assert manifest_digest(tmp_path) != digest


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 bytes"), (1023, "1023 bytes"), (1536, "1.5 KiB"), (5 * 2**30, "5.0 GiB"), (3 * 2**50, "3.0 PiB")],
)
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text


def test_open_array_memory_maps_and_never_unpickles(tmp_path: Path) -> None:
    np.save(tmp_path / "ok.npy", np.arange(6, dtype=np.float32).reshape(3, 2))
    array = open_array(tmp_path / "ok.npy", "features")
    assert isinstance(array, np.memmap) and array.shape == (3, 2)
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UserInputError, match=r"objects\.npy: not a readable \.npy array \(.*Python objects"):
        open_array(tmp_path / "objects.npy", "features")
    (tmp_path / "text.npy").write_text("not an array")
    with pytest.raises(UserInputError, match=r"text\.npy: not a readable \.npy array \(.*gssf never unpickles\)"):
        open_array(tmp_path / "text.npy", "features")
    with pytest.raises(UserInputError, match=r"missing\.npy: file not found \(image features\)"):
        open_array(tmp_path / "missing.npy", "image features")


def test_float_arrays_are_checked_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    from gssf_cli.core import files

    monkeypatch.setattr(files, "CHUNK_BYTES", 16)  # 2 rows of 2 float32 per chunk
    array = np.zeros((7, 2), dtype=np.float32)
    check_float_array(array, "x", ndims=(2,))
    array[5, 1] = np.inf
    with pytest.raises(UserInputError, match=r"x: contains NaN or Inf \(first at row 5\)"):
        check_float_array(array, "x", ndims=(2,))
    with pytest.raises(UserInputError, match="expected floating-point values, got dtype int64"):
        check_float_array(np.zeros((2, 2), dtype=np.int64), "x", ndims=(2,))
    with pytest.raises(UserInputError, match=r"x: expected a 2-D or 3-D array, got shape \[4\]"):
        check_float_array(np.zeros(4, dtype=np.float32), "x", ndims=(2, 3))
    with pytest.raises(UserInputError, match="x: the array is empty"):
        check_float_array(np.zeros((0, 2), dtype=np.float32), "x", ndims=(2,))
    assert [len(c) for c in iter_rows(array)] == [2, 2, 2, 1]
    assert [len(c) for c in iter_rows(array, rows_per_chunk=3)] == [3, 3, 1]


def test_link_or_copy_links_on_one_file_system(tmp_path: Path) -> None:
    (tmp_path / "src").write_bytes(b"abc")
    assert link_or_copy(tmp_path / "src", tmp_path / "dst") == "link"
    assert (tmp_path / "dst").stat().st_ino == (tmp_path / "src").stat().st_ino
