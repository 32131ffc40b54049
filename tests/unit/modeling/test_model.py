"""The model built from a dataset's manifest and a train config: shapes, embeddings, weight loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gssf_cli.core.errors import UserInputError
from gssf_cli.data.dataset import Dataset
from gssf_cli.modeling.model import build_model, build_objective, embed_split, load_weights
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


# ---------------------------------------------------------------------------------------------------------
# Parameter counts of feature towers with layers and of head-only towers; the resolved tower shape


def _count_case(spec: object, metric: str = "gssf", dim: int = 8) -> None:
    from gssf_cli.core.stage_configs import TrainConfig
    from gssf_cli.modeling.encoder_spec import EncoderSpec, build_encoder
    from gssf_cli.modeling.model import count_parameters
    from gssf_cli.modeling.similarity import make_similarity

    assert isinstance(spec, EncoderSpec)
    config = TrainConfig(data=Path("d"), metric=metric, embed_dim=dim, block_size=4)
    built = sum(p.numel() for p in build_encoder(spec).parameters())
    built += make_similarity(metric, dim, 4 if metric in ("bdiag", "gssf") else None).num_parameters()
    assert count_parameters(spec, config) == built, spec


@pytest.mark.parametrize("task", ["cross_modal", "labels"])
@pytest.mark.parametrize(("layers", "hidden", "mlp"), [(1, None, False), (1, 6, True), (2, None, False), (4, 5, False)])
def test_the_parameter_count_of_feature_towers_is_the_built_ones(
    task: str, layers: int, hidden: int | None, mlp: bool
) -> None:
    from gssf_cli.modeling.encoder_spec import EncoderSpec

    spec = EncoderSpec(
        task=task, image_kind="features", image_dim=5, text_kind="features", text_dim=6, embed_dim=8,
        mlp=mlp, mlp_layers=layers, mlp_hidden=hidden,
    )  # fmt: skip
    _count_case(spec)


@pytest.mark.parametrize("encoder", ["identity", "frozen"])
@pytest.mark.parametrize("adapter", [False, True])
@pytest.mark.parametrize("kind", ["features", "labels", "regions", "captions"])
def test_the_parameter_count_of_head_only_models_is_the_built_ones(encoder: str, adapter: bool, kind: str) -> None:
    from gssf_cli.modeling.encoder_spec import EncoderSpec

    if encoder == "identity" and kind in ("regions", "captions"):
        return
    fields: dict[str, object] = {
        "features": {
            "image_kind": "features",
            "image_dim": 8,
            "text_kind": "features",
            "text_dim": 8 if not adapter else 6,
        },
        "labels": {"task": "labels", "image_kind": "features", "image_dim": 8},
        "regions": {"image_kind": "regions", "image_dim": 5, "vocab_size": 11, "word_dim": 3, "pooling": "attention"},
        "captions": {"image_kind": "global", "image_dim": 5, "vocab_size": 11, "word_dim": 3, "mlp": True},
    }[kind]  # type: ignore[assignment]
    layers = 2 if kind in ("features", "labels") and encoder == "frozen" else 1
    spec = EncoderSpec(**fields, embed_dim=8, encoder=encoder, adapter=adapter, mlp_layers=layers)  # type: ignore[arg-type]
    _count_case(spec)
    _count_case(spec, metric="cosine")


def test_the_resolved_config_holds_the_tower_shape(tmp_path: Path) -> None:
    from gssf_cli.modeling.encoders import FEATURE_TOWERS
    from gssf_cli.modeling.model import resolve_config

    manifest = {
        "kind": "features",
        "task": "cross_modal",
        "modalities": {"image": {"type": "features", "shape": [12]}, "text": {"type": "features", "shape": [12]}},
    }
    config = tiny_train_config(tmp_path)
    resolved = resolve_config(config, manifest)  # type: ignore[arg-type]
    shape = FEATURE_TOWERS["features"]
    assert (resolved.mlp_layers, resolved.mlp_hidden) == (shape.layers, shape.hidden)
    assert resolve_config(resolved, manifest) == resolved
    identity = resolve_config(tiny_train_config(tmp_path, encoder="identity", block_size=3), manifest)  # type: ignore[arg-type]
    assert (identity.embed_dim, identity.mlp_layers) == (12, None)


def test_a_checkpoint_from_before_layers_rebuilds_its_one_layer_towers(tmp_path: Path) -> None:
    """A state whose config has neither ``mlp_layers`` nor ``encoder`` was written with one-layer feature towers:
    reading it says so, and the model it describes takes its weights."""
    from gssf_cli.core.config import from_dict, to_dict
    from gssf_cli.core.stage_configs import TrainConfig
    from gssf_cli.modeling import checkpoint as ckpt
    from gssf_cli.modeling.model import build_model_for

    manifest = {"kind": "digits", "task": "labels", "modalities": {"features": {"type": "features", "shape": [6]}}}
    old = build_model_for(manifest, tiny_train_config(tmp_path, mlp_layers=1))  # type: ignore[arg-type]
    values = {k: v for k, v in to_dict(tiny_train_config(tmp_path)).items() if k not in ("encoder", "adapter")}
    ckpt.save(tmp_path / "best", old, {"config": values, "epochs_done": 1})
    saved = ckpt.load(tmp_path / "best")
    rebuilt = build_model_for(manifest, from_dict(TrainConfig, saved.state["config"], "train"))
    load_weights(rebuilt, saved.model)
    x = torch.randn(3, 6)
    torch.testing.assert_close(rebuilt.encode_images(x), old.encode_images(x))
