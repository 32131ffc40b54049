"""``gssf evaluate --embeddings``: the documented JSON keys, MLflow logging, and one-line errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from typer.testing import Result

from gssf_cli.tracking.adapter import Tracker

Gssf = Callable[..., Result]
CROSS_MODAL_KEYS = {
    "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum",
    "i2t_medr", "t2i_medr", "i2t_meanr", "t2i_meanr", "i2t_map",
}  # fmt: skip
LABEL_KEYS = {"r_at_1", "r_at_5", "r_at_10", "map_at_r", "precision_at_1", "r_precision"}


def _pairs(n: int = 30, k: int = 5, noise: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n, 8))
    texts = np.repeat(images, k, axis=0) + noise * rng.normal(size=(n * k, 8))
    return images.astype(np.float32), texts.astype(np.float32)


def _run(gssf: Gssf, *args: str) -> dict:
    result = gssf("evaluate", *args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_cross_modal_json_keys_and_values(gssf: Gssf, workdir: Path) -> None:
    images, texts = _pairs()
    np.savez(workdir / "e.npz", images=images, texts=texts)
    out = _run(gssf, "--embeddings", "e.npz")
    assert set(out) >= CROSS_MODAL_KEYS
    assert out["protocol"] == "all" and out["sizes"]["captions_per_image"] == 5
    six = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    assert out["rsum"] == pytest.approx(six)
    assert out["i2t_r1"] == 100.0


def test_perfect_and_reversed_embeddings(gssf: Gssf, workdir: Path) -> None:
    """Texts equal to their image score R@1 = 100; a metric that ranks every pair equally scores 0."""
    images, _ = _pairs(n=10, k=1)
    np.savez(workdir / "same.npz", images=images, texts=images)
    assert _run(gssf, "--embeddings", "same.npz")["t2i_r1"] == 100.0
    ones = np.ones((10, 4), dtype=np.float32)
    np.savez(workdir / "flat.npz", images=ones, texts=ones)
    flat = _run(gssf, "--embeddings", "flat.npz")
    assert flat["i2t_r1"] == 0.0 and flat["i2t_r10"] == 100.0


def test_split_prefixed_keys(gssf: Gssf, workdir: Path) -> None:
    images, texts = _pairs(n=12)
    np.savez(workdir / "s.npz", test_images=images, test_texts=texts, dev_images=images[:5], dev_texts=texts[:25])
    assert _run(gssf, "--embeddings", "s.npz")["sizes"]["images"] == 12
    assert _run(gssf, "--embeddings", "s.npz", "--split", "dev")["sizes"]["images"] == 5


def test_label_based_self_and_two_sets(gssf: Gssf, workdir: Path) -> None:
    rng = np.random.default_rng(1)
    labels = np.arange(60) % 6
    feats = np.eye(6, 8)[labels] + 0.3 * rng.normal(size=(60, 8))
    np.savez(workdir / "self.npz", features=feats, labels=labels)
    out = _run(gssf, "--embeddings", "self.npz", "--k", "1,2")
    assert {"r_at_1", "r_at_2", "map_at_r", "precision_at_1", "r_precision"} <= set(out) and "map" not in out
    full = _run(gssf, "--embeddings", "self.npz", "--k", "1,2", "--full-map")
    assert 0.0 < full["map"] <= 1.0 and full["map_at_r"] == pytest.approx(out["map_at_r"])
    np.savez(
        workdir / "two.npz",
        queries=feats[:20],
        query_labels=labels[:20],
        gallery=feats[20:],
        gallery_labels=labels[20:],
    )
    two = _run(gssf, "--embeddings", "two.npz")
    assert set(two) >= LABEL_KEYS and two["sizes"] == {"queries": 20, "gallery": 40}


def test_evaluation_run_holds_metrics_and_plots(gssf: Gssf, workdir: Path) -> None:
    images, texts = _pairs()
    np.savez(workdir / "e.npz", images=images, texts=texts)
    out = _run(gssf, "--embeddings", "e.npz")
    client = Tracker().client
    run = client.get_run(out["run_id"])
    assert run.data.tags["gssf.stage"] == "evaluate"
    assert run.data.metrics["rsum"] == pytest.approx(out["rsum"])
    assert run.data.params["evaluate.protocol"] == "all"
    plots = {a.path for a in client.list_artifacts(out["run_id"], "plots")}
    assert plots == {"plots/score_distributions.png", "plots/recall_at_k.png"}


def _write(workdir: Path, **arrays: np.ndarray) -> str:
    np.savez(workdir / "bad.npz", **arrays)
    return "bad.npz"


BAD = {
    "dims differ": (lambda: {"images": np.ones((4, 3)), "texts": np.ones((20, 5))}, "different embedding dims: 3 vs 5"),
    "caption count": (lambda: {"images": np.ones((4, 3)), "texts": np.ones((18, 3))}, "18 texts for 4 images"),
    "nan": (lambda: {"images": np.full((4, 3), np.nan), "texts": np.ones((20, 3))}, "images: contains NaN or Inf"),
    "missing labels": (lambda: {"features": np.ones((4, 3))}, "labels missing"),
    "labels length": (lambda: {"features": np.eye(4, 3) + 1, "labels": np.arange(3)}, "label"),
    "unknown keys": (lambda: {"vectors": np.ones((4, 3))}, "found keys ['vectors']"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_embeddings_exit_2(gssf: Gssf, workdir: Path, case: str) -> None:
    make, expected = BAD[case]
    result = gssf("evaluate", "--embeddings", _write(workdir, **make()))
    assert result.exit_code == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gssf: error: ") and expected in lines[0], lines


def test_protocol_that_does_not_fit(gssf: Gssf, workdir: Path) -> None:
    images, texts = _pairs(n=20)
    np.savez(workdir / "e.npz", images=images, texts=texts)
    result = gssf("evaluate", "--embeddings", "e.npz", "--protocol", "coco-1k")
    assert result.exit_code == 2
    assert "protocol coco-1k needs 5,000 images, got 20" in result.stderr


def test_missing_file_and_bad_k(gssf: Gssf, workdir: Path) -> None:
    assert "embeddings file nope.npz not found" in gssf("evaluate", "--embeddings", "nope.npz").stderr
    result = gssf("evaluate", "--embeddings", "nope.npz", "--k", "1,x")
    assert result.exit_code == 2 and "--k: expected comma-separated integers" in result.stderr
