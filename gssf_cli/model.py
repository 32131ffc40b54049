"""The trainable whole: encoders plus a GSSF metric head, and what is built from a dataset's manifest.

Why one module: training, evaluation of a run and export all need the same model from the same config and
manifest; building it in one place keeps them in agreement.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gssf_cli import limits
from gssf_cli.config import TrainConfig
from gssf_cli.data.dataset import Dataset, Split
from gssf_cli.encoders import EncoderSpec, build_encoder, parameter_counts
from gssf_cli.errors import UserInputError
from gssf_cli.losses import make_objective
from gssf_cli.similarity import Similarity, make_similarity


class RetrievalModel(nn.Module):
    """Encoders ``[B, ...] -> [B, D]`` (L2-normalised) and a similarity ``[Bi, D] x [Bt, D] -> [Bi, Bt]``.

    For label-based data one tower encodes both sides (anchors and positives are the same modality).
    """

    def __init__(self, encoder: nn.Module, similarity: Similarity, task: str) -> None:
        super().__init__()
        self.encoder = encoder
        self.similarity = similarity
        self.task = task

    def encode_images(self, images: Tensor) -> Tensor:
        return self.encoder.encode_image(images)  # type: ignore[operator]

    def encode_texts(self, texts: Tensor, lengths: Tensor | None = None) -> Tensor:
        if self.task == "labels":
            return self.encoder.encode_image(texts)  # type: ignore[operator]
        return self.encoder.encode_text(texts, lengths)  # type: ignore[operator]

    def scores(self, images: Tensor, texts: Tensor) -> Tensor:
        return self.similarity.scores(images, texts)

    def parameter_counts(self) -> dict[str, int]:
        counts = {f"encoder_{k}": v for k, v in parameter_counts(self.encoder).items()}
        counts["metric_head"] = self.similarity.num_parameters()
        counts["total"] = sum(p.numel() for p in self.parameters())
        return counts


def encoder_spec(dataset: Dataset, config: TrainConfig) -> EncoderSpec:
    return manifest_spec(dataset.manifest, config)


def manifest_spec(manifest: dict[str, Any], config: TrainConfig) -> EncoderSpec:
    """The encoders ``config`` builds for a dataset with this ``manifest.json``."""
    return EncoderSpec.from_manifest(
        manifest,
        embed_dim=config.embed_dim,
        word_dim=config.word_dim,
        pooling=config.pooling,
        mlp=config.mlp,
        gru_layers=config.gru_layers,
    )


def build_model(dataset: Dataset, config: TrainConfig) -> RetrievalModel:
    """The model of ``config`` for ``dataset``; refused up front (:func:`check_fits_memory`) when its weights
    alone would not fit in this machine's memory, rather than failing (or swapping) inside the allocator."""
    return build_model_for(dataset.manifest, config)


def build_model_for(manifest: dict[str, Any], config: TrainConfig) -> RetrievalModel:
    """:func:`build_model` from a dataset's ``manifest.json`` alone (a served model carries no dataset)."""
    spec = manifest_spec(manifest, config)
    check_fits_memory(spec, config)
    encoder = build_encoder(spec)
    block = config.block_size if config.uses_block_size() else None
    similarity = make_similarity(config.metric, config.embed_dim, block, norm=config.metric_norm)
    return RetrievalModel(encoder, similarity, str(manifest["task"]))


FLOAT32_BYTES = 4


def count_parameters(spec: EncoderSpec, config: TrainConfig) -> int:
    """The learned parameters :func:`build_model` would create, computed from the spec and the config alone (no
    allocation, any size); a test proves it equals the built model's count for every kind of tower."""
    d = spec.embed_dim

    def projection(in_dim: int) -> int:
        n = in_dim * d + d
        if spec.mlp:
            hidden = max(d // 2, 1)
            n += in_dim * hidden + hidden + 2 * hidden + hidden * d + d  # Linear, LayerNorm, Linear
        return n

    def pooling(mode: str) -> int:
        return d + 1 if mode == "attention" else 0

    def gru(in_dim: int) -> int:  # one direction of one layer: weight_ih, weight_hh, two biases
        return 3 * d * (in_dim + d + 2)

    head = limits.head_parameters(config.metric, d, config.block_size if config.uses_block_size() else 0)
    if spec.task == "labels":
        return projection(spec.image_dim) + head
    if spec.image_kind == "features":
        image = projection(spec.image_dim)
    else:
        image = projection(spec.image_dim) + pooling(spec.pooling if spec.image_kind == "regions" else "mean")
    if spec.text_kind == "captions":
        assert spec.vocab_size is not None
        inputs = [spec.word_dim] + [2 * d] * (spec.gru_layers - 1)
        text = spec.vocab_size * spec.word_dim + 2 * sum(gru(n) for n in inputs) + pooling(spec.pooling)
    else:
        assert spec.text_dim is not None
        text = projection(spec.text_dim)
    return image + text + head


def check_fits_memory(spec: EncoderSpec, config: TrainConfig, available: int | None = None) -> None:
    """Refuse a model whose float32 weights alone exceed the memory available now (``available`` bytes, by
    default read from the machine); training needs about four times that (gradients, two AdamW moments)."""
    from gssf_cli.data.files import available_memory, format_bytes

    available = available_memory() if available is None else available
    parameters = count_parameters(spec, config)
    needed = parameters * FLOAT32_BYTES
    if available is not None and needed > available:
        raise UserInputError(
            f"train: with embed_dim {spec.embed_dim} and word_dim {spec.word_dim} the model would have {parameters:,} parameters, "
            f"{needed:,} bytes ({format_bytes(needed)}) as float32 before any training state, but this machine has "
            f"{available:,} bytes ({format_bytes(available)}) available; lower --embed-dim "
            "(or --word-dim, --gru-layers, the metric's block size)"
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
