"""Safe file handling: atomic folder writes, streamed checksums, chunked array checks, links without loads.

Why: user data can be many GB (Flickr30K regions ~8.5 GB), so arrays are memory-mapped and scanned in
chunks, never read whole; and a failed or interrupted prepare must leave nothing behind, so output is built
in a hidden staging folder next to the target and renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from gssf_cli.errors import UserInputError

CHUNK_BYTES = 64 * 2**20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(8 * 2**20):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def staged_folder(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder that becomes ``out`` only if the block completes.

    The staging folder sits beside ``out`` (same filesystem, so the final rename is atomic). An existing
    ``out`` is an error unless ``force``; then it is replaced only after the new folder is complete.
    """
    out = out.expanduser()
    if out.exists() and not force:
        raise UserInputError(f"output {out} already exists: pass --force to replace it, or choose another --out")
    if out.exists() and not out.is_dir():
        raise UserInputError(f"output {out} exists and is not a folder: remove it or choose another --out")
    parent = out.parent
    created = [p for p in (parent, *parent.parents) if not p.exists()]
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserInputError(f"cannot create output folder {parent}: {exc.strerror}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        _remove_empty(created)
        raise UserInputError(f"cannot write to {parent}: permission denied; choose another --out")
    tag = uuid.uuid4().hex[:8]
    staging = parent / f".{out.name}.partial-{tag}"
    try:
        staging.mkdir()
    except OSError as exc:
        _remove_empty(created)
        raise UserInputError(f"cannot write to {parent}: {exc.strerror}; choose another --out") from None
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_empty(created)
        raise
    retired = parent / f".{out.name}.replaced-{tag}"
    if out.exists():
        out.rename(retired)
    staging.rename(out)
    shutil.rmtree(retired, ignore_errors=True)


def _remove_empty(folders: list[Path]) -> None:
    """Remove folders this run created (innermost first), so a failure leaves the tree as it was."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def link_or_copy(src: Path, dst: Path) -> str:
    """Hard-link ``src`` to ``dst`` (no bytes copied); copy in a stream when linking is impossible.

    Returns ``"link"`` or ``"copy"``. A hard link, unlike a symlink, keeps the dataset valid if the user
    later moves or deletes the source folder.
    """
    try:
        os.link(src, dst)
        return "link"
    except OSError:
        shutil.copyfile(src, dst)
        return "copy"


def open_array(path: Path, what: str) -> np.ndarray:
    """Memory-map a ``.npy`` file, turning every failure into a readable line."""
    if not path.is_file():
        raise UserInputError(f"{path}: file not found ({what})")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise UserInputError(f"{path}: not a readable .npy array ({_first_line(exc)})") from None
    if not isinstance(array, np.ndarray):
        raise UserInputError(f"{path}: expected one .npy array, found {type(array).__name__}")
    return array


def check_float_array(array: np.ndarray, name: str, ndims: tuple[int, ...]) -> None:
    """Floating dtype, expected rank, non-empty, and finite — scanned in chunks."""
    if array.ndim not in ndims:
        expected = " or ".join(f"{n}-D" for n in ndims)
        raise UserInputError(f"{name}: expected a {expected} array, got shape {list(array.shape)}")
    if not np.issubdtype(array.dtype, np.floating):
        raise UserInputError(f"{name}: expected floating-point values, got dtype {array.dtype}")
    if array.shape[0] == 0 or array.size == 0:
        raise UserInputError(f"{name}: the array is empty")
    check_finite(array, name)


def check_finite(array: np.ndarray, name: str) -> None:
    row_bytes = max(1, array.itemsize * int(np.prod(array.shape[1:], dtype=np.int64)))
    rows = max(1, CHUNK_BYTES // row_bytes)
    for start in range(0, array.shape[0], rows):
        block = np.asarray(array[start : start + rows])
        if not np.isfinite(block).all():
            bad = start + int(np.argwhere(~np.isfinite(block))[0][0])
            raise UserInputError(f"{name}: contains NaN or Inf (first at row {bad}); clean the features first")


def iter_rows(array: np.ndarray, rows_per_chunk: int | None = None) -> Iterator[np.ndarray]:
    if rows_per_chunk is None:
        row_bytes = max(1, array.itemsize * int(np.prod(array.shape[1:], dtype=np.int64)))
        rows_per_chunk = max(1, CHUNK_BYTES // row_bytes)
    for start in range(0, array.shape[0], rows_per_chunk):
        yield np.asarray(array[start : start + rows_per_chunk])


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
