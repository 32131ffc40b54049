"""Imbalance on demand: the exact shares asked, only where asked, recorded in the manifest and the cache key."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gssf_cli.core.errors import UserInputError
from gssf_cli.core.stage_configs import PrepareConfig
from gssf_cli.data import imbalance
from gssf_cli.data.imbalance import FUNCTION_WORDS, clutter_regions, drop_content_words, noisy_regions, replace_words
from gssf_cli.data.synthetic import grammar
from gssf_cli.data.text import tokenize
from gssf_cli.stages import prepare

SMALL = {"train_images": 40, "dev_images": 10, "test_images": 10, "regions": 5, "region_dim": 8, "concepts": 8,
         "vocab_size": 40}  # fmt: skip
WORDS = st.lists(st.lists(st.sampled_from(["red", "box", "the", "a", "blue", "ring", "beside"]), min_size=1,
                          max_size=8), min_size=1, max_size=20)  # fmt: skip


def test_function_words_are_every_synthetic_filler_and_no_concept_word() -> None:
    language = grammar(32, 400)
    assert language.filler_words() <= FUNCTION_WORDS
    assert not set(language.concept_words()) & FUNCTION_WORDS


@settings(max_examples=60, deadline=None)
@given(captions=WORDS, share=st.floats(0, 0.999), seed=st.integers(0, 99))
def test_insufficiency_drops_the_exact_share_and_keeps_a_content_word(
    captions: list[list[str]], share: float, seed: int
) -> None:
    content = lambda word: word not in FUNCTION_WORDS  # noqa: E731
    out, dropped, total = drop_content_words(captions, share, np.random.default_rng(seed), content)
    assert total == sum(content(w) for words in captions for w in words)
    has_content = sum(any(content(w) for w in words) for words in captions)
    assert dropped == min(round(share * total), total - has_content)
    assert sum(content(w) for words in out for w in words) == total - dropped
    for before, after in zip(captions, out, strict=True):
        assert [w for w in before if not content(w)] == [w for w in after if not content(w)]  # fillers untouched
        assert any(content(w) for w in after) == any(content(w) for w in before)


@settings(max_examples=60, deadline=None)
@given(captions=WORDS, share=st.floats(0, 0.999), seed=st.integers(0, 99))
def test_noise_replaces_the_exact_share_of_words_by_other_vocabulary_words(
    captions: list[list[str]], share: float, seed: int
) -> None:
    vocabulary = ["red", "blue", "box", "ring", "the", "zebra"]
    out, replaced, total = replace_words(captions, share, np.random.default_rng(seed), vocabulary)
    assert total == sum(map(len, captions)) and replaced == round(share * total)
    changed = sum(
        a != b for before, after in zip(captions, out, strict=True) for a, b in zip(before, after, strict=True)
    )
    assert changed == replaced and {w for words in out for w in words} <= set(vocabulary) | {
        w for c in captions for w in c
    }


def test_region_noise_is_relative_to_each_region() -> None:
    rng = np.random.default_rng(0)
    regions = np.concatenate([np.full((1, 400, 64), 100.0), np.full((1, 400, 64), 0.01)]).astype(np.float32)
    noisy = noisy_regions(regions, 0.5, rng)
    assert noisy.dtype == np.float32
    for image, rms in ((0, 100.0), (1, 0.01)):
        assert np.std(noisy[image] - regions[image]) == pytest.approx(0.5 * rms, rel=0.02)


def test_clutter_replaces_the_exact_share_of_concept_regions_with_clutter_of_the_split() -> None:
    rng = np.random.default_rng(0)
    regions = rng.normal(size=(50, 6, 4)).astype(np.float32)
    concepts = np.where(rng.random((50, 6)) < 0.5, rng.integers(0, 8, (50, 6)), -1).astype(np.int16)
    out, labels, replaced, shown = clutter_regions(regions, concepts, 0.4, rng)
    assert shown == (concepts >= 0).sum() and replaced == round(0.4 * shown)
    assert (labels >= 0).sum() == shown - replaced and (concepts < 0).sum() + replaced == (labels < 0).sum()
    moved = np.argwhere((concepts >= 0) & (labels < 0))
    clutter = {tuple(v) for v in regions[concepts < 0].tolist()}
    assert all(tuple(out[i, r].tolist()) in clutter for i, r in moved)
    untouched = labels == concepts
    assert np.array_equal(out[untouched], regions[untouched])


def _prepare(folder: Path, **values: object) -> dict:
    config = PrepareConfig(dataset="synthetic", out=folder, **{**SMALL, **values})  # type: ignore[arg-type]
    prepare.run(config)
    return json.loads((folder / "manifest.json").read_text())


def test_synthetic_imbalance_changes_only_the_named_splits_and_records_what_it_reached(tmp_path: Path) -> None:
    clean = _prepare(tmp_path / "clean")
    noisy = _prepare(tmp_path / "noisy", caption_noise=0.25, caption_insufficiency=0.2, region_insufficiency=0.5)
    record = noisy["imbalance"]
    assert (record["caption_noise"], record["splits"], list(record["reached"])) == (0.25, ["train"], ["train"])
    reached = record["reached"]["train"]
    assert reached["caption_words_replaced"] == round(0.25 * reached["caption_words"])
    assert reached["concept_regions_replaced"] == round(0.5 * reached["concept_regions"]) == 60
    for name in ("dev_caps.txt", "test_caps.txt", "dev_ims.npy", "test_ims.npy", "train_concepts.npy"):
        assert noisy["files"][name] == clean["files"][name], name
    assert noisy["files"]["train_caps.txt"] != clean["files"]["train_caps.txt"]
    shows = np.load(tmp_path / "noisy/train_region_concepts.npy")
    assert (shows >= 0).sum() == 60  # 40 images x 3 concept regions, half replaced
    assert noisy["settings"]["caption_noise"] == 0.25  # the settings, hence the pipeline's cache key, hold it


def test_an_existing_dataset_made_imbalanced_is_a_new_folder_derived_from_it(tmp_path: Path) -> None:
    _prepare(tmp_path / "clean")
    config = PrepareConfig(dataset="imbalance", source=tmp_path / "clean", out=tmp_path / "dev-noisy",
                           caption_noise=0.5, imbalance_splits=("dev",))  # fmt: skip
    result = prepare.run(config)
    manifest = json.loads((tmp_path / "dev-noisy/manifest.json").read_text())
    clean = json.loads((tmp_path / "clean/manifest.json").read_text())
    assert result.kind == "imbalance" and manifest["derived_from"]["kind"] == "synthetic"
    assert manifest["files"]["train_caps.txt"] == clean["files"]["train_caps.txt"]
    lines = (tmp_path / "dev-noisy/dev_caps.txt").read_text().splitlines()
    original = (tmp_path / "clean/dev_caps.txt").read_text().splitlines()
    replaced = sum(a != b for x, y in zip(lines, original, strict=True)
                   for a, b in zip(x.split(), tokenize(y), strict=True))  # fmt: skip
    assert replaced == manifest["imbalance"]["reached"]["dev"]["caption_words_replaced"]
    assert manifest["modalities"] == clean["modalities"] and manifest["splits"] == clean["splits"]


def test_check_refuses_what_a_dataset_cannot_take(tmp_path: Path) -> None:
    labels = {"task": "labels", "modalities": {"features": {}}, "splits": {"train": {}}}
    with pytest.raises(UserInputError, match="image–caption datasets"):
        imbalance.check(labels, imbalance.Imbalance(caption_noise=0.1), tmp_path, "d")
    captions = {"task": "cross_modal", "splits": {"train": {}},
                "modalities": {"image": {"type": "global"}, "text": {"type": "captions"}}}  # fmt: skip
    with pytest.raises(UserInputError, match="no 'test' split"):
        imbalance.check(captions, imbalance.Imbalance(caption_noise=0.1, splits=("test",)), tmp_path, "d")
    with pytest.raises(UserInputError, match="region imbalance needs region features"):
        imbalance.check(captions, imbalance.Imbalance(region_noise=0.1), tmp_path, "d")
