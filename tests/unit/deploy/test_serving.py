"""The served-model contract (:mod:`gssf_cli.deploy.serving`) and the PyTorch model behind it (:class:`TrainedModel`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from gssf_cli.core.errors import UserInputError
from gssf_cli.data.dataset import Dataset
from gssf_cli.deploy.serving import predict
from gssf_cli.modeling import checkpoint as ckpt
from gssf_cli.modeling.model import embed_split
from gssf_cli.stages.runs import TrainedModel, pack_model
from gssf_cli.training.loop import fit
from tests.conftest import tiny_train_config


class Lengths:
    """A retriever whose embeddings are known: an image is its row sum, a caption its length."""

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        return images.reshape(len(images), -1).sum(axis=1, keepdims=True)

    def encode_texts(self, texts: Sequence[str] | np.ndarray) -> np.ndarray:
        return np.array([[float(len(t))] for t in texts])

    def scores(self, image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> np.ndarray:
        return image_embeddings @ text_embeddings.T


def test_predict_returns_what_was_given_and_scores_when_both_sides_are() -> None:
    images = np.ones((2, 3, 4), np.float32)
    both = predict(Lengths(), {"images": images, "texts": ["ab", "abcd", "x"]})
    assert set(both) == {"image_embeddings", "text_embeddings", "scores"}
    np.testing.assert_array_equal(both["scores"], [[24, 48, 12], [24, 48, 12]])
    assert set(predict(Lengths(), {"texts": "abc"})) == {"text_embeddings"}
    assert set(predict(Lengths(), {"images": images})) == {"image_embeddings"}


def test_a_served_dataframe_is_read_like_the_dict_it_came_from() -> None:
    """MLflow's scoring server turns ``{"texts": [...]}`` into a one-row DataFrame; a column of captions works too."""
    one_row = predict(Lengths(), pd.DataFrame({"texts": [["ab", "abcd"]]}))
    per_row = predict(Lengths(), pd.DataFrame({"texts": ["ab", "abcd"]}))
    np.testing.assert_array_equal(one_row["text_embeddings"], per_row["text_embeddings"])
    np.testing.assert_array_equal(per_row["text_embeddings"], [[2.0], [4.0]])


@pytest.mark.parametrize(
    ("model_input", "message"),
    [({}, "at least one"), ({"captions": ["a"]}, "unknown input keys"), ([1, 2], "expected a mapping")],
)
def test_bad_input_is_one_readable_error(model_input: object, message: str) -> None:
    with pytest.raises(UserInputError, match=message):
        predict(Lengths(), model_input)


def test_a_packed_model_serves_what_the_trained_one_computes(tiny_syn: Path, tmp_path: Path) -> None:
    """Only safetensors and JSON travel; the rebuilt model embeds and scores exactly like the trained one."""
    dataset = Dataset(tiny_syn)
    config = tiny_train_config(tiny_syn, epochs=1)
    result = fit(config, dataset, tmp_path / "run")
    folder = pack_model(tmp_path / "run" / ckpt.BEST, dataset, tmp_path / "served")
    assert sorted(p.name for p in folder.iterdir()) == [
        "manifest.json",
        "model.safetensors",
        "state.json",
        "vocab.json",
    ]
    served = TrainedModel.load(folder)
    split = dataset.split("test")
    captions = (tiny_syn / "test_caps.txt").read_text().splitlines()
    out = predict(served, {"images": split.image_batch(np.arange(split.num_images)).numpy(), "texts": captions})

    from gssf_cli.modeling.model import build_model, load_weights

    model = build_model(dataset, config)
    load_weights(model, ckpt.load(result.out_dir / ckpt.BEST).model)
    images, texts = embed_split(model, split, torch.device("cpu"))
    np.testing.assert_allclose(out["image_embeddings"], images.numpy(), atol=1e-6)
    np.testing.assert_allclose(out["text_embeddings"], texts.numpy(), atol=1e-6)
    np.testing.assert_allclose(out["scores"], model.scores(images, texts).detach().numpy(), atol=1e-5)


def test_a_head_over_frozen_caption_towers_serves_from_its_own_checkpoint(tiny_syn: Path, tmp_path: Path) -> None:
    """A head-only run over a trained run's frozen region and caption towers: it trains on embeddings computed
    once per split, and its packed model (which holds the towers) serves raw regions and captions."""
    from dataclasses import replace

    from gssf_cli.modeling.model import build_model, load_weights

    dataset = Dataset(tiny_syn)
    fit(tiny_train_config(tiny_syn, epochs=1, batch_size=64, runs_dir=tmp_path), dataset, tmp_path / "towers")
    config = tiny_train_config(
        tiny_syn, epochs=1, runs_dir=tmp_path, encoder="frozen", encoder_run="towers", adapter=True
    )
    result = fit(config, dataset, tmp_path / "head")
    served = TrainedModel.load(pack_model(tmp_path / "head" / ckpt.BEST, dataset, tmp_path / "served"))
    split = dataset.split("test")
    captions = (tiny_syn / "test_caps.txt").read_text().splitlines()
    out = predict(served, {"images": split.image_batch(np.arange(split.num_images)).numpy(), "texts": captions})

    resolved = replace(config, mlp_layers=1)  # what the run's checkpoint says (the towers of a region dataset)
    model = build_model(dataset, resolved)
    load_weights(model, ckpt.load(result.out_dir / ckpt.BEST).model)
    images, texts = embed_split(model, split, torch.device("cpu"))
    np.testing.assert_allclose(out["image_embeddings"], images.numpy(), atol=1e-6)
    np.testing.assert_allclose(out["text_embeddings"], texts.numpy(), atol=1e-6)
    np.testing.assert_allclose(out["scores"], model.scores(images, texts).detach().numpy(), atol=1e-5)
    towers = ckpt.load(tmp_path / "towers" / ckpt.BEST).model
    head = ckpt.load(result.out_dir / ckpt.BEST).model
    assert all(torch.equal(head[k.replace(".image.", ".image.tower.").replace(".text.", ".text.tower.")], v)
               for k, v in towers.items() if k.startswith("encoder."))  # fmt: skip
