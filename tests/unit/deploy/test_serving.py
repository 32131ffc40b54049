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
from gssf_cli.deploy.serving import Layout, io_schema, predict
from gssf_cli.modeling import checkpoint as ckpt
from gssf_cli.modeling.model import embed_split
from gssf_cli.stages.runs import TrainedModel, pack_model
from gssf_cli.training.loop import fit
from tests.conftest import tiny_train_config


class Lengths:
    """A retriever whose embeddings are known: an image (3 regions of 4 features) is its sum, a caption its length.
    It counts its calls, so a test can tell that a refused request reached no encoder."""

    layout = Layout(images=(3, 4), texts=None, dim=1)

    def __init__(self) -> None:
        self.calls = 0

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        self.calls += 1
        return images.reshape(len(images), -1).sum(axis=1, keepdims=True)

    def encode_texts(self, texts: Sequence[str] | np.ndarray) -> np.ndarray:
        self.calls += 1
        return np.array([[float(len(t))] for t in texts])

    def scores(self, image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> np.ndarray:
        return image_embeddings @ text_embeddings.T

    def input_scores(self, images: np.ndarray, texts: Sequence[str] | np.ndarray) -> None:
        return None  # an embedding model: scores come from the embeddings


def test_predict_returns_what_was_given_and_scores_when_both_sides_are() -> None:
    images = np.ones((2, 3, 4), np.float32)
    both = predict(Lengths(), {"images": images, "texts": ["ab", "abcd", "x"]})
    assert set(both) == {"image_embeddings", "text_embeddings", "scores"}
    np.testing.assert_array_equal(both["scores"], [[24, 48, 12], [24, 48, 12]])
    assert set(predict(Lengths(), {"texts": ["abc"]})) == {"text_embeddings"}
    assert set(predict(Lengths(), {"images": images})) == {"image_embeddings"}


def test_a_request_as_a_server_parses_it_is_read_like_arrays() -> None:
    """``mlflow models serve`` passes a request's ``inputs`` on as JSON made them: nested lists, ints among floats."""
    images = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    out = predict(Lengths(), {"images": images.astype(int).tolist(), "texts": np.array(["ab", "abcd"])})
    np.testing.assert_array_equal(
        out["scores"], predict(Lengths(), {"images": images, "texts": ["ab", "abcd"]})["scores"]
    )
    assert out["image_embeddings"].dtype == np.float32


def test_a_served_dataframe_is_read_like_the_dict_it_came_from() -> None:
    """MLflow's scoring server turns ``{"texts": [...]}`` into a one-row DataFrame; a column of captions works too."""
    one_row = predict(Lengths(), pd.DataFrame({"texts": [["ab", "abcd"]]}))
    per_row = predict(Lengths(), pd.DataFrame({"texts": ["ab", "abcd"]}))
    np.testing.assert_array_equal(one_row["text_embeddings"], per_row["text_embeddings"])
    np.testing.assert_array_equal(per_row["text_embeddings"], [[2.0], [4.0]])


GOOD = np.ones((2, 3, 4), np.float32)


def _with(value: float) -> list:
    images = GOOD.tolist()
    images[1][2][3] = value
    return images


BAD = {
    "NaN": (
        {"images": _with(float("nan")), "texts": ["a"]},
        r"images: 1 value\(s\) NaN, infinite or beyond float32 \(first at \[1, 2, 3\]\)",
    ),
    "+Inf": ({"images": _with(float("inf"))}, r"images: 1 value\(s\) NaN, infinite"),
    "-Inf": ({"images": np.where(GOOD > 0, -np.inf, 0)}, r"images: 24 value\(s\) NaN, infinite"),
    "beyond float32": ({"images": _with(1e39)}, "NaN, infinite or beyond float32"),
    "wrong rank": (
        {"images": GOOD[:, 0]},
        r"images: expected an array \[N, 3, 4\] \(3 dimensions\), got shape \[2, 4\]",
    ),
    "one item without N": ({"images": GOOD[0]}, r"\(3 dimensions\), got shape \[3, 4\]"),
    "a scalar": ({"images": 1.5}, r"\(3 dimensions\), got shape \[\]"),
    "wrong feature dim": ({"images": GOOD[:, :, :3]}, r"\(each item \[3, 4\]\), got shape \[2, 3, 3\]"),
    "wrong region count": ({"images": GOOD[:, :2]}, r"\(each item \[3, 4\]\), got shape \[2, 2, 4\]"),
    "ragged rows": ({"images": [GOOD[0].tolist(), GOOD[1, :2].tolist()]}, "images: rows of different lengths"),
    "string numbers": ({"images": GOOD.astype(str).tolist()}, "images: expected numbers .* got strings"),
    "a string": ({"images": "1.0"}, "images: expected numbers .* got strings"),
    "booleans": ({"images": (GOOD > 0).tolist()}, "images: expected numbers .* got booleans"),
    "nulls": ({"images": [[[None] * 4] * 3]}, "images: expected numbers .* not all numbers"),
    "no images": ({"images": [], "texts": ["a"]}, "images: no items"),
    "no images, as an array": ({"images": np.zeros((0, 3, 4))}, "images: no items"),
    "texts a string": ({"texts": "a dog"}, "texts: expected a list of captions, got one string"),
    "texts a mapping": ({"texts": {"a": "dog"}}, "texts: expected a list of captions, got a dict"),
    "texts a number": ({"texts": 3}, "texts: expected a list of captions, got the number 3"),
    "texts numbers": ({"texts": ["a dog", 2.5]}, "texts: item 1 is the number 2.5, not a caption"),
    "texts null": ({"texts": [None]}, "texts: item 0 is null, not a caption"),
    "texts nested": ({"texts": [["a dog"]]}, "texts: item 0 is a list, not a caption"),
    "texts an array of numbers": ({"texts": np.ones(2)}, "texts: item 0 is the number 1.0, not a caption"),
    "no captions": ({"texts": []}, "texts: no captions"),
    "empty inputs": ({}, "give at least one of images, texts"),
    "both null": ({"images": None, "texts": None}, "give at least one of images, texts"),
    "unknown key": ({"images": GOOD, "captions": ["a"]}, r"unknown input keys \['captions'\]"),
    "not a mapping": ([1, 2], "expected a mapping with images and/or texts, got a list"),
    "a string body": ("images", "expected a mapping .* got the string 'images'"),
    "nothing": (None, "expected a mapping .* got null"),
}
"""Every kind of bad request: (input, the message it is refused with)."""


@pytest.mark.parametrize(("model_input", "message"), BAD.values(), ids=BAD.keys())
def test_every_bad_request_is_refused_with_one_line_before_any_encoder_runs(model_input: object, message: str) -> None:
    retriever = Lengths()
    with pytest.raises(UserInputError, match=message) as refused:
        predict(retriever, model_input)
    assert "\n" not in str(refused.value) and retriever.calls == 0


def test_a_feature_text_side_is_checked_like_images() -> None:
    """Text features (and a label-based dataset's items) are arrays ``[M, F]``: numbers, the right size, finite."""
    retriever = Lengths()
    retriever.layout = Layout(images=(3, 4), texts=(2,), dim=1)
    with pytest.raises(
        UserInputError, match=r"texts: expected an array \[N, 2\] \(each item \[2\]\), got shape \[1, 3\]"
    ):
        predict(retriever, {"texts": [[1.0, 2.0, 3.0]]})
    with pytest.raises(UserInputError, match="texts: expected numbers"):
        predict(retriever, {"texts": ["a dog"]})
    with pytest.raises(UserInputError, match="texts: 1 value"):
        predict(retriever, {"texts": [[1.0, float("nan")]]})
    assert retriever.calls == 0


def test_the_layout_and_schema_come_from_the_dataset_manifest() -> None:
    regions = {"image": {"type": "regions", "shape": [8, 32]}, "text": {"type": "captions", "vocab_size": 9}}
    layout = Layout.of("cross_modal", regions, 64)
    assert layout == Layout(images=(8, 32), texts=None, dim=64)
    assert io_schema(layout) == {
        "inputs": [{"name": "images", "dtype": "float32", "shape": [-1, 8, 32]},
                   {"name": "texts", "dtype": "str", "shape": [-1]}],
        "outputs": [{"name": "image_embeddings", "dtype": "float32", "shape": [-1, 64]},
                    {"name": "text_embeddings", "dtype": "float32", "shape": [-1, 64]},
                    {"name": "scores", "dtype": "float32", "shape": [-1, -1]}],
    }  # fmt: skip
    features = {"image": {"type": "features", "shape": [16]}, "text": {"type": "features", "shape": [12]}}
    assert Layout.of("cross_modal", features, 8) == Layout(images=(16,), texts=(12,), dim=8)
    assert io_schema(Layout.of("cross_modal", features, 8))["inputs"][1] == {
        "name": "texts",
        "dtype": "float32",
        "shape": [-1, 12],
    }
    assert Layout.of("labels", {"features": {"type": "features", "shape": [64]}}, 32) == Layout((64,), (64,), 32)


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
    assert served.layout == Layout(images=(4, 8), texts=None, dim=served.model.similarity.dim)
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
