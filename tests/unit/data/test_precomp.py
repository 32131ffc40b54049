"""A SCAN/VSE precomp folder as a dataset: arrays linked (or de-repeated), captions copied, a vocabulary built."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gssf_cli.core.errors import UserInputError
from gssf_cli.core.stage_configs import PrepareConfig
from gssf_cli.data.precomp import write_precomp
from gssf_cli.data.text import SPECIALS, Vocabulary, build_vocabulary, read_captions
from tests.factories import write_precomp as write_source


def _config(source: Path, **values: object) -> PrepareConfig:
    return PrepareConfig(dataset="precomp", out=Path("unused"), source=source, **values)  # type: ignore[arg-type]


def test_the_writer_links_images_and_copies_captions(tmp_path: Path) -> None:
    source = write_source(tmp_path / "src", n={"train": 4, "dev": 2}, item_shape=(3, 6))
    out = tmp_path / "out"
    out.mkdir()
    fields = write_precomp(_config(source, min_word_count=1), out)
    assert (out / "train_ims.npy").stat().st_ino == (source / "train_ims.npy").stat().st_ino
    assert (out / "dev_caps.txt").read_bytes() == (source / "dev_caps.txt").read_bytes()
    assert fields["splits"] == {"train": {"images": 4, "captions": 20}, "dev": {"images": 2, "captions": 10}}
    assert fields["modalities"]["image"] == {"type": "regions", "shape": [3, 6], "dtype": "float32"}
    vocab = Vocabulary.load(out / "vocab.json")
    assert vocab == build_vocabulary(read_captions(source / "train_caps.txt"), 1)
    assert vocab.words[:4] == SPECIALS and fields["modalities"]["text"]["vocab_size"] == len(vocab)


def test_images_repeated_per_caption_are_kept_once(tmp_path: Path) -> None:
    source = write_source(tmp_path / "src", n={"train": 3}, item_shape=(6,), repeat=True)
    out = tmp_path / "out"
    out.mkdir()
    fields = write_precomp(_config(source), out)
    ims = np.load(out / "train_ims.npy")
    assert np.array_equal(ims, np.load(source / "train_ims.npy")[::5]) and ims.shape == (3, 6)
    assert fields["splits"]["train"] == {"images": 3, "captions": 15}
    assert fields["modalities"]["image"]["type"] == "global"


def test_a_split_missing_its_captions_is_named(tmp_path: Path) -> None:
    source = write_source(tmp_path / "src", n={"train": 2, "dev": 2})
    (source / "dev_caps.txt").unlink()
    with pytest.raises(UserInputError, match=r"dev_caps\.txt: missing \(each split needs both dev_ims\.npy"):
        write_precomp(_config(source), tmp_path)


def test_captions_that_do_not_match_the_images_are_refused(tmp_path: Path) -> None:
    source = write_source(tmp_path / "src", n={"train": 2})
    (source / "train_caps.txt").write_text("one caption\ntwo captions\nthree\n")
    with pytest.raises(UserInputError, match=r"2 images but 3 captions in the matching _caps\.txt; expected 5"):
        write_precomp(_config(source), tmp_path / "out")


def test_a_source_that_is_not_a_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserInputError, match="is not a folder"):
        write_precomp(_config(tmp_path / "file"), tmp_path)
    with pytest.raises(UserInputError, match="not found"):
        write_precomp(_config(tmp_path / "missing"), tmp_path)
