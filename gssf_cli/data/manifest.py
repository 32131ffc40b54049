"""``manifest.json``: the contract between ``gssf prepare`` and every later stage.

Fields (format version 1): ``format_version``, ``name``, ``kind`` (synthetic | digits | precomp | features),
``task`` (``cross_modal``: images paired with ``captions_per_image`` texts each, in image order; or
``labels``: features with class labels), ``modalities`` (per modality: type, per-item shape, dtype),
``splits`` (per split: counts and, for labelled data, classes), ``source``, ``seed``, ``settings`` (the
resolved prepare config), ``files`` (sha256 and size of every data file), ``created_by``.

No timestamps: preparing the same source with the same seed gives a byte-identical folder. Later stages
call :func:`load_manifest`, which re-checks every checksum, so a modified or truncated file is caught
before it can silently change a result.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gssf_cli import __version__
from gssf_cli.core.errors import UserInputError
from gssf_cli.core.files import MANIFEST, sha256_file

FORMAT_VERSION = 1

_VERIFIED: dict[tuple[str, int, int], str] = {}
"""Files this process already hashed, by (absolute path, size, mtime in ns) -> sha256. A training run, its
evaluation, an export and every tune trial in one process open the same dataset; an 8.5 GB precomp folder
is hashed once, and again only when a file's size or modification time changes."""


def write_manifest(folder: Path, fields: dict[str, Any]) -> dict[str, Any]:
    """Checksum every data file in ``folder`` and write ``manifest.json``; returns the manifest."""
    files = {
        path.name: {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        for path in sorted(folder.iterdir())
        if path.is_file() and path.name != MANIFEST
    }
    manifest = {"format_version": FORMAT_VERSION, **fields, "files": files, "created_by": f"gssf {__version__}"}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return manifest


def load_manifest(folder: Path, verify: bool = True) -> dict[str, Any]:
    """Read a dataset folder's manifest and, unless told otherwise, re-check every file's checksum."""
    path = folder / MANIFEST
    if not folder.is_dir():
        raise UserInputError(f"dataset folder {folder} not found: run `gssf prepare` first or fix --data")
    if not path.is_file():
        raise UserInputError(f"{folder} has no {MANIFEST}: it is not a gssf dataset (run `gssf prepare`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserInputError(f"{path}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise UserInputError(f"{path}: cannot read ({exc.strerror})") from None
    if not isinstance(manifest, dict):
        raise UserInputError(
            f"{path}: expected a JSON object, got {type(manifest).__name__}; prepare the dataset again"
        )
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise UserInputError(
            f"{path}: dataset format version {version} is not supported (this gssf reads {FORMAT_VERSION}); "
            "prepare the dataset again"
        )
    check_fields(manifest, path)
    if verify:
        for name, entry in manifest.get("files", {}).items():
            file = folder / name
            if not file.is_file():
                raise UserInputError(f"{file}: listed in the manifest but missing; prepare the dataset again")
            if file.stat().st_size != entry["bytes"] or file_sha256(file) != entry["sha256"]:
                raise UserInputError(
                    f"{file}: checksum mismatch with {MANIFEST} (file changed or truncated); prepare the dataset again"
                )
    return manifest


def split_classes(manifest: dict[str, Any], split: str) -> str | None:
    """Whether ``split``'s classes were trained on: ``seen`` (all in train), ``unseen`` (none), ``partly seen``,
    or None when the manifest lists no classes (cross-modal data). Why: on class-disjoint data (digits) the dev
    split measures seen classes and the test split unseen ones, so their scores differ by design and must not be
    read as one number."""
    splits = manifest.get("splits", {})
    train, own = (splits.get(name, {}).get("classes") for name in ("train", split))
    if split == "train" or not isinstance(train, list) or not isinstance(own, list) or not own:
        return None
    shared = set(own) & set(train)
    return "seen" if shared == set(own) else "unseen" if not shared else "partly seen"


def split_label(manifest: dict[str, Any], split: str) -> str:
    """``test (unseen classes)``, ``dev (seen classes)``, or the split's name alone (:func:`split_classes`)."""
    classes = split_classes(manifest, split)
    return f"{split} ({classes} classes)" if classes else split


def file_sha256(path: Path) -> str:
    """sha256 of a file, hashed at most once per process while its size and modification time stay the same."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _VERIFIED:
        _VERIFIED[key] = sha256_file(path)
    return _VERIFIED[key]


_SPLIT_COUNTS = {"cross_modal": ("images", "captions"), "labels": ("items",)}


def check_fields(manifest: dict[str, Any], path: Path) -> None:
    """Every field a later stage reads is there with the right type (see the module docstring), so a damaged or
    hand-edited manifest is one line naming the field rather than a crash deep inside a stage."""

    def need(value: Any, key: str, kind: type | tuple[type, ...], what: str) -> Any:
        if isinstance(value, bool) or not isinstance(value, kind):
            found = "missing" if value is None else f"{type(value).__name__} {value!r}"[:60]
            raise UserInputError(f"{path}: {key}: expected {what}, got {found}; prepare the dataset again")
        return value

    def count(value: Any, key: str) -> int:
        number: int = need(value, key, int, "a count (an integer >= 0)")
        if number < 0:
            raise UserInputError(f"{path}: {key}: expected a count (an integer >= 0), got {number}")
        return number

    def shape(modality: dict[str, Any], key: str) -> None:
        dims = need(modality.get("shape"), f"{key}.shape", list, "a list of sizes")
        if not dims or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
            raise UserInputError(f"{path}: {key}.shape: expected positive sizes, got {dims}; prepare the dataset again")

    need(manifest.get("name"), "name", str, "a string")
    task = need(manifest.get("task"), "task", str, "a string")
    if task not in _SPLIT_COUNTS:
        raise UserInputError(f"{path}: task: expected one of {', '.join(_SPLIT_COUNTS)}, got {task!r}")
    modalities = need(manifest.get("modalities"), "modalities", dict, "an object")
    if task == "labels":
        shape(need(modalities.get("features"), "modalities.features", dict, "an object"), "modalities.features")
    else:
        count(manifest.get("captions_per_image"), "captions_per_image")
        if manifest["captions_per_image"] < 1:
            raise UserInputError(f"{path}: captions_per_image: expected at least 1; prepare the dataset again")
        image = need(modalities.get("image"), "modalities.image", dict, "an object")
        need(image.get("type"), "modalities.image.type", str, "a string")
        shape(image, "modalities.image")
        text = need(modalities.get("text"), "modalities.text", dict, "an object")
        if need(text.get("type"), "modalities.text.type", str, "a string") == "captions":
            count(text.get("vocab_size"), "modalities.text.vocab_size")
        else:
            shape(text, "modalities.text")
    splits = need(manifest.get("splits"), "splits", dict, "an object of splits")
    if not splits:
        raise UserInputError(f"{path}: splits: no split listed; prepare the dataset again")
    for split, counts in splits.items():
        need(counts, f"splits.{split}", dict, "an object of counts")
        for name in _SPLIT_COUNTS[task]:
            count(counts.get(name), f"splits.{split}.{name}")
    files = need(manifest.get("files", {}), "files", dict, "an object of checksums")
    for name, entry in files.items():
        need(entry, f"files.{name}", dict, "an object with sha256 and bytes")
        need(entry.get("sha256"), f"files.{name}.sha256", str, "a string")
        count(entry.get("bytes"), f"files.{name}.bytes")
