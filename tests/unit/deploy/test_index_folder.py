"""The index folder's own rules, without a bundle: ids files, where an index goes, what ``--out`` may replace,
and the metrics a manifest reports (builds and searches on a real bundle: ``tests/behaviour/test_search.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gssf_cli.core.errors import UserInputError
from gssf_cli.core.files import MANIFEST
from gssf_cli.deploy.index_folder import check_replaceable, default_out, read_ids, text_lines


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
