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

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from gssf_cli.core.limits import INTERACTIONS, SCAN_SETTINGS, TOKEN_BLOCK_ELEMENTS, token_block_shape
from gssf_cli.modeling.similarity import Similarity

LEAKY_SLOPE = 0.1
"""SCAN's clipped_l2norm: ``LeakyReLU(0.1)`` before the L2 norm."""
EPS = 1e-8
BLOCK_ELEMENTS = TOKEN_BLOCK_ELEMENTS
"""Token pairs ``Bi·Bt·R·L`` one block holds (4 MiB each as float32; a block keeps about six such tensors alive)."""


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
        """``[Bi, Bt]`` scores of every image against every caption, in blocks (:data:`BLOCK_ELEMENTS`). What
        depends on one side only — the transformed regions, both Gram matrices — is computed once, not per block."""
        bi, r, _ = regions.shape
        bt, length, _ = words.shape
        images_per_block, captions_per_block = block_shape(bi, r, bt, length)
        words = words * mask.unsqueeze(-1).to(words.dtype)
        learned = self._learned(regions)
        region_gram, word_gram = self._grams(regions, words)
        rows = []
        for i in range(0, bi, images_per_block):
            image = slice(i, i + images_per_block)
            side = (regions[image], None if learned is None else learned[image], _part(region_gram, image))
            columns = []
            for t in range(0, bt, captions_per_block):
                caption = slice(t, t + captions_per_block)
                columns.append(self._block(*side, words[caption], _part(word_gram, caption), mask[caption]))
            rows.append(torch.cat(columns, dim=1))
        return torch.cat(rows, dim=0)

    def _learned(self, regions: Tensor) -> Tensor | None:
        """The transformed regions ``[B, R, D]`` (None for cosine, whose transform is the identity)."""
        if self.metric.name == "cosine":
            return None
        return self.metric.transform(regions)

    def _grams(self, regions: Tensor, words: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """The Gram matrices SCAN's attended-vector norms need: regions ``[Bi, R, R]`` (t2i), words ``[Bt, L, L]``
        (i2t); None where unused."""
        return (gram(regions) if self.kind == "scan-t2i" else None, gram(words) if self.kind == "scan-i2t" else None)

    def _block(
        self,
        regions: Tensor,
        learned: Tensor | None,
        region_gram: Tensor | None,
        words: Tensor,
        word_gram: Tensor | None,
        mask: Tensor,
    ) -> Tensor:
        needs_grad = any(t is not None and t.requires_grad for t in (regions, learned, region_gram, words, word_gram))
        if torch.is_grad_enabled() and needs_grad:
            out: Tensor = checkpoint(
                self.score_block, regions, learned, region_gram, words, word_gram, mask, use_reentrant=False
            )
            return out
        return self.score_block(regions, learned, region_gram, words, word_gram, mask)

    def all_pairs(self, regions: Tensor, words: Tensor, mask: Tensor) -> Tensor:
        """``[bi, bt]``: every image of ``regions [bi, R, D]`` against every caption of ``words [bt, L, D]``, in
        one block."""
        words = words * mask.unsqueeze(-1).to(words.dtype)
        region_gram, word_gram = self._grams(regions, words)
        return self.score_block(regions, self._learned(regions), region_gram, words, word_gram, mask)

    def score_block(
        self,
        regions: Tensor,
        learned: Tensor | None,
        region_gram: Tensor | None,
        words: Tensor,
        word_gram: Tensor | None,
        mask: Tensor,
    ) -> Tensor:
        """``[bi, bt]`` from one block's tensors: regions ``[bi, R, D]`` (and transformed, or None for cosine),
        their Gram ``[bi, R, R]``, words ``[bt, L, D]`` (zero at padding), their Gram ``[bt, L, L]``, ``mask
        [bt, L]``.

        The token similarities come out of one GEMM already in the layout the direction reduces over:
        ``[bi, R, bt, L]`` (the attended side outer) for t2i and maxsim, ``[bt, L, bi, R]`` for i2t, so the norm
        ``αᵀ G α`` is one batched product with the attended side's Gram."""
        bi, r, d = regions.shape
        bt, length, _ = words.shape
        t2i = self.kind != "scan-i2t"

        def token_similarity(left: Tensor) -> Tensor:
            if t2i:
                return (left.reshape(bi * r, d) @ words.reshape(bt * length, d).T).view(bi, r, bt, length)
            return (words.reshape(bt * length, d) @ left.reshape(bi * r, d).T).view(bt, length, bi, r)

        both_learned = self.learned_in_attention() and self.learned_in_relevance()
        cosine = token_similarity(regions) if learned is None or not both_learned else None
        similar = token_similarity(learned) if learned is not None else cosine
        attention = similar if self.learned_in_attention() else cosine
        relevance = similar if self.learned_in_relevance() else cosine
        assert attention is not None and relevance is not None
        if self.kind == "maxsim":
            return masked_mean(relevance.amax(dim=1), mask.unsqueeze(0))
        if t2i:
            assert region_gram is not None
            return self._aggregate(self.attend(attention, relevance, region_gram, None), mask.unsqueeze(0))
        assert word_gram is not None
        return self._aggregate(self.attend(attention, relevance, word_gram, mask), None).T

    def attend(self, attention: Tensor, relevance: Tensor, gram_: Tensor, context_mask: Tensor | None) -> Tensor:
        """SCAN's relevances ``[C, Q, q]`` from token similarities ``[C, c, Q, q]`` between ``C`` context sets of
        ``c`` tokens (attended over) and ``Q`` query sets of ``q`` tokens, and the contexts' Gram ``[C, c, c]``:
        clipped logits normalised over the query's tokens, softmax (× λ₁) over the context's valid tokens
        (``context_mask [C, c]``), then each query token against its attended vector, ``Σ α s / |Σ α t|``."""
        contexts, c, queries, q = attention.shape
        clipped = F.leaky_relu(attention, LEAKY_SLOPE)
        norm = clipped.pow(2).sum(dim=-1, keepdim=True).clamp_min(EPS * EPS).sqrt()  # no NaN gradient at 0
        scale = self.lambda_softmax / (norm + EPS)
        logits = clipped * scale
        if context_mask is not None:
            logits = logits.masked_fill(~context_mask.view(contexts, c, 1, 1), float("-inf"))
        alpha = torch.softmax(logits, dim=1)
        dot = (alpha * relevance).sum(dim=1)
        spread = torch.bmm(gram_, alpha.reshape(contexts, c, queries * q)).view(contexts, c, queries, q)
        return dot / (alpha * spread).sum(dim=1).clamp_min(EPS * EPS).sqrt()

    def pairs(self, regions: Tensor, words: Tensor, mask: Tensor) -> Tensor:
        """``[P]``: image ``p`` of ``regions [P, R, D]`` against caption ``p`` of ``words [P, L, D]`` only."""
        words = words * mask.unsqueeze(-1).to(words.dtype)
        learned = self._learned(regions)
        t2i = self.kind != "scan-i2t"
        pattern = "prd,pld->prl" if t2i else "prd,pld->plr"
        cosine = torch.einsum(pattern, regions, words).unsqueeze(2)  # [P, c, 1, q]
        similar = cosine if learned is None else torch.einsum(pattern, learned, words).unsqueeze(2)
        attention = similar if self.learned_in_attention() else cosine
        relevance = similar if self.learned_in_relevance() else cosine
        if self.kind == "maxsim":
            return masked_mean(relevance.amax(dim=1), mask.unsqueeze(1))[:, 0]
        if t2i:
            return self._aggregate(self.attend(attention, relevance, gram(regions), None), mask.unsqueeze(1))[:, 0]
        return self._aggregate(self.attend(attention, relevance, gram(words), mask), None)[:, 0]

    def _aggregate(self, relevances: Tensor, mask: Tensor | None) -> Tensor:
        """One score per pair from relevances ``[..., K]`` (words under ``mask`` ``[..., K]``, or regions)."""
        if self.aggregate == "mean":
            return relevances.mean(dim=-1) if mask is None else masked_mean(relevances, mask)
        scaled = self.lambda_lse * relevances
        if mask is not None:
            scaled = scaled.masked_fill(~mask, float("-inf"))
        return torch.logsumexp(scaled, dim=-1) / self.lambda_lse

    def settings(self) -> dict[str, Any]:
        """What scores a pair: the kind, and for SCAN where the metric acts, the aggregate and the λs."""
        if self.kind == "maxsim":
            return {"kind": self.kind}
        return {"kind": self.kind, "gssf_at": self.gssf_at, "aggregate": self.aggregate,
                "lambda_softmax": self.lambda_softmax, "lambda_lse": self.lambda_lse}  # fmt: skip

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.settings().items())


def block_shape(images: int, regions: int, captions: int, words: int) -> tuple[int, int]:
    """Images and captions per block within :data:`BLOCK_ELEMENTS` (:func:`gssf_cli.core.limits.token_block_shape`)."""
    return token_block_shape(images, regions, captions, words, BLOCK_ELEMENTS)


def _part(tensor: Tensor | None, rows: slice) -> Tensor | None:
    return None if tensor is None else tensor[rows]


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
