"""The encoders' description: :class:`EncoderSpec`, a plain JSON-friendly record saved with every checkpoint, and
the one function that turns it into modules (:func:`build_encoder`).

Why apart from the towers (:mod:`gssf_cli.modeling.encoders`): a checkpoint, a manifest or a bundle is read and
checked through the spec, and the spec's fields are typed with the Literals of :mod:`gssf_cli.core.limits`, the
one place their choices are written.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from torch import nn

from gssf_cli.core.config import default_of
from gssf_cli.core.errors import UserInputError
from gssf_cli.core.limits import (
    ENCODER_KINDS,
    IMAGE_KINDS,
    POOLINGS,
    TASKS,
    TEXT_KINDS,
    EncoderKind,
    ImageKind,
    Pooling,
    Task,
    TextKind,
)
from gssf_cli.core.stage_configs import TrainConfig
from gssf_cli.modeling import encoders as towers


@dataclass(frozen=True)
class EncoderSpec:
    """A plain, JSON-friendly description of the encoders, saved with checkpoints to rebuild the model.

    ``task``: ``cross_modal`` (a :class:`~gssf_cli.modeling.encoders.DualEncoder`) or ``labels`` (a :class:`~gssf_cli.modeling.encoders.SingleTower` over
    ``image_dim`` features; the text fields are ignored). ``image_kind``: ``regions`` ``[B, R, F]`` or
    ``global`` ``[B, F]`` (both :class:`~gssf_cli.modeling.encoders.ImageEncoder`; pooling one region is the identity, so ``global``
    always pools by mean) or ``features`` (:class:`~gssf_cli.modeling.encoders.FeatureEncoder`). ``text_kind``: ``captions`` (needs
    ``vocab_size``) or ``features`` (needs ``text_dim``). ``pooling`` applies to image regions and tokens.
    ``mlp_layers``: layers of the feature towers (1 = one projection, the only choice for region and global
    image towers); ``mlp_hidden``: the width of their hidden layers and of VSE∞'s residual ``mlp`` (None: the
    feature-tower default for ``mlp_layers`` >= 2, D/2 for the residual). A spec without these two (a
    checkpoint written before they existed) is a one-layer tower, as it was. ``encoder``: ``trained``, or a
    head-only model's towers (:class:`~gssf_cli.modeling.encoders.HeadOnlyTower`): ``identity`` (feature inputs only; ``embed_dim`` is the
    feature size unless ``adapter``) or ``frozen`` (the towers the other settings describe, frozen), each side
    with a linear ``adapter`` to ``embed_dim`` if asked.
    The model settings default to :class:`gssf_cli.core.stage_configs.TrainConfig`'s (the host frameworks': D = 1024, ...);
    :meth:`from_manifest` fills in the feature towers' defaults by dataset kind (:data:`~gssf_cli.modeling.encoders.FEATURE_TOWERS`).
    """

    task: Task = "cross_modal"
    image_kind: ImageKind = "regions"
    image_dim: int = 2048
    text_kind: TextKind = "captions"
    text_dim: int | None = None
    vocab_size: int | None = None
    embed_dim: int = default_of(TrainConfig, "embed_dim")
    word_dim: int = towers.DEFAULT_WORD_DIM
    pooling: Pooling = towers.DEFAULT_POOLING
    mlp: bool = towers.DEFAULT_MLP
    gru_layers: int = towers.DEFAULT_GRU_LAYERS
    mlp_layers: int = 1
    mlp_hidden: int | None = None
    encoder: EncoderKind = "trained"
    adapter: bool = False

    def __post_init__(self) -> None:
        def choice(name: str, options: tuple[str, ...]) -> None:
            if getattr(self, name) not in options:
                raise UserInputError(f"encoder.{name} must be one of {', '.join(options)}; got {getattr(self, name)!r}")

        def positive(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserInputError(f"encoder.{name} must be a positive integer; got {value!r}")

        choice("task", TASKS)
        choice("image_kind", IMAGE_KINDS)
        choice("pooling", POOLINGS)
        for name in ("image_dim", "embed_dim", "word_dim", "gru_layers", "mlp_layers"):
            positive(name)
        if self.mlp_hidden is not None:
            positive("mlp_hidden")
        if self.task == "labels":
            if self.image_kind == "regions":
                raise UserInputError("encoder.image_kind: label-based data takes feature vectors, not regions")
        else:
            choice("text_kind", TEXT_KINDS)
            if self.text_kind == "captions":
                if self.vocab_size is None:
                    raise UserInputError("encoder.vocab_size is required for captions (the size of vocab.json)")
                positive("vocab_size")
            else:
                if self.text_dim is None:
                    raise UserInputError("encoder.text_dim is required for text features (their dimension)")
                positive("text_dim")
        choice("encoder", ENCODER_KINDS)
        if self.adapter and self.encoder == "trained":
            raise UserInputError("--adapter applies to head-only training (--encoder identity or frozen)")
        if self.encoder == "identity":
            self._check_identity()
        if self.mlp_layers > 1:
            if not self.has_feature_towers():
                raise UserInputError(
                    f"--mlp-layers {self.mlp_layers}: layers apply to feature towers, and this dataset's towers are "
                    f"{self.image_kind} images and {self.text_kind} (one projection each, plus --mlp for VSE∞'s "
                    "residual); drop --mlp-layers"
                )
            if self.mlp:
                raise UserInputError(towers.MLP_ON_DEEP_TOWER.format(layers=self.mlp_layers))

    def _check_identity(self) -> None:
        """``identity`` reads feature vectors; without adapters both sides are the head's size D."""
        if not self.has_feature_towers() or (self.task == "cross_modal" and self.text_kind != "features"):
            text = "" if self.task == "labels" else f" and texts are {self.text_kind}"
            raise UserInputError(
                f"--encoder identity reads feature vectors, but this dataset's images are {self.image_kind}{text}: "
                "train a run on it, then train a head over its towers with --encoder frozen --encoder-run RUN"
            )
        if self.adapter:
            return
        sizes = {self.image_dim} if self.task == "labels" else {self.image_dim, self.text_dim}
        if len(sizes) > 1:
            raise UserInputError(
                f"--encoder identity: image features have {self.image_dim} channels and text features "
                f"{self.text_dim}, but the head reads one size; add --adapter (a linear map per side to --embed-dim)"
            )
        if sizes != {self.embed_dim}:
            raise UserInputError(
                f"--encoder identity without --adapter: the head's size is the feature size {self.image_dim}, "
                f"not {self.embed_dim}"
            )

    def head_only(self) -> bool:
        """Whether only the metric head (and adapters) learn: ``identity`` or ``frozen`` towers."""
        return self.encoder != "trained"

    def has_feature_towers(self) -> bool:
        """Whether the towers are :class:`~gssf_cli.modeling.encoders.FeatureEncoder` s (``mlp_layers`` applies): label-based data, or
        feature images (a ``features`` dataset of pairs, whose texts are features too)."""
        return self.task == "labels" or self.image_kind == "features"

    def hidden_width(self) -> int:
        """The width of the feature towers' hidden layers (``mlp_layers`` >= 2) or of the residual (``mlp``)."""
        if self.mlp_layers > 1:
            return self.mlp_hidden or towers.DEFAULT_FEATURE_TOWER.hidden or self.embed_dim
        return towers.residual_width(self.embed_dim, self.mlp_hidden)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncoderSpec:
        """Inverse of :meth:`to_dict`; unknown keys are a user error, not silently dropped. A dict without
        ``mlp_layers`` / ``mlp_hidden`` (written before they existed) is a one-layer tower."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserInputError(f"unknown encoder setting(s): {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def from_manifest(
        cls, manifest: dict[str, Any], mlp_layers: int | None = None, mlp_hidden: int | None = None, **settings: Any
    ) -> EncoderSpec:
        """The spec a dataset's ``manifest.json`` implies, plus model ``settings`` (embed_dim, pooling, ...).

        ``mlp_layers`` / ``mlp_hidden`` left None are resolved here, so the spec holds the shape actually built:
        feature towers take :data:`~gssf_cli.modeling.encoders.FEATURE_TOWERS` of the manifest's kind (with ``mlp``: one layer, VSE∞'s
        residual of width D/2, as before feature towers had layers); region and global towers one projection.
        """
        modalities = manifest.get("modalities", {})
        if manifest.get("task") == "labels":
            feats = modalities["features"]
            fields_: dict[str, Any] = {"task": "labels", "image_kind": "features", "image_dim": int(feats["shape"][-1])}
        else:
            image, text = modalities["image"], modalities["text"]
            fields_ = {
                "task": "cross_modal",
                "image_kind": image["type"],
                "image_dim": int(image["shape"][-1]),
                **(
                    {"text_kind": "captions", "vocab_size": int(text["vocab_size"])}
                    if text["type"] == "captions"
                    else {"text_kind": "features", "text_dim": int(text["shape"][-1])}
                ),
            }
        features = fields_["task"] == "labels" or fields_["image_kind"] == "features"
        mlp = bool(settings.get("mlp", towers.DEFAULT_MLP))
        embed_dim = int(settings.get("embed_dim", default_of(TrainConfig, "embed_dim")))
        if mlp_layers is None:
            shape = towers.FEATURE_TOWERS.get(str(manifest.get("kind")), towers.DEFAULT_FEATURE_TOWER)
            mlp_layers = shape.layers if features and not mlp else 1
        if mlp_hidden is None:
            if mlp_layers > 1:
                shape = towers.FEATURE_TOWERS.get(str(manifest.get("kind")), towers.DEFAULT_FEATURE_TOWER)
                mlp_hidden = shape.hidden
            elif mlp:
                mlp_hidden = towers.residual_width(embed_dim, None)
        return cls(**fields_, mlp_layers=mlp_layers, mlp_hidden=mlp_hidden, **settings)


def build_encoder(spec: EncoderSpec) -> towers.DualEncoder | towers.SingleTower:
    """The model a spec describes: :class:`~gssf_cli.modeling.encoders.DualEncoder` for ``cross_modal``, :class:`~gssf_cli.modeling.encoders.SingleTower` for ``labels``.

    Head-only specs wrap every tower in a :class:`~gssf_cli.modeling.encoders.HeadOnlyTower`: ``identity`` over the features themselves,
    ``frozen`` over the towers a ``trained`` spec of the same settings builds (the trained run's weights are
    loaded into them afterwards, see :func:`gssf_cli.modeling.model.load_frozen_towers`).
    """
    if spec.encoder == "identity":
        if spec.task == "labels":
            return towers.SingleTower(towers.HeadOnlyTower(spec.image_dim, spec.embed_dim, spec.adapter))
        assert spec.text_dim is not None
        return towers.DualEncoder(
            towers.HeadOnlyTower(spec.image_dim, spec.embed_dim, spec.adapter),
            towers.HeadOnlyTower(spec.text_dim, spec.embed_dim, spec.adapter),
        )
    if spec.encoder == "frozen":
        trained = build_encoder(replace(spec, encoder="trained", adapter=False))
        d = spec.embed_dim
        if isinstance(trained, towers.SingleTower):
            return towers.SingleTower(towers.HeadOnlyTower(d, d, spec.adapter, trained.encoder))
        return towers.DualEncoder(
            towers.HeadOnlyTower(d, d, spec.adapter, trained.image),
            towers.HeadOnlyTower(d, d, spec.adapter, trained.text),
        )

    def features(in_dim: int) -> towers.FeatureEncoder:
        return towers.FeatureEncoder(in_dim, spec.embed_dim, spec.mlp, spec.mlp_layers, spec.hidden_width())

    if spec.task == "labels":
        return towers.SingleTower(features(spec.image_dim))
    image: nn.Module
    if spec.image_kind == "features":
        image = features(spec.image_dim)
    else:
        pooling = spec.pooling if spec.image_kind == "regions" else "mean"
        image = towers.ImageEncoder(spec.image_dim, spec.embed_dim, pooling, spec.mlp, spec.hidden_width())
    text: nn.Module
    if spec.text_kind == "captions":
        assert spec.vocab_size is not None
        text = towers.TextEncoder(spec.vocab_size, spec.embed_dim, spec.word_dim, spec.gru_layers, spec.pooling)
    else:
        assert spec.text_dim is not None
        text = features(spec.text_dim)
    return towers.DualEncoder(image, text)
