"""The pipeline cache: a stage is skipped only when its key and the files it wrote are both unchanged.

A key is the sha256 of what determines a stage's result: its resolved config, the *content* of its inputs (a
source folder's file hashes, a dataset's manifest digest, a checkpoint's hashes) and the runs it builds on.
An entry also records the sha256 of every file the stage wrote (the dataset folder, the best checkpoint, the
best config, the bundle). Before a stage is skipped its files are hashed again: a missing, truncated or
edited output makes the stage run again, and :func:`damage` says why in one line. Hashes are computed once
per process per (path, size, mtime) (:func:`gssf_cli.data.manifest.file_sha256`), so a stage that opens the
same dataset right after the check pays nothing more.

The cache is one JSON file per pipeline, replaced atomically (temporary name, then rename), so an
interrupted write leaves the previous cache. It is a file a person can edit, so it is read as untrusted input:
an entry of the wrong shape, or one naming a file outside the places the pipeline writes to, is dropped with its
reason (:attr:`Cache.dropped`), and an unreadable file counts as absent with its reason; the step then runs and
says why. Nothing it names is ever followed outside those places.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from gssf_cli import __version__
from gssf_cli.core.errors import UserInputError, first_line
from gssf_cli.data.manifest import file_sha256

CACHE_DIR = Path(".gssf") / "pipelines"


def key(step: str, config: Mapping[str, Any], inputs: Mapping[str, Any]) -> str:
    """sha256 of a step's config and the identities (content hashes, run ids) of its inputs."""
    text = json.dumps(
        {"step": step, "config": config, "inputs": inputs, "gssf": __version__}, sort_keys=True, default=str
    )
    return hashlib.sha256(text.encode()).hexdigest()


def basis(config: Mapping[str, Any], inputs: Mapping[str, Any]) -> dict[str, str]:
    """What :func:`key` hashes, one entry per setting (``name``) and per input (``input name``), each as JSON:
    kept with the entry, so that a changed key can be explained (:func:`changes`)."""
    out = {str(name): json.dumps(value, sort_keys=True, default=str) for name, value in config.items()}
    out |= {f"input {name}": json.dumps(value, sort_keys=True, default=str) for name, value in inputs.items()}
    return out


def changes(before: Mapping[str, str] | None, now: Mapping[str, str]) -> str:
    """Why a step's key changed, in a few words: the settings with their old and new values, the inputs whose
    content changed (``block_size 8 → 16; input dataset changed``); a generic reason for an entry written
    before the basis was kept."""
    if not before:
        return "its settings or inputs changed"
    said = []
    for name in sorted(set(before) | set(now)):
        old, new = before.get(name), now.get(name)
        if old == new:
            continue
        if name.startswith("input "):
            said.append(f"{name} changed")
        else:
            said.append(f"{name} {old if old is not None else 'unset'} → {new if new is not None else 'unset'}")
    return "; ".join(said[:4]) + (f"; and {len(said) - 4} more" if len(said) > 4 else "") or "gssf's version changed"


def files_of(paths: Iterable[Path]) -> list[Path]:
    """Every regular file under ``paths`` (files themselves, or the files inside folders), sorted."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        elif path.is_file():
            found.append(path)
    return found


def fingerprint(paths: Iterable[Path]) -> dict[str, str]:
    """``{path: sha256}`` of every file under ``paths``: what a stage wrote, to check before it is skipped."""
    return {str(file): file_sha256(file) for file in files_of(paths)}


def digest(paths: Iterable[Path]) -> str:
    """One sha256 naming the content of ``paths`` (file names relative to each root, and their hashes)."""
    entries = []
    for root in paths:
        for file in files_of([root]):
            name = file.name if file == root else str(file.relative_to(root))
            entries.append((str(root.name), name, file_sha256(file)))
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def damage(recorded: Mapping[str, str], roots: Iterable[Path] = ()) -> str | None:
    """Why recorded outputs can no longer be trusted (one line), or None when every file is as written.

    ``roots``: folders the stage owns; a file that appeared in them since counts as damage too.
    """
    for name, sha in recorded.items():
        path = Path(name)
        if not path.is_file():
            return f"{path} is missing"
        if file_sha256(path) != sha:
            return f"{path} changed since it was written"
    extra = sorted(set(map(str, files_of(r for r in roots if r.is_dir()))) - set(recorded))
    if extra:
        return f"{extra[0]} appeared since the stage ran"
    return None


ENTRY_FIELDS: dict[str, tuple[type, ...]] = {
    "key": (str,),
    "run_id": (str, type(None)),
    "summary": (dict,),
    "outputs": (dict,),
    "roots": (list,),
    "basis": (dict,),
}
"""What an entry holds, and the JSON types each field may take (``basis`` may be absent: older entries)."""


def entry_problem(entry: Any, allowed: Iterable[Path]) -> str | None:
    """Why a cache entry cannot be used (one phrase), or None: its shape (:data:`ENTRY_FIELDS`; ``outputs``
    maps paths to sha256 strings, ``roots`` lists paths) and every path it names lying under one of ``allowed``
    (resolved folders), so that checking it never reads outside the places the pipeline writes to."""
    if not isinstance(entry, dict):
        return f"an entry is a {type(entry).__name__}, not an object"
    for name, types in ENTRY_FIELDS.items():
        if name not in entry and name != "basis":
            return f"it has no {name!r}"
        if name in entry and not isinstance(entry[name], types):
            return f"its {name!r} is a {type(entry[name]).__name__}"
    outputs, roots = entry["outputs"], entry["roots"]
    if not all(isinstance(v, str) for v in outputs.values()) or not all(isinstance(r, str) for r in roots):
        return "its outputs or roots are not paths with checksums"
    places = [_resolved(place) for place in allowed]
    for name in [*outputs, *roots]:
        if not _inside(Path(os.path.abspath(name)), places):  # by its text first: nothing outside is touched
            return f"it names {name}, outside the folders the pipeline writes to"
        try:
            resolved = Path(name).resolve()
        except OSError as exc:
            return f"it names {name}, which cannot be resolved ({first_line(exc)})"
        if not _inside(resolved, places):
            return f"it names {name}, a link to outside the folders the pipeline writes to"
    return None


def _resolved(place: Path) -> Path:
    try:
        return place.resolve()
    except OSError:
        return Path(os.path.abspath(place))


def _inside(path: Path, places: list[Path]) -> bool:
    return any(path.is_relative_to(place) for place in places)


@contextlib.contextmanager
def pipeline_lock(name: str, folder: Path = CACHE_DIR) -> Iterator[None]:
    """Hold ``NAME.lock`` beside the cache for a whole ``gssf run`` of pipeline ``name``, or refuse in one line
    when another process holds it. Why: two runs of one pipeline in one folder write the same outputs
    (``exports/NAME``...), and the later one's runs would record a bundle the earlier one wrote. The OS drops the
    lock when its process dies, however it dies; the empty file stays."""
    if sys.platform == "win32":
        yield
        return
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.lock"
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserInputError(
                f"pipeline {name} is already running in this folder (another process holds {path}): wait for it "
                "to end, then run it again"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


class Cache:
    """The entries of one pipeline, by step name: ``key``, ``run_id``, ``summary``, ``outputs``, ``roots``,
    ``basis``. ``allowed``: the folders its paths may lie in (the working folder and the ones the pipeline
    names). What could not be used is in ``dropped`` (step name, or ``*`` for the whole file → reason)."""

    def __init__(self, name: str, folder: Path = CACHE_DIR, allowed: Iterable[Path] = (Path(),)) -> None:
        self.path = folder / f"{name}.json"
        self.entries: dict[str, dict[str, Any]] = {}
        self.dropped: dict[str, str] = {}
        if self.path.exists() and not self.path.is_file():
            raise UserInputError(f"{self.path} is not a file: the pipeline cache cannot be written there; remove it")
        if not self.path.is_file():
            return
        try:
            loaded = json.loads(self.path.read_bytes().decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            self.dropped["*"] = f"{self.path} is not readable JSON ({first_line(exc)})"
            return
        except OSError as exc:
            raise UserInputError(f"{self.path}: cannot read the pipeline cache ({first_line(exc)})") from None
        if not isinstance(loaded, dict):
            self.dropped["*"] = f"{self.path} holds a {type(loaded).__name__}, not an object of steps"
            return
        places = list(allowed)
        for step, entry in loaded.items():
            problem = entry_problem(entry, places)
            if problem is None:
                self.entries[step] = entry
            else:
                self.dropped[step] = f"its entry in {self.path} is unusable: {problem}"

    def absent_because(self, step: str) -> str | None:
        """Why ``step`` has no usable entry although the file may have held one (None: it never had one)."""
        return self.dropped.get(step) or self.dropped.get("*")

    def get(self, step: str) -> dict[str, Any] | None:
        return self.entries.get(step)

    def record(self, step: str, entry: dict[str, Any]) -> None:
        """Store an entry and write the cache file atomically."""
        self.entries[step] = entry
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            tmp.write_text(json.dumps(self.entries, indent=2, default=str))
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
