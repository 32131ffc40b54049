"""A user's feature arrays as a dataset: split ones linked as they are, unsplit ones split by image or class."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gssf_cli.core.errors import UserInputError
from gssf_cli.core.stage_configs import PrepareConfig
from gssf_cli.data.features import write_features
from tests.factories import write_feature_folder, write_feature_npz


def _config(source: Path, **values: object) -> PrepareConfig:
    return PrepareConfig(dataset="features", out=Path("unused"), source=source, **values)  # type: ignore[arg-type]


def _out(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    return out


def test_split_npy_files_are_linked_as_they_are(tmp_path: Path) -> None:
    source = write_feature_folder(tmp_path / "src", paired=True, k=2)
    out = _out(tmp_path)
    fields = write_features(_config(source), out)
    assert (out / "dev_txts.npy").stat().st_ino == (source / "dev_texts.npy").stat().st_ino
    assert fields["captions_per_image"] == 2 and fields["seed"] is None
    assert fields["splits"]["test"] == {"images": 6, "captions": 12}
    assert fields["modalities"]["text"] == {"type": "features", "shape": [7], "dtype": "float32"}


def test_unsplit_labels_are_split_by_class(tmp_path: Path) -> None:
    source = write_feature_npz(tmp_path / "x.npz", paired=False, n=40, classes=10)
    out = _out(tmp_path)
    fields = write_features(_config(source, seed=1), out)
    classes = {s: set(np.load(out / f"{s}_labels.npy").tolist()) for s in ("train", "dev", "test")}
    assert not (classes["train"] & classes["dev"]) and not (classes["train"] & classes["test"])
    assert not (classes["dev"] & classes["test"]) and set().union(*classes.values()) == set(range(10))
    assert {s: fields["splits"][s]["classes"] for s in classes} == {s: len(c) for s, c in classes.items()}
    assert fields["seed"] == 1 and fields["task"] == "labels"


def test_unsplit_pairs_keep_their_texts_with_their_images(tmp_path: Path) -> None:
    source = write_feature_npz(tmp_path / "x.npz", paired=True, n=20, k=2)
    out = _out(tmp_path)
    fields = write_features(_config(source), out)
    texts = np.load(out / "train_txts.npy")
    assert np.array_equal(texts[1::2, 0], texts[::2, 0] + 4), "an image's two texts stay next to each other"
    assert sum(s["images"] for s in fields["splits"].values()) == 20


def test_too_little_to_split_is_refused(tmp_path: Path) -> None:
    source = write_feature_npz(tmp_path / "x.npz", paired=False, n=8, classes=4)
    with pytest.raises(UserInputError, match="only 4 classes to split into train/dev/test"):
        write_features(_config(source), _out(tmp_path))


def test_texts_that_are_not_a_multiple_of_the_images_are_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "x.npz", images=np.ones((4, 3), np.float32), texts=np.ones((6, 3), np.float32))
    with pytest.raises(UserInputError, match="texts: 6 rows is not a multiple of the 4 images"):
        write_features(_config(tmp_path / "x.npz"), _out(tmp_path))


def test_arrays_of_neither_layout_are_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "x.npz", vectors=np.ones((4, 3), np.float32))
    with pytest.raises(UserInputError, match=r"found \['vectors'\]; expected images\+texts or features\+labels"):
        write_features(_config(tmp_path / "x.npz"), _out(tmp_path))


def test_pairs_with_labels_keep_each_images_label_for_intra_modal_relevance(tmp_path: Path) -> None:
    """Labels beside pairs follow their images through the split and become the split's i2i and t2t relevance
    (an image's captions carry its label); split sources name them per split."""
    from gssf_cli.evaluation.intramodal import relevance_of

    rng = np.random.default_rng(0)
    images = rng.normal(size=(30, 4)).astype(np.float32)
    labels = np.arange(30) % 3
    np.savez(tmp_path / "x.npz", images=images, texts=np.repeat(images, 2, axis=0), labels=labels)
    out = _out(tmp_path)
    write_features(_config(tmp_path / "x.npz"), out)
    kept = np.load(out / "test_ims.npy")
    expected = labels[[int(np.flatnonzero((images == row).all(axis=1))[0]) for row in kept]]
    assert np.array_equal(np.load(out / "test_labels.npy"), expected)
    sources = relevance_of(out, "test", len(kept), 2)
    assert {side: r.source for side, r in sources.items()} == {"i2i": "same label", "t2t": "same label"}
    same = expected[:, None] == expected[None, :]
    np.fill_diagonal(same, False)
    assert np.array_equal(sources["i2i"].block(slice(0, len(kept))), same)
    assert np.array_equal(sources["t2t"].sets[::2, 0], expected)

    split = {f"{s}_{n}": a for s in ("train", "dev", "test") for n, a in
             (("images", images[:10]), ("texts", images[:10]), ("labels", labels[:10]))}  # fmt: skip
    np.savez(tmp_path / "split.npz", **split)
    (tmp_path / "split").mkdir()
    write_features(_config(tmp_path / "split.npz"), tmp_path / "split")
    assert np.array_equal(np.load(tmp_path / "split/dev_labels.npy"), labels[:10])
    del split["dev_labels"]
    np.savez(tmp_path / "partial.npz", **split)
    with pytest.raises(UserInputError, match="dev_labels is missing"):
        write_features(_config(tmp_path / "partial.npz"), tmp_path)
    np.savez(tmp_path / "short.npz", images=images, texts=images, labels=labels[:-1])
    with pytest.raises(UserInputError, match="29 labels for 30 image rows"):
        write_features(_config(tmp_path / "short.npz"), tmp_path)
