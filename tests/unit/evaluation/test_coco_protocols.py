"""ECCV Caption and CxC through ``eccv_caption``: gssf's COCO 1K/5K R@K equal the package's on the 5,000 COCO test
images it ships (the proof that rows, ids and folds line up), the package's metrics reach their ceilings when the
scores are its own ground truth, the rankings it is fed are exact, and its licence is what the docs say."""

from __future__ import annotations

import warnings
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from gssf_cli.core import limits
from gssf_cli.core import metrics as registry
from gssf_cli.core.errors import UserInputError
from gssf_cli.evaluation import coco_protocols, crossmodal
from gssf_cli.evaluation.coco_protocols import CocoIds, package_metrics, top_rankings
from gssf_cli.evaluation.ranking import RetrievalInputError

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the package warns that its optional ujson and tqdm are missing
    import eccv_caption

KS = (1, 5, 10)


@pytest.fixture(scope="module")
def package() -> Any:
    return eccv_caption.Metrics()


@pytest.fixture(scope="module")
def ids(package: Any) -> CocoIds:
    """The package's test split in its own order: caption ids as shipped, each image's id from its captions."""
    captions = np.asarray(package.coco_ids, dtype=np.int64)
    images = np.array([package.coco_gts["t2i"][int(c)][0] for c in captions[::5]], dtype=np.int64)
    return CocoIds(images, captions)


def _exact_random_embeddings(seed: int, dim: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Random 5,000 images and 25,000 captions (each an image plus noise, so that recalls are far from 0 and 100),
    with integer entries small enough (|score| < 2^22) that every score is exact in float32 whatever the summation
    order: gssf's ranking, the rankings fed to the package and the tie check below all see the same numbers. Integer
    scores do tie; the proof test's seed is the first (of 0-5) whose top-10 lists have no tie next to a positive, which
    its precondition checks."""
    rng = np.random.default_rng(seed)
    images = rng.integers(-512, 513, size=(5000, dim))
    texts = np.repeat(images, 5, axis=0) + rng.integers(-256, 257, size=(25000, dim))
    return images.astype(np.float32), texts.astype(np.float32)


def _retrieved(ids: CocoIds, i2t: np.ndarray, t2i: np.ndarray, offset: int = 0) -> dict[str, dict[int, list[int]]]:
    """The package's input from rankings of rows (``offset``: the first image row of a fold)."""
    images, captions = ids.images[offset:], ids.captions[5 * offset :]
    n, m = len(i2t), len(t2i)
    return {
        "i2t": dict(zip(images[:n].tolist(), captions[i2t].tolist(), strict=True)),
        "t2i": dict(zip(captions[:m].tolist(), images[t2i].tolist(), strict=True)),
    }


def _no_tie_moves_a_positive(images: np.ndarray, texts: np.ndarray, i2t: np.ndarray, t2i: np.ndarray) -> bool:
    """Whether no positive among a query's 10 best items ties with the item after it (exact scores, in int64): then
    R@1/5/10 do not depend on how ties are broken (gssf counts them against the query; the lists fed to the package
    break them by row). A positive tied with an item beyond the list would tie with the item after it too."""
    a, b = images.astype(np.int64), texts.astype(np.int64)
    queries = np.arange(len(i2t))[:, None]
    for scores, positive in (
        (np.einsum("nd,nkd->nk", a, b[i2t]), i2t // 5 == queries),
        (np.einsum("md,mkd->mk", b, a[t2i]), t2i == np.arange(len(t2i))[:, None] // 5),
    ):
        tied = scores[:, :10] == scores[:, 1:11]
        if (tied & (positive[:, :10] | positive[:, 1:11])).any():
            return False
    return True


def test_gssf_coco_1k_and_5k_recalls_equal_the_package(package: Any, ids: CocoIds) -> None:
    """The proof test: random embeddings over the package's 5,000 COCO test images, in its order. gssf's ``coco-5k``
    and ``coco-1k`` R@K (its chunked counting engine) equal the package's COCO 5K and 1K R@K (Python lists) fed the
    same ranking: for 5K, each query's 11 best items of the whole split; for 1K, of its own fold of 1,000 images and
    their 5,000 captions — which is what the package keeps of a whole-split ranking (it drops the other folds'
    items), so its filter leaves these lists as they are."""
    images, texts = _exact_random_embeddings(seed=5)
    five = crossmodal.evaluate_cross_modal(images, texts, captions_per_image=5, protocol="coco-5k", ks=KS)
    one = crossmodal.evaluate_cross_modal(images, texts, captions_per_image=5, protocol="coco-1k", ks=KS)

    i2t, t2i = top_rankings(images, texts, depths=(11, 11))
    assert _no_tie_moves_a_positive(images, texts, i2t, t2i)
    whole = _retrieved(ids, i2t, t2i)
    folds: dict[str, dict[int, list[int]]] = {"i2t": {}, "t2i": {}}
    for start in range(0, 5000, 1000):
        fold_images, fold_texts = images[start : start + 1000], texts[5 * start : 5 * start + 5000]
        fold_i2t, fold_t2i = top_rankings(fold_images, fold_texts, depths=(11, 11))
        assert _no_tie_moves_a_positive(fold_images, fold_texts, fold_i2t, fold_t2i)
        for direction, part in _retrieved(ids, fold_i2t, fold_t2i, offset=start).items():
            folds[direction].update(part)

    for k in KS:
        package_5k = package.coco_5k_recalls(whole, "all", K=k)
        package_1k = package.coco_1k_recalls(folds, "all", K=k)
        for direction, queries in (("i2t", 1000), ("t2i", 5000)):
            assert five[f"{direction}_r{k}"] == 100.0 * package_5k[direction]  # to the last bit
            # coco-1k: gssf averages the folds' percentages, the package averages fractions and we scale: the same
            # hits, equal to rounding; the hit counts themselves are equal exactly.
            assert one[f"{direction}_r{k}"] == pytest.approx(100.0 * package_1k[direction], rel=0, abs=1e-12)
            gssf_hits = sum(round(fold[f"{direction}_r{k}"] * queries / 100.0) for fold in one["folds"])
            assert gssf_hits == round(package_1k[direction] * 5 * queries)
    assert five["t2i_r1"] > 5.0 and one["i2t_r10"] < 95.0  # far from the trivial 0 and 100


def _oracle(ids: CocoIds, truth: dict[int, list[int]], direction: str) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Rows and a score function that gives 1 to each pair of one direction's ground truth (``i2t``: image → its
    positive captions; ``t2i``: caption → its positive images) and 0 to any other, keyed by the rows' COCO ids: if
    rows and ids line up, every metric of that direction is at its ceiling."""
    caption_row = {int(c): j for j, c in enumerate(ids.captions)}
    image_row = {int(i): r for r, i in enumerate(ids.images)}
    positive = torch.zeros(len(ids.images), len(ids.captions), dtype=torch.bool)
    for query, items in truth.items():
        if direction == "i2t":
            positive[image_row[query], [caption_row[c] for c in items if c in caption_row]] = True
        else:
            positive[[image_row[i] for i in items], caption_row[query]] = True

    def score_fn(image_rows: torch.Tensor, text_rows: torch.Tensor) -> torch.Tensor:
        i, t = image_rows[:, 0].long(), text_rows[:, 0].long()
        n, m = positive.shape  # jitter below 0.5, distinct along a row and a column, in no order (7919 is prime)
        jitter = (i[:, None] * 7919 % n) / (4.0 * n) + (t[None, :] * 7919 % m) / (4.0 * m)
        return positive[i][:, t].float() + jitter

    rows = torch.arange(len(ids.images), dtype=torch.float32).unsqueeze(1)
    return rows, torch.arange(len(ids.captions), dtype=torch.float32).unsqueeze(1), score_fn


def _at_ceiling(protocol: str, ids: CocoIds, truth: dict[str, dict[int, list[int]]], **kwargs: Any) -> dict[str, float]:
    """Each direction's metrics with that direction's oracle scores."""
    out: dict[str, float] = {}
    for direction in ("i2t", "t2i"):
        images, texts, score_fn = _oracle(ids, truth[direction], direction)
        got = package_metrics(protocol, ids, images, texts, score_fn=score_fn, **kwargs)
        out.update({k: v for k, v in got.items() if f"_{direction}_" in k})
    return out


def test_eccv_metrics_reach_their_ceiling_on_their_own_ground_truth(package: Any, ids: CocoIds) -> None:
    got = _at_ceiling("eccv", ids, package.eccv_gts)
    assert set(got) == {f"eccv_{d}_{m}" for d in ("i2t", "t2i") for m in ("r1", "rprecision", "map_at_r")}
    assert got["eccv_i2t_r1"] == got["eccv_t2i_r1"] == 100.0
    assert got["eccv_t2i_rprecision"] == got["eccv_t2i_map_at_r"] == 100.0
    # Two image queries each have one positive caption outside the test split (the package's data), which no
    # ranking retrieves: their R-precision is (R - 1) / R, their mAP@R below it.
    caption_set = set(ids.captions.tolist())
    found = [sum(c in caption_set for c in v) / len(v) for v in package.eccv_gts["i2t"].values()]
    assert sum(f < 1 for f in found) == 2
    assert got["eccv_i2t_rprecision"] == pytest.approx(100.0 * np.mean(found), abs=1e-9)
    assert 99.8 < got["eccv_i2t_map_at_r"] < 100.0


def test_cxc_recalls_reach_100_on_their_own_ground_truth(package: Any, ids: CocoIds) -> None:
    got = _at_ceiling("cxc", ids, package.cxc_gts, ks=(1, 5))
    assert got == {"cxc_i2t_r1": 100.0, "cxc_i2t_r5": 100.0, "cxc_t2i_r1": 100.0, "cxc_t2i_r5": 100.0}


def test_shuffled_rows_keep_the_metrics(package: Any, ids: CocoIds) -> None:
    """Any order of the images works (captions follow their image): the metrics are those of the package's order."""
    images, texts = _exact_random_embeddings(seed=1, dim=4)
    order = np.random.default_rng(2).permutation(5000)
    caption_order = (5 * order[:, None] + np.arange(5)).reshape(-1)
    shuffled = CocoIds(ids.images[order], ids.captions[caption_order])
    a = package_metrics("eccv", ids, images, texts)
    b = package_metrics("eccv", shuffled, images[order], texts[caption_order])
    assert a == pytest.approx(b, abs=1e-12)


def test_top_rankings_are_exact_with_ties_broken_by_row() -> None:
    """Against a full sort by (score descending, row), on small integer scores full of ties, over many row blocks."""
    rng = np.random.default_rng(3)
    for trial in range(20):
        n, m = int(rng.integers(1, 25)), int(rng.integers(1, 50))
        images = rng.integers(-2, 3, size=(n, 3)).astype(np.float32)
        texts = rng.integers(-2, 3, size=(m, 3)).astype(np.float32)
        depths = (int(rng.integers(1, 60)), int(rng.integers(1, 30)))
        i2t, t2i = top_rankings(images, texts, depths=depths, memory_budget_bytes=int(rng.integers(4, 2000)))
        s = images @ texts.T
        expected_i2t = [np.lexsort((np.arange(m), -s[i]))[: depths[0]] for i in range(n)]
        expected_t2i = [np.lexsort((np.arange(n), -s[:, j]))[: depths[1]] for j in range(m)]
        assert np.array_equal(i2t, np.stack(expected_i2t)), trial
        assert np.array_equal(t2i, np.stack(expected_t2i)), trial


def test_the_protocols_are_listed_and_their_metrics_registered() -> None:
    assert set(limits.PROTOCOLS) == set(crossmodal.RANKING_PROTOCOLS) | set(coco_protocols.PROTOCOLS)
    names = [f"eccv_{d}_{m}" for d in ("i2t", "t2i") for m in ("r1", "rprecision", "map_at_r")]
    names += [f"cxc_{d}_r{k}" for d in ("i2t", "t2i") for k in KS]
    for name in names:
        metric = registry.get(name)
        assert metric.higher_is_better and metric.unit == "%" and metric.best_possible == 100.0
        assert metric.task == "coco_test" and name not in registry.for_task("cross_modal")


@pytest.mark.parametrize("protocol", coco_protocols.PROTOCOLS)
def test_ranking_code_refuses_the_coco_id_protocols(protocol: str) -> None:
    with pytest.raises(RetrievalInputError, match=f"protocol {protocol} ranks COCO test images by their COCO ids"):
        crossmodal.protocol_folds(5000, protocol)


def test_the_package_is_pinned_and_its_licence_is_mit_with_its_notices() -> None:
    """What docs/commands.md records: eccv_caption 0.1.0, MIT (NAVER Corp.), whose NOTICE lists the subcomponents'
    licences (CxC's Apache-2.0 among them); no dependency of its own."""
    assert metadata.version("eccv_caption") == "0.1.0"
    pyproject = (Path(__file__).parents[3] / "pyproject.toml").read_text()
    assert '"eccv_caption==0.1.0"' in pyproject
    dist = metadata.distribution("eccv_caption")
    assert not dist.requires
    assert "License :: OSI Approved :: MIT License" in (dist.metadata.get_all("Classifier") or [])
    licence = dist.read_text("LICENSE") or ""
    notice = dist.read_text("NOTICE") or ""
    assert "Copyright (c) 2022-present NAVER Corp." in licence and "Permission is hereby granted" in licence
    for subcomponent in ("google-research-datasets/Crisscrossed-Captions", "naver-ai/pcme", "yalesong/pvse"):
        assert subcomponent in notice
    assert "Apache License, Version 2.0" in notice


def _dataset(folder: Path, ids: np.ndarray, k: int = 5, task: str = "cross_modal") -> Any:
    """What :func:`coco_protocols.split_ids` reads of a dataset: its folder, task and manifest (ids per image)."""
    folder.mkdir(exist_ok=True)
    (folder / "testall_ids.txt").write_text("".join(f"{i}\n" for i in ids))
    splits = {"testall": {"images": len(ids), "captions": k * len(ids)}}
    manifest = {"captions_per_image": k, "splits": splits, "files": {"testall_ids.txt": {}}}
    return SimpleNamespace(folder=folder, task=task, manifest=manifest)


def test_split_ids_map_rows_to_the_package_ids_in_any_image_order(tmp_path: Path, ids: CocoIds) -> None:
    order = np.random.default_rng(4).permutation(5000)
    got = coco_protocols.split_ids(_dataset(tmp_path, ids.images[order]), "testall", "eccv")
    assert np.array_equal(got.images, ids.images[order])
    assert np.array_equal(got.captions, ids.captions.reshape(5000, 5)[order].reshape(-1))


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("duplicate", r"testall_ids\.txt: image id 391895 names two images of the split"),
        ("k", r"\(testall split\): --protocol eccv needs COCO's 5 captions per image, this split has 1"),
        ("labels", r"--protocol eccv ranks COCO images against captions; this is labelled data"),
    ],
)
def test_split_ids_refusals(tmp_path: Path, ids: CocoIds, change: str, expected: str) -> None:
    images = ids.images.copy()
    if change == "duplicate":
        images[1] = images[0]
    dataset = _dataset(
        tmp_path, images, k=1 if change == "k" else 5, task="labels" if change == "labels" else "cross_modal"
    )
    with pytest.raises(UserInputError, match=expected):
        coco_protocols.split_ids(dataset, "testall", "eccv")
