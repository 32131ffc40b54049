"""The synthetic writer: its files and shapes at tiny sizes, seeded bytes, and the size estimate it refuses by."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gssf_cli.core.stage_configs import PrepareConfig
from gssf_cli.data.synthetic import CAPTION_BYTES, CONCEPTS_PER_IMAGE, needed_bytes, write_synthetic
from gssf_cli.data.text import Vocabulary

TINY = {
    "dataset": "synthetic", "train_images": 6, "dev_images": 3, "test_images": 2, "regions": 5, "region_dim": 4,
    "concepts": 4, "vocab_size": 16, "captions_per_image": 2,
}  # fmt: skip


def _write(folder: Path, seed: int = 0) -> dict:
    folder.mkdir()
    return write_synthetic(PrepareConfig(out=folder, seed=seed, **TINY), folder)


def test_the_writer_makes_every_split_at_the_sizes_asked(tmp_path: Path) -> None:
    fields = _write(tmp_path / "d")
    names = {p.name for p in (tmp_path / "d").iterdir()}
    assert names == {f"{s}_{x}" for s in ("train", "dev", "test") for x in ("ims.npy", "caps.txt")} | {"vocab.json"}
    for split, n in {"train": 6, "dev": 3, "test": 2}.items():
        ims = np.load(tmp_path / "d" / f"{split}_ims.npy")
        assert ims.shape == (n, 5, 4) and ims.dtype == np.float32 and (ims >= 0).all()
        captions = (tmp_path / "d" / f"{split}_caps.txt").read_text().splitlines()
        assert len(captions) == 2 * n and all(captions)
        assert fields["splits"][split] == {"images": n, "captions": 2 * n}
    assert fields["task"] == "cross_modal" and fields["captions_per_image"] == 2
    assert fields["modalities"]["image"] == {"type": "regions", "shape": [5, 4], "dtype": "float32"}
    vocab = Vocabulary.load(tmp_path / "d" / "vocab.json")
    assert fields["modalities"]["text"]["vocab_size"] == len(vocab)
    train_words = {w for line in (tmp_path / "d" / "train_caps.txt").read_text().split("\n") for w in line.split()}
    assert set(vocab.words[4:]) == train_words


def test_one_seed_gives_the_same_bytes(tmp_path: Path) -> None:
    _write(tmp_path / "a", seed=3)
    _write(tmp_path / "b", seed=3)
    _write(tmp_path / "c", seed=4)

    def read(folder: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}

    assert read(tmp_path / "a") == read(tmp_path / "b")
    assert read(tmp_path / "a")["train_ims.npy"] != read(tmp_path / "c")["train_ims.npy"]


def test_fewer_regions_than_concepts_still_writes(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    folder.mkdir()
    write_synthetic(PrepareConfig(out=folder, **{**TINY, "regions": CONCEPTS_PER_IMAGE - 1}), folder)
    assert np.load(folder / "dev_ims.npy").shape == (3, CONCEPTS_PER_IMAGE - 1, 4)


def test_the_size_estimate_grows_with_the_data() -> None:
    config = PrepareConfig(out=Path("d"), **TINY)
    memory, disk = needed_bytes(config)
    values = (6 + 3 + 2) * 5 * 4
    assert disk == values * 4 + (6 + 3 + 2) * 2 * CAPTION_BYTES
    bigger = PrepareConfig(out=Path("d"), **{**TINY, "train_images": 600})
    assert needed_bytes(bigger)[0] > memory and needed_bytes(bigger)[1] > disk
