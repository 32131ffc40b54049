"""The interaction-based family: a pair's score from the towers' token outputs, with the GSSF family as the token
similarity.

Why: the GSSF paper plugs its learned similarity into two families. The embedding family scores pooled embeddings
(:mod:`gssf_cli.modeling.similarity`); this module is the other, where each word meets the image's regions.

- ``scan-t2i`` (SCAN, Lee et al., ECCV 2018): each word attends over the regions with
  ``softmax_r(λ₁ · clipped_l2norm(s(v_r, e_l)))``, where clipped_l2norm is LeakyReLU(0.1) then an L2 norm over the
  words of the caption; the word is compared with its attended image vector ``a_l = Σ_r α_lr v_r``, and the
  relevances ``R_l = s(a_l/|a_l|, e_l)`` aggregate over words by LogSumExp ``log Σ_l exp(λ₂ R_l) / λ₂`` or mean.
- ``scan-i2t``: the mirror image — each region attends over the caption's words (norm over regions, softmax
  over words), and the relevances aggregate over regions.
- ``maxsim`` (late interaction, ColBERT / FILIP): ``mean_l max_r s(v_r, e_l)`` over the valid words.

``s`` is a GSSF member (cosine, diag, bdiag, dense, gssf) with the image side transformed: ``s(x, y) =
transform(x) · y``. ``gssf_at`` says where SCAN uses it — the relevance (the paper's (b), fine-grained alignment),
the attention logits ((a), the attention mechanism) or both; elsewhere cosine. At initialisation every member is
cosine, so every choice starts as the published SCAN.

How it stays cheap: the attended vectors ``[Bi, Bt, L, D]`` are never built. The learned map is linear, so
``transform(a_l) · e_l = Σ_r α_lr (transform(v_r) · e_l)`` and ``|a_l|² = αᵀ (V Vᵀ) α``: everything is a
reduction of the token-similarity tensor ``[Bi, Bt, R, L]`` (one GEMM of all regions against all words, two when
attention and relevance use different similarities) plus an ``R × R`` (or ``L × L``) Gram product. Pairs are
scored in blocks of images × captions whose working set stays within a budget; under autograd each block is
recomputed in the backward pass (activation checkpointing), so training memory is bounded too.

Shapes: regions ``[Bi, R, D]`` (unit rows), words ``[Bt, L, D]`` (unit rows, zero at padding), ``mask [Bt, L]``
(True at valid words; every caption has at least one).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from gssf_cli.core.limits import INTERACTIONS, SCAN_SETTINGS
from gssf_cli.modeling.similarity import Similarity

LEAKY_SLOPE = 0.1
"""SCAN's clipped_l2norm: ``LeakyReLU(0.1)`` before the L2 norm."""
EPS = 1e-8
BLOCK_ELEMENTS = 2**22
"""Token-pair similarities ``Bi·Bt·R·L`` one block holds (16 MiB each as float32; a block keeps about six such
tensors alive): the bound on the working set, in training and evaluation alike."""


class TokenSets(NamedTuple):
    """What the towers hand the interaction: regions ``[B, R, D]``, words ``[B', L, D]``, ``mask [B', L]``."""

    regions: Tensor
    words: Tensor
    mask: Tensor


class Interaction(nn.Module):
    """Pair scores ``[Bi, Bt]`` from token sets, with ``similarity`` (a GSSF member, owned by the model) as the
    token similarity. No parameters of its own: SCAN's λs are fixed, as in SCAN."""

    def __init__(
        self,
        kind: str,
        similarity: Similarity,
        gssf_at: str = "relevance",
        aggregate: str = "lse",
        lambda_softmax: float = 1.0,
        lambda_lse: float = 1.0,
    ) -> None:
        super().__init__()
        if kind not in INTERACTIONS or kind == "none":
            raise ValueError(f"not an interaction: {kind!r}")
        self.kind, self.gssf_at, self.aggregate = kind, gssf_at, aggregate
        self.lambda_softmax, self.lambda_lse = lambda_softmax, lambda_lse
        self.similarity = [similarity]  # a list: the model owns (and saves) the similarity, not this module

    @property
    def metric(self) -> Similarity:
        return self.similarity[0]

    def learned_in_attention(self) -> bool:
        return self.kind == "maxsim" or self.gssf_at in ("attention", "both")

    def learned_in_relevance(self) -> bool:
        return self.kind == "maxsim" or self.gssf_at in ("relevance", "both")

    def forward(self, regions: Tensor, words: Tensor, mask: Tensor) -> Tensor:
        """``[Bi, Bt]`` scores of every image against every caption, in blocks (:data:`BLOCK_ELEMENTS`)."""
        bi, r, _ = regions.shape
        bt, length, _ = words.shape
        per_caption = max(1, BLOCK_ELEMENTS // max(1, r * length))
        images_per_block = max(1, min(bi, per_caption))
        captions_per_block = max(1, min(bt, per_caption // images_per_block))
        rows = []
        for i in range(0, bi, images_per_block):
            part = regions[i : i + images_per_block]
            columns = [
                self._block(part, words[t : t + captions_per_block], mask[t : t + captions_per_block])
                for t in range(0, bt, captions_per_block)
            ]
            rows.append(torch.cat(columns, dim=1))
        return torch.cat(rows, dim=0)

    def _block(self, regions: Tensor, words: Tensor, mask: Tensor) -> Tensor:
        if torch.is_grad_enabled() and (regions.requires_grad or words.requires_grad):
            out: Tensor = checkpoint(self.all_pairs, regions, words, mask, use_reentrant=False)
            return out
        return self.all_pairs(regions, words, mask)

    def all_pairs(self, regions: Tensor, words: Tensor, mask: Tensor) -> Tensor:
        """``[bi, bt]``: every image of ``regions [bi, R, D]`` against every caption of ``words [bt, L, D]``."""
        bi, r, d = regions.shape
        bt, length, _ = words.shape
        flat_words = words.reshape(bt * length, d).T

        def token_similarity(left: Tensor) -> Tensor:
            return (left.reshape(bi * r, d) @ flat_words).view(bi, r, bt, length).permute(0, 2, 1, 3)

        cosine = (
            token_similarity(regions) if not (self.learned_in_attention() and self.learned_in_relevance()) else None
        )
        learned = token_similarity(self.metric.transform(regions)) if self.metric.name != "cosine" else None
        if learned is None:
            learned = cosine if cosine is not None else token_similarity(regions)
        attention = learned if self.learned_in_attention() else cosine
        relevance = learned if self.learned_in_relevance() else cosine
        assert attention is not None and relevance is not None
        return self.pair_scores(
            attention, relevance, gram(regions).unsqueeze(1), gram(words).unsqueeze(0), mask.unsqueeze(0)
        )

    def pairs(self, regions: Tensor, words: Tensor, mask: Tensor) -> Tensor:
        """``[P]``: image ``p`` of ``regions [P, R, D]`` against caption ``p`` of ``words [P, L, D]`` only (a
        shortlist's re-scoring)."""
        cosine = torch.einsum("prd,pld->prl", regions, words)
        learned = torch.einsum("prd,pld->prl", self.metric.transform(regions), words)
        attention = learned if self.learned_in_attention() else cosine
        relevance = learned if self.learned_in_relevance() else cosine
        return self.pair_scores(attention, relevance, gram(regions), gram(words), mask)

    def pair_scores(
        self, attention: Tensor, relevance: Tensor, region_gram: Tensor, word_gram: Tensor, mask: Tensor
    ) -> Tensor:
        """Scores ``[...]`` from token similarities ``[..., R, L]`` (for the attention logits and for the
        relevance), the Gram matrices ``[..., R, R]`` and ``[..., L, L]`` and the word mask ``[..., L]`` (leading
        axes broadcast: ``[bi, bt]`` for all pairs, ``[P]`` for matched ones)."""
        valid = mask.unsqueeze(-2)  # [..., 1, L]
        if self.kind == "maxsim":
            best = relevance.masked_fill(~valid, float("-inf")).amax(dim=-2)  # [..., L]
            return masked_mean(best, mask)
        clipped = F.leaky_relu(attention, LEAKY_SLOPE).masked_fill(~valid, 0.0)
        if self.kind == "scan-t2i":
            clipped = clipped / (clipped.pow(2).sum(dim=-1, keepdim=True).sqrt() + EPS)  # over words
            alpha = torch.softmax(self.lambda_softmax * clipped, dim=-2)  # over regions, [..., R, L]
            dot = (alpha * relevance).sum(dim=-2)  # [..., L]
            squared_norm = (alpha * (region_gram @ alpha)).sum(dim=-2)
            scores = dot / squared_norm.clamp_min(EPS * EPS).sqrt()
            return self._aggregate(scores, mask)
        clipped = clipped / (clipped.pow(2).sum(dim=-2, keepdim=True).sqrt() + EPS)  # over regions
        logits = (self.lambda_softmax * clipped).masked_fill(~valid, float("-inf"))
        beta = torch.softmax(logits, dim=-1)  # over words, [..., R, L]
        dot = (beta * relevance).sum(dim=-1)  # [..., R]
        squared_norm = (beta * (beta @ word_gram)).sum(dim=-1)
        scores = dot / squared_norm.clamp_min(EPS * EPS).sqrt()
        return self._aggregate(scores, None)

    def _aggregate(self, relevances: Tensor, mask: Tensor | None) -> Tensor:
        """One score per pair from relevances ``[..., K]`` (words under ``mask`` ``[..., K]``, or regions)."""
        if self.aggregate == "mean":
            return relevances.mean(dim=-1) if mask is None else masked_mean(relevances, mask)
        scaled = self.lambda_lse * relevances
        if mask is not None:
            scaled = scaled.masked_fill(~mask, float("-inf"))
        return torch.logsumexp(scaled, dim=-1) / self.lambda_lse

    def extra_repr(self) -> str:
        if self.kind == "maxsim":
            return f"kind={self.kind!r}"
        return (
            f"kind={self.kind!r}, gssf_at={self.gssf_at!r}, aggregate={self.aggregate!r}, "
            f"lambda_softmax={self.lambda_softmax:g}, lambda_lse={self.lambda_lse:g}"
        )


def gram(tokens: Tensor) -> Tensor:
    """``[B, N, D] -> [B, N, N]``: inner products of each set's tokens (``|Σ_n w_n t_n|² = wᵀ G w``)."""
    return tokens @ tokens.transpose(-1, -2)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values [..., L]`` over ``mask [..., L]`` (broadcast)."""
    weights = mask.to(values.dtype)
    return (values.masked_fill(~mask, 0.0) * weights).sum(dim=-1) / weights.sum(dim=-1).clamp_min(1.0)


def make_interaction(
    kind: str,
    similarity: Similarity,
    gssf_at: str | None = None,
    aggregate: str | None = None,
    lambda_softmax: float | None = None,
    lambda_lse: float | None = None,
) -> Interaction | None:
    """The interaction ``kind`` over ``similarity`` (None for ``none``); SCAN's unset settings take the
    published defaults of the direction (:data:`~gssf_cli.core.limits.SCAN_SETTINGS`)."""
    if kind == "none":
        return None
    published = SCAN_SETTINGS.get(kind)
    if published is None:
        return Interaction(kind, similarity)
    return Interaction(
        kind,
        similarity,
        gssf_at or "relevance",
        aggregate or published.aggregate,
        published.lambda_softmax if lambda_softmax is None else lambda_softmax,
        published.lambda_lse if lambda_lse is None else lambda_lse,
    )
