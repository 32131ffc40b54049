"""``{split}_ids.txt`` of a precomp folder: kept (one id per image, checksummed in the manifest) whether the folder has
one id per caption line, as SCAN's coco_precomp does, or one per image; anything else refused in one line."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from typer.testing import Result

from gssf_cli.core.errors import UserInputError
from gssf_cli.core.stage_configs import PrepareConfig
from gssf_cli.data.manifest import load_manifest
from gssf_cli.data.precomp import read_image_ids
from gssf_cli.stages import prepare
from tests.factories import write_precomp

IDS = {"train": [11, 22, 33, 44], "dev": [391895, 60623]}


def _source(folder: Path, per_caption: bool = True, repeat: bool = False) -> Path:
    source = write_precomp(folder, n={split: len(ids) for split, ids in IDS.items()}, item_shape=(6,), repeat=repeat)
    for split, ids in IDS.items():
        lines = np.repeat(ids, 5) if per_caption else ids
        (source / f"{split}_ids.txt").write_text("".join(f"{i}\n" for i in lines))
    return source


def _prepare(source: Path, out: Path) -> dict:
    prepare.run(PrepareConfig(dataset="precomp", out=out, source=source))
    return load_manifest(out)


@pytest.mark.parametrize(("per_caption", "repeat"), [(True, False), (False, False), (True, True)])
def test_ids_are_kept_one_per_image_and_checksummed(tmp_path: Path, per_caption: bool, repeat: bool) -> None:
    source = _source(tmp_path / "src", per_caption=per_caption, repeat=repeat)
    manifest = _prepare(source, tmp_path / "out")
    for split, ids in IDS.items():
        path = tmp_path / "out" / f"{split}_ids.txt"
        assert path.read_text().split() == [str(i) for i in ids]
        assert manifest["files"][path.name]["bytes"] == path.stat().st_size
    (tmp_path / "out" / "dev_ids.txt").write_text("391895\n60624\n")
    with pytest.raises(UserInputError, match=r"dev_ids\.txt: checksum mismatch"):
        load_manifest(tmp_path / "out")


def test_a_folder_without_ids_gets_none(tmp_path: Path) -> None:
    source = write_precomp(tmp_path / "src", n={"train": 3})
    manifest = _prepare(source, tmp_path / "out")
    assert not any(name.endswith("_ids.txt") for name in manifest["files"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1\n2\n3\n", r"3 ids for 2 images; expected one id per image \(2\) or one per caption \(10\)"),
        ("1\n" * 5 + "2\n" * 4 + "3\n", r"lines 6-10 \(the captions of image 1\) hold different ids \[2, 3\]"),
        ("1\nabc\n", r"line 2 is 'abc', not an image id"),
        ("1\n-2\n", r"line 2 is '-2', not an image id"),
        ("1\n\n", r"line 2 is '', not an image id"),
        ("1\n" + "9" * 30 + "\n", r"an image id does not fit in 64 bits"),
    ],
)
def test_bad_ids_are_one_line_naming_the_file(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "test_ids.txt"
    path.write_text(text)
    with pytest.raises(UserInputError, match=expected) as info:
        read_image_ids(path, 2, 5)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_one_id_per_line_with_spaces_is_read(tmp_path: Path) -> None:
    path = tmp_path / "test_ids.txt"
    path.write_text(" 7 \r\n8\n")
    assert read_image_ids(path, 2, 5).tolist() == [7, 8]
    path.write_bytes(b"\xff\n")
    with pytest.raises(UserInputError, match="not UTF-8 text"):
        read_image_ids(path, 2, 5)


def test_prepare_with_a_wrong_count_exits_2_and_leaves_nothing(gssf: Callable[..., Result], workdir: Path) -> None:
    source = _source(workdir / "src")
    (source / "dev_ids.txt").write_text("391895\n60623\n1\n")
    result = gssf("prepare", "--dataset", "precomp", "--source", "src", "--out", "data/coco", "--json")
    assert result.exit_code == 2, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "dev_ids.txt: 3 ids for 2 images" in lines[0]
    assert not (workdir / "data").exists() or not any((workdir / "data").iterdir())
    ok = gssf(
        "prepare", "--dataset", "precomp", "--source", str(_source(workdir / "good")), "--out", "data/coco", "--json"
    )
    assert ok.exit_code == 0, ok.stderr
    assert "train_ids.txt" in json.loads((workdir / "data" / "coco" / "manifest.json").read_text())["files"]
