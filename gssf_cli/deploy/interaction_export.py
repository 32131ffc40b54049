"""The token-level half of an ONNX bundle: towers that also give token sets, and the interaction scorer.

Why a graph of its own: an interaction model's pair score is not an inner product of two vectors, so the bundle
carries the interaction itself (``scorer.onnx``) beside towers whose second output is what it reads. What the
bundle holds (:data:`gssf_cli.deploy.bundle.INTERACTION_GRAPHS`):

- ``image_encoder``: features ``[N, R, F]`` (or ``[N, F]``: one region) → ``embeddings [N, D]`` (the tower's pooled
  output, as the embedding bundle's) and ``regions [N, R, D]``: the projected, L2-normalised regions;
- ``text_encoder``: ``tokens [M, L]`` + ``lengths [M]`` → ``embeddings [M, D]`` and ``words [M, L, D]``: unit word
  states, zero at padding;
- ``metric_head``: ``[K, D] → [K, D]``, the learned token similarity as a transform of the image side (``s(v, e) =
  head(v) · e``), what a token index stores (:mod:`gssf_cli.deploy.token_index`);
- ``scorer``: ``regions [N, R, D]``, ``words [M, L, D]``, ``lengths [M]`` → ``scores [N, M]``, every axis dynamic.
  It is :meth:`gssf_cli.modeling.interaction.Interaction.all_pairs` (one block; callers block the pairs:
  :func:`gssf_cli.deploy.bundle.score_token_sets`), with the mask built from the lengths inside the graph.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from gssf_cli.deploy.bundle import score_token_sets
from gssf_cli.deploy.rank_gate import allclose_report
from gssf_cli.modeling.encoders import ImageEncoder, TextEncoder, l2_normalize

if TYPE_CHECKING:
    from gssf_cli.core.stage_configs import ExportConfig
    from gssf_cli.data.dataset import Split
    from gssf_cli.modeling.interaction import Interaction
    from gssf_cli.modeling.model import RetrievalModel

IMAGE_OUTPUTS = ["embeddings", "regions"]
TEXT_OUTPUTS = ["embeddings", "words"]
"""A token tower's outputs: the pooled embedding first, so that code reading an embedding bundle's first output
reads the same from an interaction bundle; the token set second, named as the scorer's input it feeds."""


class TokenImageTower(nn.Module):
    """``features [B, R, F]`` (``[B, F]`` with ``global_features``) → ``(embeddings [B, D], tokens [B, R, D])``."""

    def __init__(self, tower: ImageEncoder, global_features: bool) -> None:
        super().__init__()
        self.tower, self.global_features = tower, global_features
        self.in_dim = int(tower.in_dim)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        regions = features.unsqueeze(1) if self.global_features else features
        return self.tower(regions), l2_normalize(self.tower.regions(regions))


class TokenTextTower(nn.Module):
    """``tokens [B, L]``, ``lengths [B]`` → ``(embeddings [B, D], tokens [B, L, D])``: one GRU pass for both."""

    def __init__(self, tower: TextEncoder) -> None:
        super().__init__()
        self.tower = tower

    def forward(self, tokens: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        states, mask = self.tower.token_states(tokens, lengths)
        pooled = l2_normalize(self.tower.pool(states, mask))
        # The identity gather takes B and L from the tokens: a GRU output's length axis exports as the example's
        # constant (see gssf_cli.modeling.encoders._gather_steps), which would freeze the words' declared shape.
        steps = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand(tokens.shape[0], -1)
        words = states.gather(1, steps.unsqueeze(-1).expand(-1, -1, states.shape[-1]))
        return pooled, l2_normalize(words) * mask.unsqueeze(-1).to(states.dtype)


class TokenScorer(nn.Module):
    """``regions [N, R, D]``, ``words [M, L, D]``, ``lengths [M]`` → ``[N, M]`` by the interaction. The metric is
    registered here so that its weights are this module's (the interaction only refers to it)."""

    def __init__(self, interaction: Interaction) -> None:
        super().__init__()
        self.interaction = interaction
        self.metric = interaction.metric

    def forward(self, regions: Tensor, words: Tensor, lengths: Tensor) -> Tensor:
        steps = torch.arange(words.shape[1], device=words.device).unsqueeze(0)
        return self.interaction.all_pairs(regions, words, steps < lengths.unsqueeze(1))


def token_towers(model: RetrievalModel, image_kind: str) -> dict[str, nn.Module]:
    """The interaction bundle's towers and scorer as modules (the metric head is the caller's, as for every
    bundle)."""
    assert model.interaction is not None
    image, text = model.encoder.image, model.encoder.text
    assert isinstance(image, ImageEncoder) and isinstance(text, TextEncoder)
    return {
        "image_encoder": TokenImageTower(image, image_kind == "global"),
        "text_encoder": TokenTextTower(text),
        "scorer": TokenScorer(model.interaction),
    }


def scorer_example(dim: int) -> tuple[tuple[Tensor, ...], dict[str, Any], list[str]]:
    """Example args, dynamic shapes and input names of the scorer: sizes > 1 and pairwise different (see
    :func:`gssf_cli.deploy.onnx_export.export_example`), lengths varying with one full caption."""
    gen = torch.Generator().manual_seed(0)
    images, regions, captions, length = 3, 5, 6, 7
    unit = lambda *shape: l2_normalize(torch.randn(*shape, generator=gen))  # noqa: E731
    lengths = torch.tensor([length, 2, 5, 3, 6, 4])
    args = (unit(images, regions, dim), unit(captions, length, dim), lengths)
    shapes = {
        "regions": {0: torch.export.Dim("images"), 1: torch.export.Dim("regions")},
        "words": {0: torch.export.Dim("captions"), 1: torch.export.Dim("length")},
        "lengths": {0: torch.export.Dim("captions")},
    }
    return args, shapes, list(shapes)


def scorer_parity(
    model: RetrievalModel, scorer: TokenScorer, session: Any, split: Split, config: ExportConfig
) -> list[dict[str, Any]]:
    """The scorer graph against torch on the split's own token sets at two shapes: the first ``parity_batch``
    images against the first 64 captions, and fewer images, regions and captions, each set of captions cut to
    its longest length."""
    regions, words, lengths = split_token_sample(model, split, config.parity_batch, 64)
    checks = []
    for images, keep, captions in ((len(regions), regions.shape[1], len(words)),
                                   (max(1, len(regions) // 2), max(1, regions.shape[1] - 1), max(1, len(words) // 3))):  # fmt: skip
        length = int(lengths[:captions].max())
        feed = (regions[:images, :keep].contiguous(), words[:captions, :length].contiguous(), lengths[:captions])
        expected = scorer(*feed).numpy()
        got = session.run(None, dict(zip(("regions", "words", "lengths"), (v.numpy() for v in feed), strict=True)))[0]
        checks.append({"images": images, "regions": keep, "captions": captions, "length": length,
                       **allclose_report(got, expected, config.atol, config.rtol)})  # fmt: skip
    return checks


def ort_split_tokens(
    sessions: dict[str, Any], split: Split, batch: int = 128
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A split's token sets through ONNX Runtime: regions ``[N, R, D]``, words ``[kN, L, D]`` padded to the split's
    longest caption, ``lengths [kN]``."""
    regions = np.concatenate([
        sessions["image_encoder"].run(["regions"], {"features": split.image_batch(np.arange(s, min(s + batch, split.num_images))).numpy()})[0]
        for s in range(0, split.num_images, batch)
    ])  # fmt: skip
    words, lengths = [], []
    for start in range(0, split.num_pairs, batch):
        tokens, length = split.text_batch(np.arange(start, min(start + batch, split.num_pairs)))
        assert length is not None
        feed = {"tokens": tokens.numpy(), "lengths": length.numpy()}
        words.append(sessions["text_encoder"].run(["words"], feed)[0])
        lengths.append(length.numpy())
    longest = max(w.shape[1] for w in words)
    padded = np.concatenate([np.pad(w, ((0, 0), (0, longest - w.shape[1]), (0, 0))) for w in words])
    return regions, padded, np.concatenate(lengths).astype(np.int64)


def split_scores(model: RetrievalModel, sessions: dict[str, Any], split: Split) -> tuple[np.ndarray, np.ndarray]:
    """``(torch scores, ONNX Runtime scores)``, both ``[N, kN]`` over the whole split: torch as evaluation scores
    it (:func:`gssf_cli.modeling.model.split_scorer`), ONNX Runtime from its own token sets through the scorer."""
    from gssf_cli.modeling.model import split_scorer

    scorer = split_scorer(model, split, torch.device("cpu"))
    torch_scores = scorer.score_fn(scorer.images, scorer.texts).numpy()
    return torch_scores, score_token_sets(sessions["scorer"], *ort_split_tokens(sessions, split))


def split_token_sample(
    model: RetrievalModel, split: Split, images: int, captions: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Torch token sets of the split's first ``images`` images and ``captions`` captions: regions, words, lengths."""
    with torch.no_grad():
        regions = model.encode_image_tokens(split.image_batch(np.arange(min(images, split.num_images))))
        tokens, lengths = split.text_batch(np.arange(min(captions, split.num_pairs)))
        assert lengths is not None
        words, _ = model.encode_text_tokens(tokens, lengths)
    return regions, words, lengths
