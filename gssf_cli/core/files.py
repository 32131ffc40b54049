"""Safe file handling: atomic folder writes, streamed checksums, chunked array checks, links without loads.

Why: user data can be many GB (Flickr30K regions ~8.5 GB), so arrays are memory-mapped and scanned in
chunks, never read whole; and a failed or interrupted prepare must leave nothing behind, so output is built
in a hidden staging folder next to the target and renamed into place only when complete. A process killed
meanwhile leaves its staging folder behind: the next one writing the same output removes the staging folders of
dead processes (their names carry the process id) before it starts.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from gssf_cli.core.errors import DiskFullError, UserInputError, error_chain, first_line

CHUNK_BYTES = 64 * 2**20
STALE_AFTER_S = 3600.0
"""A leftover (staging folder, checkpoint being written) named without a process id, as older versions named
them, is removed only once it is this old: its writer cannot be asked whether it still runs."""

MANIFEST = "manifest.json"
"""The file that describes a folder gssf wrote (a dataset, a bundle, an index): what it is, and every other
file's sha256."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(8 * 2**20):
            digest.update(block)
    return digest.hexdigest()


STAMP_FIELDS = ("bytes", "mtime_ns", "ctime_ns", "inode")
"""What a manifest records of a file beside its sha256 (:func:`file_entry`): while all of it is unchanged, the file
is the one that was hashed. A write changes ``ctime_ns``, which no tool can set back, so a file changed in place is
re-hashed (and caught) even if its size and mtime were kept; a copy or a move to another filesystem changes the
inode, and is re-hashed once per process."""

_VERIFIED: dict[tuple[int, int, int, int, int], str] = {}
"""The files this process has hashed, by (device, inode, size, mtime, ctime): a long-lived process (a served model,
a benchmark) checks each file once, not on every open."""


def file_entry(path: Path) -> dict[str, Any]:
    """A manifest's record of ``path``: its sha256 and its stamp (:data:`STAMP_FIELDS`)."""
    return {"sha256": sha256_file(path), **_stamp(path.stat())}


def matches_entry(path: Path, entry: Mapping[str, Any]) -> bool:
    """Whether ``path`` holds what a manifest's ``entry`` recorded, hashing it only when needed: not when its stamp
    is the one recorded (an entry without one, from an older gssf, is always hashed), nor twice in one process."""
    found = path.stat()
    if found.st_size != entry.get("bytes"):
        return False
    stamp = _stamp(found)
    if all(entry.get(name) == stamp[name] for name in STAMP_FIELDS):
        return True
    key = (found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns, found.st_ctime_ns)
    if _VERIFIED.get(key) == entry.get("sha256"):
        return True
    digest = sha256_file(path)
    if digest != entry.get("sha256"):
        return False
    _VERIFIED[key] = digest
    return True


def _stamp(found: os.stat_result) -> dict[str, int]:
    return {"bytes": found.st_size, "mtime_ns": found.st_mtime_ns, "ctime_ns": found.st_ctime_ns, "inode": found.st_ino}


@contextlib.contextmanager
def staged_folder(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder that becomes ``out`` only if the block completes.

    The staging folder sits beside ``out`` (same filesystem, so the final rename is atomic). An existing
    ``out`` is an error unless ``force``; then it is replaced only after the new folder is complete.
    """
    out = out.expanduser()
    _clean_dead_staging(out)
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
    tag = f"{writer_id()}-{uuid.uuid4().hex[:8]}"
    staging = parent / f".{out.name}.partial-{tag}"
    try:
        with writing(out, "nothing of it was written"):
            staging.mkdir()
    except OSError as exc:
        _remove_empty(created)
        raise UserInputError(f"cannot write to {parent}: {exc.strerror}; choose another --out") from None
    try:
        with writing(out, "nothing of it is left"):
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


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
DISK_FULL_WORDS = ("no space left on device", "disk quota exceeded", "database or disk is full", "os error 28")
"""How a full filesystem shows in errors that are not an ``OSError`` of their own: safetensors' (``os error 28``),
SQLite's through SQLAlchemy and MLflow (``database or disk is full``)."""


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error``, or an error it was raised from or during, is a full filesystem (or quota)."""
    return any(
        (isinstance(found, OSError) and found.errno in DISK_FULL_ERRNOS)
        or any(words in str(found).lower() for words in DISK_FULL_WORDS)
        for found in error_chain(error)
    )


def mount_point(path: Path) -> Path:
    """The mount point of the filesystem ``path`` (or its nearest existing ancestor) is on."""
    found = _nearest_existing(path.expanduser().absolute()) or Path("/")
    while not os.path.ismount(found) and found != found.parent:
        found = found.parent
    return found


def disk_full_line(path: Path, what: str) -> str:
    """One line for a write to ``path`` that found its filesystem full: which filesystem, how much is free now."""
    free = free_disk(path)
    left = f" ({format_bytes(free)} free)" if free is not None else ""
    return f"no space left on {mount_point(path)}{left} writing {path}: {what}"


@contextlib.contextmanager
def writing(path: Path, what: str) -> Iterator[None]:
    """Turn a full filesystem met inside the block, however the writing library words it, into a
    :class:`DiskFullError` naming the filesystem of ``path``; ``what``: what was (not) written."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        raise DiskFullError(disk_full_line(path, what)) from exc


def _clean_dead_staging(out: Path) -> None:
    """Remove what killed writers of ``out`` left beside it: staging (``.NAME.partial-PID-TAG``) and retired
    (``.NAME.replaced-PID-TAG``) folders of processes that no longer run.

    A kill between the two renames that publish a staging folder leaves no ``out`` at all: the staging folder
    whose retired twin (same tag) exists was complete, so it goes into place; a retired folder without one goes
    back. Folders of live processes are left alone.
    """
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return
    dead: dict[str, dict[str, Path]] = {"partial": {}, "replaced": {}}
    for entry in entries:
        for kind, found in dead.items():
            prefix = f".{out.name}.{kind}-"
            if entry.name.startswith(prefix) and _abandoned(entry, entry.name[len(prefix) :]):
                found[entry.name[len(prefix) :]] = entry
    if not out.exists() and dead["replaced"]:
        complete = [dead["partial"][tag] for tag in dead["replaced"] if tag in dead["partial"]]
        candidates = complete or list(dead["replaced"].values())
        with contextlib.suppress(OSError):
            max(candidates, key=_mtime).rename(out)
    for found in dead.values():
        for path in found.values():
            if path.exists():
                shutil.rmtree(path, ignore_errors=True)


def _abandoned(path: Path, tag: str) -> bool:
    """Left by a writer that no longer runs (:func:`writer_alive`; named without one, older than STALE_AFTER_S)."""
    writer, _, rest = tag.partition("-")
    alive = writer_alive(writer)
    if alive is not None and rest:
        return not alive
    if tag and "-" not in tag:
        return time.time() - _mtime(path) > STALE_AFTER_S
    return False


@functools.lru_cache(maxsize=1)
def machine_id() -> str:
    """16 hex digits naming this machine's current boot: a hash of the host name, then of the kernel's boot id.
    A writer's files carry it beside its process id (:func:`writer_id`), because a process id alone means
    nothing on a folder that several hosts share, nor across a reboot."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    host = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
    return host + hashlib.sha256(boot.encode()).hexdigest()[:8]


def writer_id(pid: int | None = None) -> str:
    """``PID.MACHINE``: who writes a leftover-prone file, as its name records it (:func:`writer_alive` reads it)."""
    return f"{os.getpid() if pid is None else pid}.{machine_id()}"


def writer_alive(writer: str) -> bool | None:
    """Whether the writer a name records (:func:`writer_id`, or a bare process id from older versions) may
    still run: on another host, always (its processes cannot be seen from here, so they are never judged dead);
    on this host before its last reboot, never; else while its process runs (:func:`held_by_another_process`).
    None when ``writer`` names no writer."""
    pid_text, _, machine = writer.partition(".")
    if not pid_text.isdigit() or (machine and len(machine) != 16):
        return None
    if machine and machine[:8] != machine_id()[:8]:
        return True
    if machine and machine[8:] != machine_id()[8:]:
        return False
    return held_by_another_process(int(pid_text))


def held_by_another_process(pid: int) -> bool:
    """True while another process with this id runs: the leftovers a process id names are its own while it
    runs. This process's own count as abandoned: it writes one output (or checkpoint) at a time, so they come
    from a write that an exception or Ctrl-C interrupted."""
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # e.g. another user's process
    return True


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return time.time()


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
        reason = "Python objects or not a .npy file; gssf never unpickles" if "pickle" in str(exc) else first_line(exc)
        raise UserInputError(f"{path}: not a readable .npy array ({reason})") from None
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


def check_output_folder(out: Path, force: bool = False, option: str = "--out") -> None:
    """Refuse, before anything is written, an output folder that :func:`staged_folder` could not create: one
    that exists (unless ``force``), is a file, or lies below a file or an unwritable folder. Creates nothing."""
    out = out.expanduser()
    if out.exists() and not force:
        raise UserInputError(f"output {out} already exists: pass --force to replace it, or choose another {option}")
    if out.exists() and not out.is_dir():
        raise UserInputError(f"output {out} exists and is not a folder: remove it or choose another {option}")
    check_writable(out.parent, f"output folder {out.parent}", option)


def check_writable(folder: Path, what: str, option: str) -> None:
    """Refuse a ``folder`` that cannot be created or written to, without creating anything: its nearest
    existing ancestor must be a folder this process may write into (``os.access`` also sees a read-only file
    system). ``what`` names the folder in the message, ``option`` the setting that fixes it."""
    folder = folder.expanduser()
    existing = _nearest_existing(folder)
    if existing is None:
        return
    if not existing.is_dir():
        raise UserInputError(f"cannot create {what}: {existing} is a file, not a folder; choose another {option}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserInputError(f"cannot write to {what}: {existing} is not writable; choose another {option}")


def available_memory() -> int | None:
    """Bytes of memory a new allocation can get (Linux ``MemAvailable``), or None where that cannot be read."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    with contextlib.suppress(AttributeError, ValueError, OSError):
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    return None


def free_disk(folder: Path) -> int | None:
    """Bytes free on the file system of ``folder`` (or of its nearest existing ancestor), or None."""
    existing = _nearest_existing(folder.expanduser())
    if existing is None:
        return None
    try:
        return shutil.disk_usage(existing).free
    except OSError:
        return None


def format_bytes(n: float) -> str:
    """A size as a person reads it: ``1536`` -> ``1.5 KiB``."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} PiB"


def _nearest_existing(path: Path) -> Path | None:
    return next((p for p in (path, *path.parents) if p.exists()), None)


def manifest_digest(folder: Path) -> str:
    """A folder's identity: the sha256 of its manifest, which lists every other file's hash, so one hash names the
    whole dataset or bundle."""
    return hashlib.sha256((folder / MANIFEST).read_bytes()).hexdigest()
