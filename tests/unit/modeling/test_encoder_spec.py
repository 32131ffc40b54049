"""gssf_cli.modeling.encoder_spec: the spec's checks, its round trip and manifests, the towers build_encoder makes
from it, and the feature towers' layers and defaults by dataset kind."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gssf_cli.core.errors import UserInputError
from gssf_cli.deploy.onnx_export import export_towers
from gssf_cli.modeling.encoder_spec import EncoderSpec, build_encoder
from gssf_cli.modeling.encoders import DualEncoder, FeatureEncoder, ImageEncoder, SingleTower, TextEncoder
from tests.unit.modeling.test_encoders import F_IN, VOCAB, WORD, D


def test_build_encoder_from_specs() -> None:
    regions = build_encoder(EncoderSpec(image_dim=F_IN, vocab_size=VOCAB, embed_dim=D, word_dim=WORD, gru_layers=2))
    assert isinstance(regions, DualEncoder)
    assert isinstance(regions.image, ImageEncoder) and isinstance(regions.text, TextEncoder)
    assert regions.text.num_layers == 2 and len(regions.text.gru_fwd) == 2

    glob = build_encoder(EncoderSpec(image_kind="global", image_dim=F_IN, vocab_size=VOCAB, pooling="attention"))
    assert isinstance(glob, DualEncoder) and isinstance(glob.image, ImageEncoder)
    assert glob.image.pool.mode == "mean" and isinstance(glob.text, TextEncoder) and glob.text.pool.mode == "attention"

    feats = build_encoder(
        EncoderSpec(image_kind="features", image_dim=F_IN, text_kind="features", text_dim=7, mlp=True)
    )
    assert isinstance(feats, DualEncoder)
    assert isinstance(feats.image, FeatureEncoder) and isinstance(feats.text, FeatureEncoder)
    assert feats.text.proj.mlp is not None

    labels = build_encoder(EncoderSpec(task="labels", image_kind="features", image_dim=64, embed_dim=D))
    assert isinstance(labels, SingleTower)
    x = torch.randn(4, 64)
    torch.testing.assert_close(labels.encode_image(x), labels(x))
    torch.testing.assert_close(labels.encode_text(x), labels(x))
    assert export_towers(labels) == {"features": labels.encoder}
    assert export_towers(regions) == {"image": regions.image, "text": regions.text}


def test_build_is_deterministic_given_the_seed() -> None:
    spec = EncoderSpec(image_dim=F_IN, vocab_size=VOCAB, embed_dim=D, word_dim=WORD, mlp=True, pooling="attention")
    states = []
    for _ in range(2):
        torch.manual_seed(7)
        states.append(build_encoder(spec).state_dict())
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"task": "retrieval"}, "encoder.task"),
        ({"image_kind": "video"}, "encoder.image_kind"),
        ({"pooling": "gpo", "vocab_size": 5}, "encoder.pooling"),
        ({}, "vocab_size is required"),
        ({"vocab_size": 0}, "vocab_size must be a positive"),
        ({"text_kind": "features"}, "text_dim is required"),
        ({"vocab_size": 5, "embed_dim": 0}, "embed_dim"),
        ({"vocab_size": 5, "gru_layers": True}, "gru_layers"),
        ({"task": "labels"}, "not regions"),
    ],
)
def test_spec_rejects_bad_settings(settings: dict[str, object], message: str) -> None:
    with pytest.raises(UserInputError, match=message):
        EncoderSpec(**settings)  # type: ignore[arg-type]


def test_spec_round_trips_and_reads_manifests() -> None:
    spec = EncoderSpec(image_dim=F_IN, vocab_size=VOCAB, embed_dim=D, pooling="max", mlp=True)
    assert EncoderSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(UserInputError, match="unknown encoder setting"):
        EncoderSpec.from_dict({**spec.to_dict(), "dropout": 0.1})

    precomp = {
        "task": "cross_modal",
        "modalities": {
            "image": {"type": "regions", "shape": [36, 2048]},
            "text": {"type": "captions", "vocab_size": 8000},
        },
    }
    got = EncoderSpec.from_manifest(precomp, embed_dim=D)
    assert (got.image_kind, got.image_dim, got.text_kind, got.vocab_size, got.embed_dim) == (
        "regions",
        2048,
        "captions",
        8000,
        D,
    )
    features = {
        "task": "cross_modal",
        "modalities": {"image": {"type": "features", "shape": [512]}, "text": {"type": "features", "shape": [384]}},
    }
    got = EncoderSpec.from_manifest(features)
    assert (got.image_kind, got.image_dim, got.text_kind, got.text_dim) == ("features", 512, "features", 384)
    digits = {"task": "labels", "modalities": {"features": {"type": "features", "shape": [64]}}}
    assert isinstance(build_encoder(EncoderSpec.from_manifest(digits, embed_dim=D)), SingleTower)


# ---------------------------------------------------------------------------------------------------------
# Feature towers with layers (--mlp-layers, --mlp-hidden): their defaults by dataset kind


FEATURES_MANIFEST = {
    "kind": "features",
    "task": "cross_modal",
    "modalities": {"image": {"type": "features", "shape": [12]}, "text": {"type": "features", "shape": [9]}},
}


DIGITS_MANIFEST = {"kind": "digits", "task": "labels", "modalities": {"features": {"type": "features", "shape": [64]}}}


PRECOMP_MANIFEST = {
    "kind": "precomp",
    "task": "cross_modal",
    "modalities": {"image": {"type": "regions", "shape": [36, 20]}, "text": {"type": "captions", "vocab_size": 30}},
}


def test_feature_towers_take_their_defaults_by_dataset_kind() -> None:
    from gssf_cli.modeling.encoders import FEATURE_TOWERS

    for manifest in (FEATURES_MANIFEST, DIGITS_MANIFEST):
        shape = FEATURE_TOWERS[manifest["kind"]]  # type: ignore[index]
        spec = EncoderSpec.from_manifest(manifest, embed_dim=D)
        assert (spec.mlp_layers, spec.mlp_hidden) == (shape.layers, shape.hidden)
        built = build_encoder(spec)
        assert sum(isinstance(m, nn.Linear) for m in built.modules()) == shape.layers * (
            1 if manifest is DIGITS_MANIFEST else 2
        )
    given = EncoderSpec.from_manifest(FEATURES_MANIFEST, embed_dim=D, mlp_layers=3, mlp_hidden=7)
    assert (given.mlp_layers, given.mlp_hidden) == (3, 7)
    residual = EncoderSpec.from_manifest(FEATURES_MANIFEST, embed_dim=D, mlp=True)
    assert (residual.mlp_layers, residual.mlp_hidden) == (1, D // 2)  # --mlp: the one-layer tower with a residual
    regions = EncoderSpec.from_manifest(PRECOMP_MANIFEST, embed_dim=D)
    assert (regions.mlp_layers, regions.mlp_hidden) == (1, None)
    wide = build_encoder(EncoderSpec.from_manifest(PRECOMP_MANIFEST, embed_dim=D, mlp=True, mlp_hidden=5))
    assert isinstance(wide, DualEncoder) and wide.image.proj.mlp[0].out_features == 5  # type: ignore[index,union-attr]


def test_layers_are_refused_on_region_towers_and_with_the_residual() -> None:
    with pytest.raises(UserInputError, match=r"--mlp-layers 2: layers apply to feature towers.*regions images"):
        EncoderSpec.from_manifest(PRECOMP_MANIFEST, mlp_layers=2)
    with pytest.raises(UserInputError, match="pass --mlp-layers 1 with --mlp"):
        EncoderSpec.from_manifest(FEATURES_MANIFEST, mlp_layers=2, mlp=True)
    with pytest.raises(UserInputError, match="mlp_hidden must be a positive"):
        EncoderSpec(vocab_size=5, mlp_hidden=0)


def test_a_spec_saved_before_layers_is_a_one_layer_tower() -> None:
    old = EncoderSpec(image_kind="features", image_dim=F_IN, text_kind="features", text_dim=7).to_dict()
    for key in ("mlp_layers", "mlp_hidden", "encoder", "adapter"):
        old.pop(key)
    spec = EncoderSpec.from_dict(old)
    assert spec.mlp_layers == 1
    built = build_encoder(spec)
    assert isinstance(built, DualEncoder) and set(built.text.state_dict()) == {"proj.proj.weight", "proj.proj.bias"}
