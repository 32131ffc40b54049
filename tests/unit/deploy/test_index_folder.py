"""The index folder's own rules, without a bundle: ids files, where an index goes, what ``--out`` may replace,
the metrics a manifest reports, and the captions a dataset's gallery brings (builds and searches on a real bundle:
``tests/behaviour/test_search.py``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from gssf_cli.core.errors import UserInputError
from gssf_cli.core.files import MANIFEST
from gssf_cli.deploy.index_folder import (
    check_replaceable,
    default_out,
    gallery_captions,
    read_ids,
    read_manifest,
    row_captions,
    text_lines,
)


def test_ids_split_at_newlines_only_and_keep_other_separators() -> None:
    assert text_lines("a\nb\r\nc\n") == ["a", "b", "c"]
    assert text_lines("x\u2028y\x0cz") == ["x\u2028y\x0cz"], "an id may hold what str.splitlines breaks on"
    assert text_lines("") == []


def test_ids_are_one_per_row_unique_and_non_empty(tmp_path: Path) -> None:
    ids = tmp_path / "ids.txt"
    ids.write_text("\ufeffcat\ndog\n", encoding="utf-8")
    assert read_ids(ids, 2) == ["cat", "dog"], "a byte-order mark is not part of the first id"
    for text, count, message in [
        ("a\nb\n", 3, "2 ids for a gallery of 3 rows"),
        ("a\n\n", 2, "line 2 is an empty id"),
        ("a\nb\na\n", 3, "the id 'a' appears twice"),
    ]:
        ids.write_text(text, encoding="utf-8")
        with pytest.raises(UserInputError, match=message):
            read_ids(ids, count)
    ids.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(UserInputError, match="not UTF-8"):
        read_ids(ids, 1)
    with pytest.raises(UserInputError, match="file not found"):
        read_ids(tmp_path / "missing.txt", 1)


def test_an_index_goes_under_indexes_named_after_its_bundle(tmp_path: Path) -> None:
    assert default_out(tmp_path / "exports" / "quickstart") == Path("indexes/quickstart")


def test_out_may_replace_only_an_index_and_never_hold_an_input(tmp_path: Path) -> None:
    bundle, gallery = tmp_path / "exports/b", tmp_path / "data/g.npy"
    inputs = {"the bundle": bundle, "the gallery": gallery, "the working folder": tmp_path}
    for out in (tmp_path / "exports", bundle, tmp_path):
        with pytest.raises(UserInputError, match="is or holds"):
            check_replaceable(out, inputs)
    other = tmp_path / "indexes/notes"
    other.mkdir(parents=True)
    (other / "todo.txt").write_text("keep me")
    with pytest.raises(UserInputError, match="not a gssf index"):
        check_replaceable(other, {"the bundle": bundle})
    index = tmp_path / "indexes/old"
    index.mkdir()
    (index / MANIFEST).write_text(json.dumps({"index_format": 1}))
    check_replaceable(index, {"the bundle": bundle})
    check_replaceable(tmp_path / "indexes/new", {"the bundle": bundle})
    assert (other / "todo.txt").read_text() == "keep me"


def _dataset_copy(source: Path, folder: Path) -> Path:
    shutil.copytree(source, folder)
    return folder


def test_a_datasets_split_brings_its_images_captions_and_a_plain_array_none(tiny_syn: Path, tmp_path: Path) -> None:
    found = gallery_captions(tiny_syn / "test_ims.npy", 16)
    assert found is not None and found.per_row == 5 and found.source == tiny_syn / "test_caps.txt"
    assert found.lines == (tiny_syn / "test_caps.txt").read_text().splitlines()
    np.save(tmp_path / "gallery.npy", np.zeros((16, 4, 8), dtype=np.float32))
    assert gallery_captions(tmp_path / "gallery.npy", 16) is None
    np.save(tmp_path / "test_ims.npy", np.zeros((16, 4, 8), dtype=np.float32))
    (tmp_path / "test_caps.txt").write_text("a caption\n" * 80)
    assert gallery_captions(tmp_path / "test_ims.npy", 16) is None, "no dataset manifest: not a dataset's split"
    for text in ("not json", json.dumps({"task": "labels", "files": {}}), json.dumps([1, 2])):
        (tmp_path / MANIFEST).write_text(text)
        assert gallery_captions(tmp_path / "test_ims.npy", 16) is None, text


def test_captions_that_changed_or_do_not_fit_the_gallery_are_refused(tiny_syn: Path, tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match=r"80 captions for a gallery of 15 rows with 5 captions per image \(75\)"):
        gallery_captions(tiny_syn / "test_ims.npy", 15)
    changed = _dataset_copy(tiny_syn, tmp_path / "changed")
    with open(changed / "test_caps.txt", "a") as fh:
        fh.write("a red square\n")
    with pytest.raises(UserInputError, match=r"test_caps.txt: missing or changed since the dataset was prepared"):
        gallery_captions(changed / "test_ims.npy", 16)


def test_a_search_reads_only_its_hits_captions_split_at_newlines() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "captions.txt"
        path.write_text("r0 a\nr0 b\nr1 a\u2028still r1 a\nr1 b\nr2 a\nr2 b\n", encoding="utf-8")
        assert row_captions(path, [2, 0], per_row=2) == {0: ["r0 a", "r0 b"], 2: ["r2 a", "r2 b"]}
        assert row_captions(path, [1], per_row=2) == {1: ["r1 a\u2028still r1 a", "r1 b"]}
        assert row_captions(path, [], per_row=2) == {}


def _index_manifest(folder: Path, **changes: object) -> Path:
    folder.mkdir()
    entry = {"sha256": "0" * 64, "bytes": 1}
    manifest = {
        "index_format": 1, "kind": "flat", "spec": {}, "count": 3, "dim": 4,
        "bundle": {"digest": "0" * 64, "path": "../b"}, "files": {"index.faiss": entry, "ids.txt": entry},
        "gallery": {"captions": None}, **changes,
    }  # fmt: skip
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


def test_an_index_manifest_lists_captions_with_their_count_per_row_or_neither(tmp_path: Path) -> None:
    entry = {"sha256": "0" * 64, "bytes": 1}
    with_captions = {"index.faiss": entry, "ids.txt": entry, "captions.txt": entry}
    assert read_manifest(_index_manifest(tmp_path / "plain"))["files"].keys() == {"index.faiss", "ids.txt"}
    read_manifest(_index_manifest(tmp_path / "both", files=with_captions, gallery={"captions": {"per_row": 5}}))
    for name, changes in {
        "no count": {"files": with_captions},
        "count without file": {"gallery": {"captions": {"per_row": 5}}},
        "zero count": {"files": with_captions, "gallery": {"captions": {"per_row": 0}}},
    }.items():
        with pytest.raises(UserInputError, match=r"malformed index manifest \(captions.txt"):
            read_manifest(_index_manifest(tmp_path / name.replace(" ", "-"), **changes))
