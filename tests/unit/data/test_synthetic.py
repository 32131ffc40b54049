"""The synthetic writer: its files and shapes at tiny sizes, seeded bytes, the size estimate it refuses by, and
its caption grammar (a distinct readable phrase per concept at any count, captions that name only their image's
concepts and parse back to them, a vocabulary within ``vocab_size``)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest

from gssf_cli.core.errors import UserInputError
from gssf_cli.core.stage_configs import PrepareConfig
from gssf_cli.data.synthetic import (
    ATTRIBUTES,
    CAPACITY,
    CONCEPTS_PER_IMAGE,
    DRAWS,
    NOUN,
    NUMBER,
    appearance,
    attribute_counts,
    caption_bytes,
    grammar,
    needed_bytes,
    write_synthetic,
)
from gssf_cli.data.text import Vocabulary, tokenize

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
    kinds = ("ims.npy", "caps.txt", "concepts.npy", "region_concepts.npy", "caption_concepts.npy")
    assert names == {f"{s}_{x}" for s in ("train", "dev", "test") for x in kinds} | {"vocab.json"}
    language = grammar(4, 16)
    for split, n in {"train": 6, "dev": 3, "test": 2}.items():
        ims = np.load(tmp_path / "d" / f"{split}_ims.npy")
        assert ims.shape == (n, 5, 4) and ims.dtype == np.float32 and (ims >= 0).all()
        concepts = np.load(tmp_path / "d" / f"{split}_concepts.npy")
        shows = np.load(tmp_path / "d" / f"{split}_region_concepts.npy")
        assert concepts.shape == (n, 3) and shows.shape == (n, 5) and shows.dtype == np.int16
        for image in range(n):  # each concept of an image on exactly one region, the rest clutter
            assert sorted(shows[image][shows[image] >= 0].tolist()) == sorted(concepts[image].tolist())
            assert (shows[image] == -1).sum() == 2
        captions_of = (tmp_path / "d" / f"{split}_caps.txt").read_text().splitlines()
        for image, caption in enumerate(captions_of):  # a caption names only its image's concepts
            assert set(language.parse(caption)) <= set(concepts[image // 2].tolist())
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
    assert disk == values * 4 + (6 + 3 + 2) * 2 * caption_bytes(4)
    bigger = PrepareConfig(out=Path("d"), **{**TINY, "train_images": 600})
    assert needed_bytes(bigger)[0] > memory and needed_bytes(bigger)[1] > disk


COUNTS = (3, 4, 5, 6, 12, 24, 25, 32, 144, 145, 576, 577, 2304, 2305, 5000)
"""Concept counts at every edge of the grammar: two attributes, a third, a fourth, numbers."""


@pytest.mark.parametrize("concepts", COUNTS)
def test_every_concept_has_its_own_readable_phrase(concepts: int) -> None:
    language = grammar(concepts, 10**6)
    phrases = [language.phrase(c) for c in range(concepts)]
    plain = [" ".join(slot[0] for slot in phrase) for phrase in phrases]
    assert len(set(plain)) == concepts, "two concepts read the same"
    lexicon = {word: (a, v) for a, values in enumerate(ATTRIBUTES) for v, value in enumerate(values) for word in value}
    for concept, phrase in enumerate(phrases):
        words = [slot[0] for slot in phrase]
        if language.numbered:
            assert words[-2] == NUMBER and words[-1].isdigit()
            words = words[:-2]
        assert all(word.isalpha() for word in words) and lexicon[words[-1]][0] == NOUN, plain[concept]
        assert [lexicon[word][0] for word in words] == [a for a in (2, 3, 0, 1) if a < len(words)], plain[concept]
        assert language.concept_of(dict(enumerate(language.values(concept)))) == concept
    assert language.numbered == (concepts > CAPACITY)


def test_few_concepts_read_as_a_colour_and_a_shape_and_share_few_words() -> None:
    quickstart = grammar(24, 200)
    assert quickstart.counts == (12, 12)
    assert [" ".join(s[0] for s in quickstart.phrase(c)) for c in (0, 1, 12)] == [
        "red square",
        "blue circle",
        "red circle",
    ]
    named_by: dict[str, set[int]] = {}
    for concept in range(24):
        for slot in quickstart.phrase(concept):
            for word in slot:
                named_by.setdefault(word, set()).add(concept)
    assert max(len(concepts) for concepts in named_by.values()) == 2, "each word names at most two concepts"
    assert attribute_counts(6) == (3, 3) and attribute_counts(145) == (12, 12, 4)


def test_words_are_single_tokens_and_no_filler_is_a_concept_word() -> None:
    language = grammar(5000, 10**6)
    words = [word for values in ATTRIBUTES for value in values for word in value]
    assert len(words) == len(set(words)), "a word names two values"
    fillers = language.filler_words()
    assert not fillers & set(language.concept_words())
    assert all(tokenize(word) == [word] for word in [*words, *fillers, NUMBER])


@pytest.mark.parametrize("concepts", [3, 24, 200, 3000])
def test_a_caption_names_two_or_more_of_its_images_concepts_and_parses_back_to_them(concepts: int) -> None:
    language = grammar(concepts, 10**6)
    rng = np.random.default_rng(concepts)
    named_counts = set()
    for _ in range(300):
        shown = rng.choice(concepts, CONCEPTS_PER_IMAGE, replace=False)
        caption = language.caption(shown, rng.random(DRAWS))
        named = language.parse(caption)
        assert 2 <= len(named) == len(set(named)) <= CONCEPTS_PER_IMAGE and set(named) <= set(shown), caption
        named_counts.add(len(named))
        words = caption.split()
        assert set(words) <= set(language.concept_words()) | language.filler_words(), caption
    assert named_counts == {2, 3}


def test_the_written_captions_of_an_image_name_only_its_concepts(tmp_path: Path) -> None:
    _write(tmp_path / "d")
    language = grammar(TINY["concepts"], TINY["vocab_size"])
    lines = (tmp_path / "d" / "train_caps.txt").read_text().splitlines()
    per_image = [lines[i : i + 2] for i in range(0, len(lines), 2)]
    for captions in per_image:
        named = [language.parse(caption) for caption in captions]
        assert all(len(n) >= 2 for n in named) and len(set().union(*named)) <= CONCEPTS_PER_IMAGE, captions
        assert all(re.fullmatch(r"[a-z]+( [a-z]+)*", caption) for caption in captions), captions


def test_vocab_size_caps_the_words_captions_use(tmp_path: Path) -> None:
    for vocab_size in (15, 20, 400):
        folder = tmp_path / str(vocab_size)
        folder.mkdir()
        write_synthetic(PrepareConfig(out=folder, **{**TINY, "vocab_size": vocab_size}), folder)
        words = {w for split in ("train", "dev", "test") for w in (folder / f"{split}_caps.txt").read_text().split()}
        assert len(words) <= vocab_size
    assert "beside" in words and "there" in words, "a roomy vocabulary holds the optional fillers"
    assert len(grammar(24, 10**6).filler_words()) == 39
    assert sorted(grammar(4, 15).filler_words()) == ["a", "an", "and"]


TOO_FEW = {
    "concepts": (2, 400, r"prepare\.concepts: an image shows 3 distinct concepts, so at least 3; got 2"),
    "words": (6, 20, r"prepare\.vocab_size: 6 concepts need at least 21 words: 18 for their phrases \(3 colours × 3 "),
    "numbered words": (
        3000,
        100,
        r"prepare\.vocab_size: 3000 concepts need at least 102 words: .* × 4 textures, 3 synonyms each; then "
        r"'number 1' to 'number 2'\) and a, an, and; got 100",
    ),
}


@pytest.mark.parametrize("case", sorted(TOO_FEW))
def test_too_few_concepts_or_words_are_refused_before_anything_is_written(tmp_path: Path, case: str) -> None:
    from gssf_cli.data.synthetic import check_size

    concepts, vocab_size, message = TOO_FEW[case]
    config = PrepareConfig(out=tmp_path / "d", **{**TINY, "concepts": concepts, "vocab_size": vocab_size})
    with pytest.raises(UserInputError, match=message):
        check_size(config, config.out)
    assert not config.out.exists()


def test_concepts_that_share_a_value_look_alike() -> None:
    language = grammar(24, 200)
    looks = appearance(language, np.random.default_rng(0), 4096)
    unit = looks / np.linalg.norm(looks, axis=1, keepdims=True)
    assert np.allclose(np.var(looks, axis=1), 1.0, atol=0.1)
    red_square, red_circle, blue_circle = (language.concept_of({0: colour, 1: shape}) for colour, shape in
                                           [(0, 0), (0, 1), (1, 1)])  # fmt: skip
    assert unit[red_square] @ unit[red_circle] == pytest.approx(0.5, abs=0.05)
    assert unit[red_square] @ unit[blue_circle] == pytest.approx(0.0, abs=0.05)


def test_the_prepare_help_states_the_grammar_it_describes() -> None:
    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(PrepareConfig)}
    assert f"72 for 24-{12 * 12} concepts" in helps["vocab_size"] and "39 at most" in helps["vocab_size"]
    assert len(grammar(24, 10**6).concept_words()) == len(grammar(144, 10**6).concept_words()) == 72
    assert [len(attribute_counts(n)) for n in (144, 145, 576, 577, CAPACITY, CAPACITY + 1)] == [2, 3, 3, 4, 4, 5]
    assert all(f"past {n:,}" in helps["concepts"] for n in (144, 576, CAPACITY))
    assert f"at least {CONCEPTS_PER_IMAGE}" in helps["concepts"]
