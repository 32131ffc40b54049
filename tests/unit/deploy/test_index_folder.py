"""The index folder's own rules, without a bundle: ids files, where an index goes, what ``--out`` may replace,
the metrics a manifest reports, the captions a dataset's gallery brings, and the vectors an ivfpq folder keeps for
``refine`` (on a hand-made identity bundle; builds and searches on a real bundle: ``tests/behaviour/test_search.py``)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gssf_cli.core.errors import UserInputError
from gssf_cli.core.files import MANIFEST, file_entry
from gssf_cli.core.stage_configs import IndexConfig, SearchConfig
from gssf_cli.deploy import search
from gssf_cli.deploy.index_folder import (
    IDS_FILE,
    INDEX_FILE,
    VECTORS_FILE,
    SearchResult,
    build,
    build_inputs,
    check_replaceable,
    default_out,
    gallery_captions,
    open_index,
    read_ids,
    read_manifest,
    row_captions,
    run_search,
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


# ---------------------------------------------------------------------------------------------------------
# ivfpq keeps its vectors for refine (an identity bundle of D = 4, so the index vectors are the gallery's rows)


@dataclass(frozen=True)
class Built:
    bundle: Path
    gallery: np.ndarray
    queries: Path
    ivfpq: Path
    flat: Path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    from tests.unit.deploy.test_bundle import _make_bundle

    root = tmp_path_factory.mktemp("refine")
    bundle = _make_bundle(root / "bundle")
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((8, 4)).astype(np.float32)
    gallery = centres[rng.integers(8, size=2_000)] + 0.3 * rng.standard_normal((2_000, 4)).astype(np.float32)
    np.save(root / "gallery.npy", gallery)
    np.save(root / "queries.npy", gallery[:6] + 0.1)
    folders = {}
    for kind in ("ivfpq", "flat"):
        config = IndexConfig(bundle=bundle, gallery=root / "gallery.npy", kind=kind, embedded=True, out=root / kind)
        model, opened, out = build_inputs(config)
        folders[kind] = build(config, model, opened, out).path
    return Built(bundle, gallery, root / "queries.npy", folders["ivfpq"], folders["flat"])


def _search(built: Built, folder: Path, **settings: Any) -> SearchResult:
    config = SearchConfig(index=folder, vectors=built.queries, embedded=True, k=5, **settings)
    return run_search(open_index(folder, built.bundle), config)


def _copy(folder: Path, tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    return copy, json.loads((copy / MANIFEST).read_text())


def test_an_ivfpq_folder_keeps_its_vectors_and_answers_with_their_exact_products(built: Built) -> None:
    manifest = read_manifest(built.ivfpq)
    assert set(manifest["files"]) == {INDEX_FILE, IDS_FILE, VECTORS_FILE}
    assert manifest["spec"]["search"]["refine"] == search.DEFAULT_REFINE
    np.testing.assert_array_equal(np.load(built.ivfpq / VECTORS_FILE), built.gallery)
    opened = open_index(built.ivfpq, built.bundle)
    assert isinstance(opened.vectors, np.memmap) and opened.vectors.shape == (2_000, 4)
    queries = np.load(built.queries)
    for query, hits in zip(queries, _search(built, built.ivfpq).queries, strict=True):
        rows = [hit["row"] for hit in hits["results"]]
        scores = [hit["score"] for hit in hits["results"]]
        np.testing.assert_allclose(scores, built.gallery[rows] @ query, rtol=1e-6, atol=1e-6)
    assert set(read_manifest(built.flat)["files"]) == {INDEX_FILE, IDS_FILE}


def test_a_vectors_file_changed_in_place_or_of_another_shape_is_refused(built: Built, tmp_path: Path) -> None:
    copy, manifest = _copy(built.ivfpq, tmp_path)
    vectors = np.load(copy / VECTORS_FILE, mmap_mode="r+")
    vectors[7, 1] += 1.0
    vectors.flush()
    del vectors
    with pytest.raises(UserInputError, match=r"vectors.npy: checksum mismatch with manifest.json"):
        open_index(copy, built.bundle)
    np.save(copy / VECTORS_FILE, built.gallery[:, :3])
    manifest["files"][VECTORS_FILE] = file_entry(copy / VECTORS_FILE)
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserInputError, match=r"holds float32 \[2000, 3\], the manifest says float32 \[2000, 4\]"):
        open_index(copy, built.bundle)


def test_an_ivfpq_folder_from_before_refine_searches_with_it_off(built: Built, tmp_path: Path) -> None:
    copy, manifest = _copy(built.ivfpq, tmp_path)
    (copy / VECTORS_FILE).unlink()
    del manifest["files"][VECTORS_FILE]
    del manifest["spec"]["search"]["refine"]
    (copy / MANIFEST).write_text(json.dumps(manifest))
    opened = open_index(copy, built.bundle)
    assert opened.vectors is None and opened.spec.search["refine"] == search.REFINE_OFF
    assert _search(built, copy).params == {"nprobe": manifest["spec"]["search"]["nprobe"], "refine": 0}
    with pytest.raises(UserInputError, match=r"--refine 4: .* was built before gssf kept the vectors") as caught:
        _search(built, copy, refine=4)
    assert "\n" not in str(caught.value)
    manifest["spec"]["search"]["refine"] = 4
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserInputError, match=r"refine is on, but the folder lists no vectors.npy; rebuild it"):
        open_index(copy, built.bundle)


def test_refine_on_a_flat_index_is_refused_in_one_line(built: Built, tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match=r"--refine does not apply to --kind flat") as caught:
        _search(built, built.flat, refine=2)
    assert "\n" not in str(caught.value)
    config = IndexConfig(bundle=built.bundle, gallery=tmp_path / "g.npy", kind="flat", embedded=True, refine=2,
                         out=tmp_path / "x")  # fmt: skip
    np.save(config.gallery, built.gallery[:50])  # type: ignore[arg-type]
    with pytest.raises(UserInputError, match=r"--refine does not apply to --kind flat"):
        build(config, *build_inputs(config))
    assert not (tmp_path / "x").exists()
