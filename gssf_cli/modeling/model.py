"""The trainable whole: encoders plus a GSSF metric head, and what is built from a dataset's manifest.

Why one module: training, evaluation of a run and export all need the same model from the same config and
manifest; building it in one place keeps them in agreement.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gssf_cli.core import limits
from gssf_cli.core.errors import UserInputError
from gssf_cli.core.stage_configs import TrainConfig
from gssf_cli.data.dataset import Dataset, Split
from gssf_cli.modeling import checkpoint as ckpt
from gssf_cli.modeling.encoder_spec import EncoderSpec, build_encoder
from gssf_cli.modeling.encoders import DualEncoder, HeadOnlyTower, SingleTower, l2_normalize, parameter_counts
from gssf_cli.modeling.interaction import Interaction, TokenSets, make_interaction
from gssf_cli.modeling.losses import make_objective
from gssf_cli.modeling.similarity import Similarity, head_parameters, make_similarity


class RetrievalModel(nn.Module):
    """Encoders ``[B, ...] -> [B, D]`` (L2-normalised) and a similarity ``[Bi, D] x [Bt, D] -> [Bi, Bt]``.

    For label-based data one tower encodes both sides (anchors and positives are the same modality). With an
    ``interaction`` (the interaction-based family), pairs are scored from the towers' token outputs instead
    (:meth:`encode_image_tokens`, :meth:`encode_text_tokens`, :meth:`token_scores`), the similarity serving as
    the token similarity; the pooled embeddings remain (a shortlist ranks by them).
    """

    def __init__(
        self, encoder: nn.Module, similarity: Similarity, task: str, interaction: Interaction | None = None
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.similarity = similarity
        self.task = task
        self.interaction = interaction

    def encode_image_tokens(self, images: Tensor) -> Tensor:
        """Regions ``[B, R, F]`` (or ``[B, F]``: one region) -> projected, L2-normalised regions ``[B, R, D]``."""
        return l2_normalize(self.encoder.image.regions(images))  # type: ignore[union-attr,operator]

    def encode_text_tokens(self, texts: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Token ids ``[B, L]`` -> per-word states ``[B, L, D]`` (L2-normalised, zero at padding) and the mask
        ``[B, L]`` of valid words."""
        states, mask = self.encoder.text.token_states(texts, lengths)  # type: ignore[union-attr,operator]
        return l2_normalize(states) * mask.unsqueeze(-1).to(states.dtype), mask

    def encode_tokens(self, images: Tensor, texts: Tensor, lengths: Tensor | None) -> TokenSets:
        words, mask = self.encode_text_tokens(texts, lengths)
        return TokenSets(self.encode_image_tokens(images), words, mask)

    def token_scores(self, tokens: TokenSets) -> Tensor:
        """``[Bi, Bt]``: every image of ``tokens`` against every caption, by the interaction."""
        assert self.interaction is not None
        return self.interaction(tokens.regions, tokens.words, tokens.mask)

    def encode_images(self, images: Tensor) -> Tensor:
        return self.encoder.encode_image(images)  # type: ignore[operator]

    def encode_texts(self, texts: Tensor, lengths: Tensor | None = None) -> Tensor:
        if self.task == "labels":
            return self.encoder.encode_image(texts)  # type: ignore[operator]
        return self.encoder.encode_text(texts, lengths)  # type: ignore[operator]

    def scores(self, images: Tensor, texts: Tensor) -> Tensor:
        return self.similarity.scores(images, texts)

    def label(self) -> str:
        """What run names say of this model (:func:`gssf_cli.core.limits.model_label`)."""
        kind = self.interaction.kind if self.interaction is not None else "none"
        return limits.model_label(self.similarity.name, self.similarity.block_size, kind)

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per tower (``encoder_image``, ...), of the ``metric_head``, in ``total`` and ``trainable``
        (fewer than the total when frozen towers do not learn)."""
        counts = {f"encoder_{k}": v for k, v in parameter_counts(self.encoder).items()}
        counts["metric_head"] = self.similarity.num_parameters()
        counts["total"] = sum(p.numel() for p in self.parameters())
        counts["trainable"] = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return counts


def encoder_spec(dataset: Dataset, config: TrainConfig) -> EncoderSpec:
    return manifest_spec(dataset.manifest, config)


TOWER_SETTINGS = ("embed_dim", "word_dim", "pooling", "mlp", "gru_layers", "mlp_layers", "mlp_hidden")
"""The TrainConfig fields that shape the towers (an :class:`EncoderSpec` beside the manifest's sizes): what a
``--encoder frozen`` run copies from the run whose towers it freezes."""


def manifest_spec(manifest: dict[str, Any], config: TrainConfig) -> EncoderSpec:
    """The encoders ``config`` builds for a dataset with this ``manifest.json``.

    Also refused here, before any run opens (training, and every trial of a tune, builds its spec first): a
    block size that does not divide the size the towers end in — for a head-only run without adapters the
    feature size (``identity``) or the frozen run's D, which :meth:`TrainConfig.validate` cannot know — and
    tower settings that a head-only run has no towers for.
    """
    if config.encoder == "identity":
        tower_flags = (
            ("--mlp-layers", config.mlp_layers),
            ("--mlp-hidden", config.mlp_hidden),
            ("--mlp", config.mlp or None),
        )
        for flag, given in tower_flags:
            if given is not None:
                raise UserInputError(
                    f"{flag} shapes trained towers, and --encoder identity trains none: drop it "
                    "(--adapter adds a linear map per side)"
                )
        # Regions or captions have no feature size: the spec refuses them (and says what to do instead).
        size = config.embed_dim if config.adapter else (_feature_size(manifest) or config.embed_dim)
        spec = EncoderSpec.from_manifest(
            manifest, mlp_layers=1, embed_dim=size, encoder="identity", adapter=config.adapter
        )
    else:
        if config.encoder == "frozen" and config.mlp_layers is None:
            config = frozen_config(config, manifest)  # not resolved yet (a tune's probe): read the run's towers
        settings = {name: getattr(config, name) for name in TOWER_SETTINGS}
        spec = EncoderSpec.from_manifest(manifest, **settings, encoder=config.encoder, adapter=config.adapter)
    tokens = spec.task == "cross_modal" and spec.text_kind == "captions" and spec.image_kind in TOKEN_IMAGES
    if config.interaction != "none" and not tokens:
        data = "is label-based" if spec.task == "labels" else f"has {spec.image_kind} images and {spec.text_kind} texts"
        raise UserInputError(
            f"--interaction {config.interaction} aligns image regions with caption words, and {config.data} {data}: "
            "use --interaction none (pooled embeddings), or a synthetic or precomp dataset"
        )
    if config.uses_block_size() and not config.embeds_to_embed_dim():  # D is not embed_dim: validate() could not check
        try:
            limits.check_block_size(config.metric, spec.embed_dim, config.block_size)
        except UserInputError as exc:
            source = "the feature size" if spec.encoder == "identity" else f"run {config.encoder_run}'s towers"
            raise UserInputError(
                f"--encoder {spec.encoder}: the head reads {source}, D = {spec.embed_dim}; {exc}"
            ) from None
    return spec


TOKEN_IMAGES = ("regions", "global")
"""Image inputs whose tower keeps token outputs (a global feature is one region)."""


def head_dim(config: TrainConfig) -> int:
    """D, the size the metric head reads: ``embed_dim``, except for a head-only run without adapters, whose head
    reads the feature size (``identity``) or the frozen run's D. Why: a tune's summary, head sizes and block-size
    figure must name the D its trials really had, not a default they never used."""
    if config.embeds_to_embed_dim():
        return config.embed_dim
    from gssf_cli.data.manifest import load_manifest

    try:
        return manifest_spec(load_manifest(config.data, verify=False), config).embed_dim
    except UserInputError:
        return config.embed_dim


def _feature_size(manifest: dict[str, Any]) -> int:
    """The image (or label-based) feature size of a manifest; 0 when the images are not feature vectors."""
    modalities = manifest.get("modalities", {})
    side = modalities["features"] if manifest.get("task") == "labels" else modalities["image"]
    return int(side["shape"][-1]) if side.get("type") == "features" else 0


def resolve_config(config: TrainConfig, manifest: dict[str, Any], dataset_sha256: str | None = None) -> TrainConfig:
    """``config`` with what the dataset (and, for ``--encoder frozen``, the frozen run) implies written in, so
    that a checkpoint's config rebuilds the model it trained, even after the defaults change or without the frozen
    run: the tower shape by dataset kind (``mlp_layers``, ``mlp_hidden``:
    :data:`gssf_cli.modeling.encoders.FEATURE_TOWERS`); for ``identity`` without adapters, ``embed_dim`` = the feature
    size; for ``frozen``, the frozen run's tower settings (:data:`TOWER_SETTINGS`, read from its best checkpoint
    and checked against the dataset ``dataset_sha256`` when given). Resolving a resolved config changes nothing.
    """
    if config.encoder == "frozen":
        config = frozen_config(config, manifest, dataset_sha256, strict=True)
    spec = manifest_spec(manifest, config)
    if config.encoder == "identity":
        return dataclasses.replace(config, embed_dim=spec.embed_dim)
    return dataclasses.replace(config, mlp_layers=spec.mlp_layers, mlp_hidden=spec.mlp_hidden)


def resolve_values(values: dict[str, Any], manifest: dict[str, Any]) -> dict[str, Any]:
    """Saved config ``values`` as :func:`resolve_config` leaves them (a run's ``config.json`` is written before
    the trainer resolves it); values that no longer make a config are returned as they are."""
    from gssf_cli.core.config import from_dict, to_dict

    try:
        return to_dict(resolve_config(from_dict(TrainConfig, dict(values), "train"), manifest))
    except UserInputError:
        return values


def frozen_checkpoint(config: TrainConfig) -> Path:
    """The best checkpoint of ``config.encoder_run``: ``runs_dir/RUN/best``, or ``RUN/best`` when RUN is a run
    folder (a path, e.g. absolute for the trials of a tune, which keep their own runs folder)."""
    run = config.encoder_run
    if run is None:
        raise UserInputError("--encoder frozen needs --encoder-run RUN: the run whose encoders to freeze")
    for folder in (config.runs_dir / run / ckpt.BEST, Path(run).expanduser() / ckpt.BEST):
        if ckpt.recover(folder):
            return folder
    raise UserInputError(
        f"--encoder-run {run}: no checkpoint at {config.runs_dir / run / ckpt.BEST}; name a run trained in "
        "--runs-dir (its id, as `gssf train` printed it) or its run folder"
    )


def frozen_config(
    config: TrainConfig, manifest: dict[str, Any], dataset_sha256: str | None = None, strict: bool = False
) -> TrainConfig:
    """``config`` with the tower settings of the run it freezes (its best checkpoint's config, resolved against
    ``manifest``). Refused: a run that is not a ``trained`` one, and with ``dataset_sha256`` a run trained on
    another dataset; with ``strict``, a tower setting given that differs from the run's."""
    from gssf_cli.core.config import default_of, from_dict

    folder = frozen_checkpoint(config)
    state = ckpt.check_state(ckpt.saved_state(folder), folder / ckpt.STATE, ("config", "dataset_sha256"))
    run = config.encoder_run
    if dataset_sha256 is not None and state["dataset_sha256"] != dataset_sha256:
        raise UserInputError(
            f"--encoder-run {run} was trained on another dataset than {config.data}; freeze a run trained on it"
        )
    try:
        trained = from_dict(TrainConfig, dict(state["config"]), f"run {run}")
    except UserInputError as exc:
        raise UserInputError(f"--encoder-run {run}: its saved config does not read ({exc})") from None
    if trained.encoder != "trained":
        raise UserInputError(
            f"--encoder-run {run} trained only a head (--encoder {trained.encoder}); freeze a run whose encoders "
            "were trained"
        )
    spec = manifest_spec(manifest, trained)
    settings = {name: getattr(spec, name) for name in TOWER_SETTINGS}
    if strict:
        given = {"mlp_layers": config.mlp_layers, "mlp_hidden": config.mlp_hidden}
        if config.embed_dim != default_of(TrainConfig, "embed_dim"):
            given["embed_dim"] = config.embed_dim
        for name, value in given.items():
            if value is not None and value != settings[name]:
                flag = "--" + name.replace("_", "-")
                raise UserInputError(
                    f"--encoder frozen keeps run {run}'s towers as they are ({name} {settings[name]}): drop {flag}"
                )
    return dataclasses.replace(config, **settings)


def build_model(dataset: Dataset, config: TrainConfig) -> RetrievalModel:
    """The model of ``config`` for ``dataset``; refused up front (:func:`check_fits_memory`) when its weights
    alone would not fit in this machine's memory, rather than failing (or swapping) inside the allocator."""
    return build_model_for(dataset.manifest, config)


def build_model_for(manifest: dict[str, Any], config: TrainConfig) -> RetrievalModel:
    """:func:`build_model` from a dataset's ``manifest.json`` alone (a served model carries no dataset).

    A ``frozen`` model is built with fresh towers of the frozen run's shape (from the resolved config, so the
    frozen run is not needed): its weights come from a checkpoint of the head-only run, which holds them, or at
    the start of training from the frozen run (:func:`load_frozen_towers`)."""
    spec = manifest_spec(manifest, config)
    check_fits_memory(spec, config)
    encoder = build_encoder(spec)
    similarity = make_similarity(config.metric, spec.embed_dim, config.head_block_size(), norm=config.metric_norm)
    interaction = make_interaction(
        config.interaction, similarity, config.gssf_at, config.aggregate, config.lambda_softmax, config.lambda_lse
    )
    return RetrievalModel(encoder, similarity, str(manifest["task"]), interaction)


def load_frozen_towers(model: RetrievalModel, config: TrainConfig) -> None:
    """Load the towers of ``config.encoder_run``'s best checkpoint into a ``frozen`` model's towers."""
    saved = ckpt.load(frozen_checkpoint(config))
    for name, tower in _sides(model.encoder).items():
        prefix = f"encoder.{name}."
        assert tower.tower is not None
        load_weights(tower.tower, {k[len(prefix) :]: v for k, v in saved.model.items() if k.startswith(prefix)})


def _sides(encoder: nn.Module) -> dict[str, HeadOnlyTower]:
    """A head-only encoder's towers by their name in a trained model's state (``image``/``text``, or ``encoder``)."""
    sides = {"image": encoder.image, "text": encoder.text} if isinstance(encoder, DualEncoder) else {}
    if isinstance(encoder, SingleTower):
        sides = {"encoder": encoder.encoder}
    if not sides or not all(isinstance(t, HeadOnlyTower) for t in sides.values()):
        raise TypeError("not a head-only model")
    return sides  # type: ignore[return-value]


class EmbeddedDataset(Dataset):
    """A dataset whose splits read a ``frozen`` model's tower outputs instead of its inputs, each split embedded
    once (on first use) instead of in every batch of every epoch: a head over frozen towers then trains at the
    speed of a head over features. The model's towers are told (:attr:`HeadOnlyTower.embedded_inputs`) that their
    inputs are embedded, so training and validation read the same embeddings; the model's weights (towers
    included) are saved as ever. Batches and their order are those of the dataset itself. (Structure-aware
    distillation's default teachers, the raw inputs of a batch, are then the frozen towers' outputs.)
    """

    def __init__(self, dataset: Dataset, model: RetrievalModel, device: torch.device) -> None:
        # No Dataset.__init__: the folder was verified when ``dataset`` was opened.
        self.folder, self.manifest, self.digest = dataset.folder, dataset.manifest, dataset.digest
        self.name, self.task, self.vocab = dataset.name, dataset.task, dataset.vocab
        self._splits: dict[str, Split] = {}
        self.source, self.device = dataset, device
        self.sides = _sides(model.encoder)
        for tower in self.sides.values():
            tower.embedded_inputs = True

    def split(self, name: str) -> Split:
        if name not in self._splits:
            self._splits[name] = self._embed(self.source.split(name))
        return self._splits[name]

    @torch.no_grad()
    def _embed(self, split: Split, batch_size: int = 256) -> Split:
        towers = [t.tower for t in self.sides.values()]
        image_tower, text_tower = towers[0], towers[-1]
        assert image_tower is not None and text_tower is not None
        embedded = copy.copy(split)

        def run(tower: nn.Module, count: int, batch: Any) -> np.ndarray:
            parts = []
            for start in range(0, count, batch_size):
                inputs = batch(np.arange(start, min(start + batch_size, count)))
                parts.append(tower(*(x.to(self.device) for x in inputs if x is not None)).cpu().numpy())
            return np.concatenate(parts)

        embedded.images = run(image_tower, split.num_images, lambda rows: (split.image_batch(rows),))
        if split.task == "cross_modal":
            embedded.text_features = run(text_tower, split.num_pairs, split.text_batch)
            embedded.captions = None
        return embedded


FLOAT32_BYTES = 4


def count_parameters(spec: EncoderSpec, config: TrainConfig) -> int:
    """The learned parameters :func:`build_model` would create, computed from the spec and the config alone (no
    allocation, any size); a test proves it equals the built model's count for every kind of tower."""
    d = spec.embed_dim
    hidden = spec.hidden_width()

    def projection(in_dim: int) -> int:
        n = in_dim * d + d
        if spec.mlp:
            n += in_dim * hidden + hidden + 2 * hidden + hidden * d + d  # Linear, LayerNorm, Linear
        return n

    def feature_tower(in_dim: int) -> int:
        if spec.mlp_layers == 1:
            return projection(in_dim)
        inner = (spec.mlp_layers - 2) * (hidden * hidden + hidden)
        return in_dim * hidden + hidden + inner + hidden * d + d

    def pooling(mode: str) -> int:
        return d + 1 if mode == "attention" else 0

    def gru(in_dim: int) -> int:  # one direction of one layer: weight_ih, weight_hh, two biases
        return 3 * d * (in_dim + d + 2)

    head = head_parameters(config.metric, d, config.head_block_size() or 0)
    sides = 1 if spec.task == "labels" else 2
    if spec.encoder == "identity":
        inputs = [spec.image_dim] if spec.task == "labels" else [spec.image_dim, spec.text_dim or 0]
        return (sum(f * d + d for f in inputs) if spec.adapter else 0) + head
    if spec.encoder == "frozen":
        adapters = sides * (d * d + d) if spec.adapter else 0
        return count_parameters(dataclasses.replace(spec, encoder="trained", adapter=False), config) + adapters
    if spec.task == "labels":
        return feature_tower(spec.image_dim) + head
    if spec.image_kind == "features":
        image = feature_tower(spec.image_dim)
    else:
        image = projection(spec.image_dim) + pooling(spec.pooling if spec.image_kind == "regions" else "mean")
    if spec.text_kind == "captions":
        assert spec.vocab_size is not None
        inputs = [spec.word_dim] + [2 * d] * (spec.gru_layers - 1)
        text = spec.vocab_size * spec.word_dim + 2 * sum(gru(n) for n in inputs) + pooling(spec.pooling)
    else:
        assert spec.text_dim is not None
        text = feature_tower(spec.text_dim)
    return image + text + head


def check_fits_memory(spec: EncoderSpec, config: TrainConfig, available: int | None = None) -> None:
    """Refuse a model whose float32 weights alone exceed the memory available now (``available`` bytes, by
    default read from the machine); training needs about four times that (gradients, two AdamW moments)."""
    from gssf_cli.core.files import available_memory, format_bytes

    available = available_memory() if available is None else available
    parameters = count_parameters(spec, config)
    needed = parameters * FLOAT32_BYTES
    if available is not None and needed > available:
        raise UserInputError(
            f"train: with embed_dim {spec.embed_dim} and word_dim {spec.word_dim} the model would have {parameters:,} parameters, "
            f"{needed:,} bytes ({format_bytes(needed)}) as float32 before any training state, but this machine has "
            f"{available:,} bytes ({format_bytes(available)}) available; lower --embed-dim "
            "(or --word-dim, --gru-layers, --mlp-layers, --mlp-hidden, the metric's block size)"
        )


def build_objective(config: TrainConfig) -> nn.Module:
    return make_objective(
        config.loss,
        margin=config.margin,
        temperature=config.temperature,
        distill_weight=config.distill_weight,
        distill_kind=config.distill_kind,
    )


@torch.no_grad()
def embed_split(
    model: RetrievalModel, split: Split, device: torch.device, batch_size: int = 256
) -> tuple[Tensor, Tensor]:
    """Embeddings of a whole split: images ``[N, D]`` and texts ``[kN, D]`` (label-based: both ``[N, D]``)."""
    was_training = model.training
    model.eval()
    images = [
        model.encode_images(split.image_batch(np.arange(s, min(s + batch_size, split.num_images))).to(device))
        for s in range(0, split.num_images, batch_size)
    ]
    image_emb = torch.cat(images)
    if split.task == "labels":
        model.train(was_training)
        return image_emb, image_emb
    texts = []
    for start in range(0, split.num_pairs, batch_size):
        tokens, lengths = split.text_batch(np.arange(start, min(start + batch_size, split.num_pairs)))
        texts.append(model.encode_texts(tokens.to(device), None if lengths is None else lengths.to(device)))
    model.train(was_training)
    return image_emb, torch.cat(texts)


@dataclasses.dataclass(frozen=True)
class SplitScorer:
    """What the ranking code reads of a split under a model: ``images [N, ·]`` and ``texts [kN, ·]`` rows and
    ``score_fn(image rows [b, ·], text rows [m, ·]) -> [b, m]``.

    Why one shape for both families: metrics, protocols, per-query values and the tie rule are written once over
    row blocks of S (:mod:`gssf_cli.evaluation.crossmodal`). For an embedding model the rows are the embeddings
    ``[N, D]`` and the score is the metric head. For an interaction model they are row numbers ``[N, 1]`` into
    the split's token sets (``tokens``), and the score function runs the interaction on the rows it is given, so
    every image–caption pair is scored exactly and only a block of S is ever held. ``pooled``: pooled embeddings
    ``(images [N, D], texts [kN, D])`` that a shortlist ranks by: an embedding model's own; for an interaction
    model the L2-normalised mean of the unit tokens it compares (closer to its scores than the towers' pooling).
    """

    images: Tensor
    texts: Tensor
    score_fn: Any
    pooled: tuple[Tensor, Tensor]
    tokens: TokenSets | None = None


def split_scorer(model: RetrievalModel, split: Split, device: torch.device, batch_size: int = 256) -> SplitScorer:
    """The :class:`SplitScorer` of ``split`` under ``model``, embedded and scored on ``device``."""
    if model.interaction is None:
        images, texts = embed_split(model, split, device, batch_size)
        return SplitScorer(images, texts, model.similarity.scores, (images, texts))
    tokens = embed_split_tokens(model, split, device, batch_size)
    interaction = model.interaction
    pooled = (l2_normalize(tokens.regions.mean(dim=1)), l2_normalize(tokens.words.sum(dim=1)))

    @torch.no_grad()  # a score for ranking: never a graph through the metric's weights
    def score_fn(image_rows: Tensor, text_rows: Tensor) -> Tensor:
        i, t = image_rows[:, 0].long(), text_rows[:, 0].long()
        return interaction(tokens.regions[i], tokens.words[t], tokens.mask[t])

    def rows(count: int) -> Tensor:
        return torch.arange(count, dtype=torch.float32, device=tokens.regions.device).unsqueeze(1)

    return SplitScorer(rows(split.num_images), rows(split.num_pairs), score_fn, pooled, tokens)


@torch.no_grad()
def embed_split_tokens(model: RetrievalModel, split: Split, device: torch.device, batch_size: int = 256) -> TokenSets:
    """A cross-modal split's token sets on ``device``: regions ``[N, R, D]``, words ``[kN, L, D]`` padded to the
    split's longest caption, and their mask ``[kN, L]``."""
    was_training = model.training
    model.eval()
    regions = torch.cat(
        [
            model.encode_image_tokens(split.image_batch(np.arange(s, min(s + batch_size, split.num_images))).to(device))
            for s in range(0, split.num_images, batch_size)
        ]
    )
    parts: list[tuple[Tensor, Tensor]] = []
    for start in range(0, split.num_pairs, batch_size):
        tokens, lengths = split.text_batch(np.arange(start, min(start + batch_size, split.num_pairs)))
        words, mask = model.encode_text_tokens(tokens.to(device), None if lengths is None else lengths.to(device))
        parts.append((words, mask))
    model.train(was_training)
    longest = max(words.shape[1] for words, _ in parts)
    words = torch.cat([nn.functional.pad(w, (0, 0, 0, longest - w.shape[1])) for w, _ in parts])
    mask = torch.cat([nn.functional.pad(m, (0, longest - m.shape[1])) for _, m in parts])
    return TokenSets(regions, words, mask)


HEAD_READ_BATCH = 4096


@torch.no_grad()
def embed_for_head(model: RetrievalModel, array: np.ndarray, side: str, name: str) -> np.ndarray:
    """An array of embeddings ``[N, F]`` as ``model``'s metric head reads them, ``[N, D]``, on side ``image``
    (the head's query side) or ``text`` (label-based models have one side). For a head-only model the array holds
    what its adapters read (``identity``: features like the dataset's; ``frozen``: the frozen towers' outputs),
    and they apply, after an L2 norm; for a trained model, its towers' outputs, L2-normalised. An array of another
    width is a one-line error naming ``name``."""
    encoder = model.encoder
    tower = getattr(encoder, side, None) if isinstance(encoder, DualEncoder) else getattr(encoder, "encoder", None)
    if isinstance(tower, HeadOnlyTower):
        width, what = (
            tower.feature_dim,
            ("the features of its dataset" if tower.tower is None else "its frozen towers' outputs"),
        )
    else:
        width, what = model.similarity.dim, "its towers' outputs"
    if array.ndim != 2 or array.shape[1] != width:
        raise UserInputError(
            f"{name}: rows of {array.shape[-1] if array.ndim else 0} values, but the head reads {width} ({what}); "
            "give embeddings of that size"
        )
    parts = []
    for start in range(0, len(array), HEAD_READ_BATCH):
        x = torch.from_numpy(np.ascontiguousarray(array[start : start + HEAD_READ_BATCH], dtype=np.float32))
        parts.append((tower.adapt(x) if isinstance(tower, HeadOnlyTower) else l2_normalize(x)).numpy())
    return np.concatenate(parts) if parts else np.zeros((0, model.similarity.dim), np.float32)


def load_weights(model: nn.Module, weights: dict[str, Any]) -> None:
    """Load a checkpoint's tensors, reporting a mismatch (a missing, unexpected or differently shaped tensor) as
    one readable line naming the tensor."""
    expected = model.state_dict()
    for name, tensor in weights.items():
        if name in expected and tuple(tensor.shape) != tuple(expected[name].shape):
            raise UserInputError(
                f"checkpoint does not fit the model: tensor {name} has shape {list(tensor.shape)}, the model's "
                f"{list(expected[name].shape)} (was the checkpoint trained with other settings or data?)"
            )
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise UserInputError(
            f"checkpoint does not fit the model (missing {len(missing)} tensors, e.g. {missing[:1]}; "
            f"unexpected {len(unexpected)}, e.g. {unexpected[:1]})"
        )
