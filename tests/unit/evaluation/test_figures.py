"""gssf_cli.evaluation.figures: the score sample of a trained model on a split, as ``gssf compare --plots`` draws
it, checked against the model's own score matrix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gssf_cli.data.dataset import Dataset
from gssf_cli.evaluation.figures import trained_score_sample
from gssf_cli.modeling.model import build_model, embed_split
from tests.conftest import tiny_train_config


def test_a_trained_sample_holds_every_image_caption_pair_split_into_positives_and_negatives(tiny_syn: Path) -> None:
    dataset = Dataset(tiny_syn)
    torch.manual_seed(0)
    model = build_model(dataset, tiny_train_config(tiny_syn, metric="gssf", block_size=4))
    sample = trained_score_sample(model, dataset, "test", "train-gssf-d4 (1a2b3c4d)")
    split = dataset.split("test")
    with torch.no_grad():
        images, texts = embed_split(model, split, torch.device("cpu"))
        scores = model.similarity.scores(images, texts).numpy()
    own = np.arange(split.num_pairs) // split.k == np.arange(split.num_images)[:, None]
    assert sample.label == "train-gssf-d4 (1a2b3c4d)" and sample.score == "score (gssf-d4)"
    assert len(sample.positives) == split.num_pairs and len(sample.negatives) == own.size - split.num_pairs
    assert np.sort(sample.positives) == pytest.approx(np.sort(scores[own]), abs=1e-5)
    assert np.sort(sample.negatives) == pytest.approx(np.sort(scores[~own]), abs=1e-5)
    again = trained_score_sample(model, dataset, "test", "again")
    assert np.array_equal(again.negatives, sample.negatives), "the same pairs every time"
