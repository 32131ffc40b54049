"""The model built from a dataset's manifest and a train config: shapes, embeddings, weight loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gssf_cli.data.dataset import Dataset
from gssf_cli.errors import UserInputError
from gssf_cli.model import build_model, build_objective, embed_split, load_weights
from tests.conftest import tiny_train_config


def test_model_follows_config_and_manifest(tiny_syn: Path) -> None:
    dataset = Dataset(tiny_syn)
    config = tiny_train_config(tiny_syn)
    model = build_model(dataset, config)
    counts = model.parameter_counts()
    assert counts["metric_head"] == 16 + 16 * 4
    split = dataset.split("dev")
    images, texts = embed_split(model, split, torch.device("cpu"))
    assert images.shape == (split.num_images, 16) and texts.shape == (split.num_pairs, 16)
    assert torch.allclose(images.norm(dim=1), torch.ones(len(images)), atol=1e-5)
    assert model.scores(images, texts).shape == (split.num_images, split.num_pairs)
    assert build_objective(config).base.margin == config.margin


def test_weights_that_do_not_fit_are_one_line_errors(tiny_syn: Path) -> None:
    dataset = Dataset(tiny_syn)
    small = build_model(dataset, tiny_train_config(tiny_syn))
    other = build_model(dataset, tiny_train_config(tiny_syn, metric="cosine"))
    with pytest.raises(UserInputError, match="checkpoint does not fit the model"):
        load_weights(other, small.state_dict())
