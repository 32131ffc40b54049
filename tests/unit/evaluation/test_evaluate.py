"""Evaluation as a library: embeddings files and trained models in, results and figures out (no MLflow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gssf_cli.core.stage_configs import EvaluateConfig
from gssf_cli.data.dataset import Dataset
from gssf_cli.evaluation import evaluate as evaluation
from gssf_cli.evaluation import plots
from gssf_cli.evaluation.crossmodal import evaluate_cross_modal
from gssf_cli.evaluation.figures import figures as evaluation_figures
from gssf_cli.modeling.model import build_model
from tests.conftest import tiny_train_config


def test_file_and_model_evaluation_agree_on_the_same_embeddings(tiny_syn: Path, tmp_path: Path) -> None:
    dataset = Dataset(tiny_syn)
    torch.manual_seed(0)
    model = build_model(dataset, tiny_train_config(tiny_syn, metric="cosine"))
    trained = evaluation.evaluate_trained(model, dataset, EvaluateConfig(run="r", plots=False))
    images, texts = trained.arrays["images"], trained.arrays["texts"]
    np.savez(tmp_path / "emb.npz", images=images, texts=texts)
    from_file = evaluation.evaluate_file(EvaluateConfig(embeddings=tmp_path / "emb.npz", metric="dot"))
    intra = {k: v for k, v in trained.result.metrics.items() if k[:4] in ("i2i_", "t2t_")}
    assert sorted(intra) == sorted(f"{s}_{m}" for s in ("i2i", "t2t") for m in ("r1", "r5", "r10", "map_at_r"))
    assert trained.result.intra_modal == {"i2i": "shared latent concept", "t2t": "shared latent concept"}
    cross = {k: v for k, v in trained.result.metrics.items() if k not in intra}
    assert cross == pytest.approx(from_file.result.metrics)  # a file says nothing of relevance within a modality
    assert trained.result.sizes == {"images": 16, "texts": 80}
    assert from_file.result.sizes["captions_per_image"] == 5
    direct = evaluate_cross_modal(images, texts, captions_per_image=5)
    assert trained.result.metrics["rsum"] == pytest.approx(direct["rsum"])


def test_full_map_is_asked_for_and_leaves_the_other_label_metrics_unchanged(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "labels.npz", features=rng.normal(size=(60, 8)), labels=np.arange(60) % 5)
    top = evaluation.evaluate_file(EvaluateConfig(embeddings=tmp_path / "labels.npz", plots=False)).result.metrics
    full = evaluation.evaluate_file(
        EvaluateConfig(embeddings=tmp_path / "labels.npz", plots=False, full_map=True)
    ).result.metrics
    assert "map" not in top
    assert 0.0 < full.pop("map") <= 1.0
    assert full == pytest.approx(top, abs=1e-12)


def test_figures_for_both_tasks(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "labels.npz", features=rng.normal(size=(40, 8)), labels=np.arange(40) % 4)
    np.savez(tmp_path / "pairs.npz", images=rng.normal(size=(10, 8)), texts=rng.normal(size=(20, 8)))
    for name in ("labels", "pairs"):
        outcome = evaluation.evaluate_file(EvaluateConfig(embeddings=tmp_path / f"{name}.npz"))
        figures = evaluation_figures(outcome, memory_budget_mb=16)
        assert set(figures) == {"plots/score_distributions.png", "plots/recall_at_k.png"}
        for figure in figures.values():
            plots.close(figure)
