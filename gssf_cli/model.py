"""The trainable whole: encoders plus a GSSF metric head, and what is built from a dataset's manifest.

Why one module: training, evaluation of a run and export all need the same model from the same config and
manifest; building it in one place keeps them in agreement.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gssf_cli.config import TrainConfig
from gssf_cli.data.dataset import Dataset, Split
from gssf_cli.encoders import EncoderSpec, build_encoder, parameter_counts
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
    return EncoderSpec.from_manifest(
        dataset.manifest,
        embed_dim=config.embed_dim,
        word_dim=config.word_dim,
        pooling=config.pooling,
        mlp=config.mlp,
        gru_layers=config.gru_layers,
    )


def build_model(dataset: Dataset, config: TrainConfig) -> RetrievalModel:
    encoder = build_encoder(encoder_spec(dataset, config))
    block = config.block_size if config.uses_block_size() else None
    similarity = make_similarity(config.metric, config.embed_dim, block, norm=config.metric_norm)
    return RetrievalModel(encoder, similarity, dataset.task)


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
    """Load a checkpoint's tensors, reporting a mismatch as one readable line."""
    from gssf_cli.errors import UserInputError

    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise UserInputError(
            f"checkpoint does not fit the model (missing {len(missing)} tensors, e.g. {missing[:1]}; "
            f"unexpected {len(unexpected)}, e.g. {unexpected[:1]})"
        )
