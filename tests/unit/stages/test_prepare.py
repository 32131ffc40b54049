"""``gssf prepare``: every dataset kind builds a valid folder; manifests are exact and verified."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from typer.testing import Result

from gssf_cli.data.manifest import load_manifest
from gssf_cli.data.text import SPECIALS, Vocabulary, tokenize
from tests.conftest import tiny_synthetic_args
from tests.factories import write_feature_folder, write_feature_npz, write_precomp

Gssf = Callable[..., Result]


def _prepare_json(gssf: Gssf, *args: str) -> dict:
    result = gssf(*args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_synthetic_is_byte_identical_for_a_seed(gssf: Gssf, workdir: Path) -> None:
    _prepare_json(gssf, *tiny_synthetic_args("data/a"), "--seed", "3")
    _prepare_json(gssf, *tiny_synthetic_args("data/b"), "--seed", "3")
    _prepare_json(gssf, *tiny_synthetic_args("data/c"), "--seed", "4")
    a, b, c = (_folder_bytes(workdir / "data" / x) for x in "abc")
    a.pop("manifest.json"), b.pop("manifest.json"), c.pop("manifest.json")
    assert a == b
    assert a["train_ims.npy"] != c["train_ims.npy"]


def test_synthetic_folder_matches_its_manifest(gssf: Gssf, workdir: Path) -> None:
    out = _prepare_json(gssf, *tiny_synthetic_args())
    folder = workdir / "data" / "syn"
    manifest = load_manifest(folder)
    assert manifest["kind"] == "synthetic" and manifest["task"] == "cross_modal"
    assert manifest["captions_per_image"] == 5
    assert manifest["modalities"]["image"]["shape"] == [4, 8]
    for split, n in {"train": 40, "dev": 10, "test": 10}.items():
        ims = np.load(folder / f"{split}_ims.npy")
        caps = (folder / f"{split}_caps.txt").read_text().splitlines()
        assert ims.shape == (n, 4, 8) and ims.dtype == np.float32
        assert len(caps) == 5 * n
        assert manifest["splits"][split] == {"images": n, "captions": 5 * n}
    assert set(manifest["files"]) == {p.name for p in folder.iterdir()} - {"manifest.json"}
    assert out["splits"]["train"]["images"] == 40 and out["run_id"]


def test_synthetic_captions_name_their_images_concepts(gssf: Gssf, workdir: Path) -> None:
    """Matching is learnable: every caption names 2-3 concepts, all five captions of an image name at most its 3,
    and five captions of five images name far more."""
    from gssf_cli.data.synthetic import CONCEPTS_PER_IMAGE, grammar

    _prepare_json(gssf, *tiny_synthetic_args(), "--vocab-size", "300")
    caps = (workdir / "data/syn/train_caps.txt").read_text().splitlines()
    named = [set(grammar(6, 300).parse(caption)) for caption in caps]
    assert all(len(concepts) >= 2 for concepts in named)
    same = [set().union(*named[5 * i : 5 * i + 5]) for i in range(40)]
    other = [set().union(*(named[5 * ((i + j) % 40) + j] for j in range(5))) for i in range(40)]
    assert all(len(concepts) <= CONCEPTS_PER_IMAGE for concepts in same)
    assert np.mean([len(concepts) for concepts in other]) > 1.5 * np.mean([len(concepts) for concepts in same])


def test_digits_is_class_disjoint(gssf: Gssf, workdir: Path) -> None:
    out = _prepare_json(gssf, "prepare", "--dataset", "digits", "--out", "data/digits")
    folder = workdir / "data" / "digits"
    train, dev, test = (np.load(folder / f"{s}_labels.npy") for s in ("train", "dev", "test"))
    assert set(train) == set(dev) == {0, 1, 2, 3, 4, 5}
    assert set(test) == {6, 7, 8, 9}
    feats = np.load(folder / "train_feats.npy")
    assert feats.shape == (len(train), 64) and feats.min() >= 0.0 and feats.max() <= 1.0
    assert len(train) + len(dev) + len(test) == 1797
    assert out["task"] == "labels"


@pytest.mark.parametrize("item_shape", [(3, 6), (6,)])
def test_precomp_links_arrays_and_builds_a_vocabulary(gssf: Gssf, workdir: Path, item_shape: tuple[int, ...]) -> None:
    source = write_precomp(workdir / "src", item_shape=item_shape)
    _prepare_json(
        gssf, "prepare", "--dataset", "precomp", "--source", "src", "--out", "data/p", "--min-word-count", "2"
    )
    folder = workdir / "data" / "p"
    manifest = load_manifest(folder)
    assert manifest["modalities"]["image"]["type"] == ("regions" if len(item_shape) == 2 else "global")
    assert (folder / "train_ims.npy").stat().st_ino == (source / "train_ims.npy").stat().st_ino
    vocab = Vocabulary.load(folder / "vocab.json")
    assert vocab.words[:4] == SPECIALS
    counts: dict[str, int] = {}
    for line in (source / "train_caps.txt").read_text().splitlines():
        for token in tokenize(line):
            counts[token] = counts.get(token, 0) + 1
    assert set(vocab.words[4:]) == {w for w, c in counts.items() if c >= 2}


def test_precomp_drops_images_repeated_per_caption(gssf: Gssf, workdir: Path) -> None:
    source = write_precomp(workdir / "src", repeat=True)
    out = _prepare_json(gssf, "prepare", "--dataset", "precomp", "--source", "src", "--out", "data/p")
    ims = np.load(workdir / "data/p/train_ims.npy")
    repeated = np.load(source / "train_ims.npy")
    assert ims.shape[0] == 8 and np.array_equal(ims, repeated[::5])
    assert out["splits"]["train"] == {"images": 8, "captions": 40}


def test_precomp_uses_a_scan_vocabulary(gssf: Gssf, workdir: Path) -> None:
    write_precomp(workdir / "src", vocab=True)
    _prepare_json(gssf, "prepare", "--dataset", "precomp", "--source", "src", "--out", "data/p")
    vocab = Vocabulary.load(workdir / "data/p/vocab.json")
    assert vocab.words[4] == "a" and vocab.encode("A dog!") == [1, 4, 5, 2]


def test_features_folder_with_splits(gssf: Gssf, workdir: Path) -> None:
    write_feature_folder(workdir / "src", paired=True, k=2)
    out = _prepare_json(gssf, "prepare", "--dataset", "features", "--source", "src", "--out", "data/f")
    manifest = load_manifest(workdir / "data/f")
    assert manifest["task"] == "cross_modal" and manifest["captions_per_image"] == 2
    assert out["splits"]["dev"] == {"images": 4, "captions": 8}
    assert np.load(workdir / "data/f/test_txts.npy").shape == (12, 7)


def test_features_npz_pairs_are_split_by_image(gssf: Gssf, workdir: Path) -> None:
    write_feature_npz(workdir / "pairs.npz", paired=True, n=40, k=2)
    out = _prepare_json(gssf, "prepare", "--dataset", "features", "--source", "pairs.npz", "--out", "data/f")
    assert sum(s["images"] for s in out["splits"].values()) == 40
    texts = np.load(workdir / "data/f/train_txts.npy")
    first_text_row = texts[::2, 0] / 4
    assert np.array_equal(texts[1::2, 0] / 4, first_text_row + 1)


def test_features_npz_labels_are_split_by_class(gssf: Gssf, workdir: Path) -> None:
    write_feature_npz(workdir / "lab.npz", paired=False, n=100, classes=10)
    _prepare_json(gssf, "prepare", "--dataset", "features", "--source", "lab.npz", "--out", "data/l")
    labels = {s: set(np.load(workdir / f"data/l/{s}_labels.npy").tolist()) for s in ("train", "dev", "test")}
    assert not (labels["train"] & labels["test"]) and not (labels["train"] & labels["dev"])
    assert len(labels["train"] | labels["dev"] | labels["test"]) == 10


def test_force_replaces_an_existing_dataset(gssf: Gssf, workdir: Path) -> None:
    _prepare_json(gssf, *tiny_synthetic_args(), "--seed", "1")
    _prepare_json(gssf, *tiny_synthetic_args(), "--seed", "2", "--force")
    assert load_manifest(workdir / "data/syn")["seed"] == 2
    assert [p.name for p in (workdir / "data").iterdir()] == ["syn"]


def test_config_file_feeds_prepare(gssf: Gssf, workdir: Path) -> None:
    (workdir / "p.toml").write_text('dataset = "digits"\nout = "data/from_toml"\nseed = 9\n')
    out = _prepare_json(gssf, "prepare", "--config", "p.toml", "--seed", "10")
    assert out["path"] == "data/from_toml"
    assert load_manifest(workdir / "data/from_toml")["seed"] == 10
