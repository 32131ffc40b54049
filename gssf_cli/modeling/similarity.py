"""The GSSF similarity family: masked bilinear scores ``xᵀ (W ⊙ U) y`` as plug-and-play ``torch.nn.Module`` s.

Embeddings ``x, y ∈ R^D`` are L2-normalised by the caller. Each member fixes a binary mask ``U`` saying which
channel pairs may interact and learns only the entries of ``W`` that ``U`` keeps:

- ``cosine``: ``U = I``, ``W`` fixed to ones — ``xᵀy``, no parameters;
- ``diag``: ``U = I`` — ``Σ_m w_m x_m y_m``, D parameters;
- ``bdiag``: N = D/d dense ``d×d`` blocks on the diagonal — ``Σ_k x_(k)ᵀ W_k y_(k)``, D·d parameters;
- ``dense``: ``U`` all ones — ``xᵀ W y``, D² parameters;
- ``gssf``: diag + bdiag, separately parameterised — D + D·d parameters.

Every member equals ``cosine`` at initialisation (diagonals 1, blocks I — in ``gssf`` the blocks start at 0 —
dense ``W = I``), so swapping cosine for a member never changes the starting point of training.

Cost: a score matrix for ``X [Bi, D]`` against ``Y [Bt, D]`` transforms one side (``O(Bi·D·d)``: a batched
``d×d`` product per block, never a D×D matrix) and then takes one ``[Bi, D] × [D, Bt]`` GEMM — the same order
as cosine. For a large gallery, transform once and reuse plain inner-product search; the transform is a linear
map, so it exports to ONNX as a "metric head" (einsum only, no ``block_diag``, no Python loops).

The score is not symmetric (``W ⊙ U`` need not be): image-to-text uses ``S = scores(images, texts)`` and
text-to-image uses ``Sᵀ`` of that same matrix, never ``scores(texts, images)``.

Optional score normalisation (``norm``): the hinge margin is fixed, so an unconstrained ``W`` can win it just
by growing. Dividing the score by a norm of ``W ⊙ U`` makes it invariant to that scale (``c·W`` scores like
``W`` for ``c > 0``), so only the *shape* of the metric is learned:

- ``"frobenius"``: ``‖W ⊙ U‖_F / sqrt(D)`` — scaled so that the identity gives 1; cheap (one reduction);
- ``"spectral"``: ``‖W ⊙ U‖_2``, the largest singular value — for block-diagonal matrices the maximum over the
  blocks (``max |w|`` for ``diag``; for ``gssf`` the blocks ``diag(w_(k)) + W_k``). Costs a batched SVD of
  ``[N, d, d]`` per call, ``O(D·d²)``; for ``dense`` a full ``O(D³)`` SVD.

The divisor depends on the parameters only, so for inference it folds into the weights: export
:meth:`Similarity.folded` (ONNX has no SVD, so a ``"spectral"`` member exports only folded).

At initialisation both divisors are exactly 1, so every member still equals cosine under every norm.
"""

from __future__ import annotations

import copy
import math
from typing import ClassVar, Final

import torch
from torch import Tensor, nn

from gssf_cli.core.config import default_of
from gssf_cli.core.errors import UserInputError
from gssf_cli.core.limits import NORM_NAMES, SIMILARITY_NAMES, check_block_size, valid_block_sizes
from gssf_cli.core.stage_configs import TrainConfig

__all__ = [
    "NORM_NAMES",
    "SIMILARITY_NAMES",
    "BlockDiagonalSimilarity",
    "CosineSimilarity",
    "DenseSimilarity",
    "DiagonalSimilarity",
    "GSSFSimilarity",
    "Similarity",
    "block_diagonal",
    "blockwise",
    "check_block_size",
    "head_parameters",
    "make_similarity",
    "spectral_norm_of_blocks",
    "valid_block_sizes",
    "with_diagonal",
]


_NORM: str = default_of(TrainConfig, "metric_norm")
_MIN_DIVISOR: Final = 1e-12
"""Floor for a norm divisor, so that all-zero weights give zero scores instead of NaN."""


# ----------------------------------------------------------------------------------------------------------
# Validation (user errors: one readable line each)


def _check_dim(dim: int) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise UserInputError(f"the embedding size must be a positive integer, got {dim!r}")
    return dim


def _check_norm(norm: str) -> str:
    if norm not in NORM_NAMES:
        raise UserInputError(f"unknown score norm {norm!r}; valid norms: {', '.join(NORM_NAMES)}")
    return norm


# ----------------------------------------------------------------------------------------------------------
# The math, as small pure functions


def blockwise(x: Tensor, blocks: Tensor) -> Tensor:
    """Row vectors times a block-diagonal matrix: ``[..., D]`` × blocks ``[N, d, d]`` → ``[..., D]``.

    Block k maps channels ``k·d .. k·d+d-1`` of ``x`` through ``blocks[k]`` (``x_(k)ᵀ W_k``). One einsum over the
    reshaped features, so the D×D matrix never exists and the ONNX graph keeps the weights as ``[N, d, d]``.
    """
    num_blocks, size, _ = blocks.shape
    return torch.einsum("...nd,nde->...ne", x.unflatten(-1, (num_blocks, size)), blocks).flatten(-2)


def block_diagonal(blocks: Tensor) -> Tensor:
    """Materialise blocks ``[N, d, d]`` as the ``[D, D]`` block-diagonal matrix (inspection only)."""
    num_blocks, size, _ = blocks.shape
    eye = torch.eye(num_blocks, dtype=blocks.dtype, device=blocks.device)
    return torch.einsum("nij,nm->nimj", blocks, eye).reshape(num_blocks * size, num_blocks * size)


def with_diagonal(blocks: Tensor, diagonal: Tensor) -> Tensor:
    """``blocks [N, d, d]`` plus ``diag(diagonal_(k))`` on each block: gssf's ``W ⊙ U`` as its diagonal blocks."""
    num_blocks, size, _ = blocks.shape
    return blocks + torch.diag_embed(diagonal.reshape(num_blocks, size))


def spectral_norm_of_blocks(blocks: Tensor) -> Tensor:
    """Spectral norm of a block-diagonal matrix given as ``[N, d, d]``: the largest of the blocks' norms."""
    return torch.linalg.matrix_norm(blocks, ord=2).max()


# ----------------------------------------------------------------------------------------------------------
# The family


class Similarity(nn.Module):
    """A masked bilinear score ``s(x, y) = xᵀ (W ⊙ U) y / c`` over L2-normalised embeddings ``[B, D]``.

    Subclasses implement only the raw one-sided map ``x ↦ xᵀ (W ⊙ U)`` and the norms of ``W ⊙ U``; the base
    class turns that into score matrices, row-wise scores and the optional normalisation ``c`` (see the module
    docstring). ``forward(x, y)`` is :meth:`scores`, so a member drops in where a cosine score matrix was used.

    Attributes: ``name`` (one of :data:`SIMILARITY_NAMES`), ``dim`` (D), ``block_size`` (d, or ``None`` for
    members without blocks), ``norm`` (one of :data:`NORM_NAMES`).
    """

    name: ClassVar[str]
    block_size: int | None = None
    _one: Tensor

    def __init__(self, dim: int, norm: str = _NORM) -> None:
        super().__init__()
        self.dim = _check_dim(dim)
        self.norm = _check_norm(norm)
        self.register_buffer("_one", torch.ones(()), persistent=False)

    # -- what a member defines ------------------------------------------------------------------------------

    def _raw_transform(self, x: Tensor) -> Tensor:
        """``[..., D] → [..., D]``: ``x (W ⊙ U)`` before normalisation."""
        raise NotImplementedError

    def _raw_matrix(self) -> Tensor:
        """``W ⊙ U`` as ``[D, D]`` before normalisation."""
        raise NotImplementedError

    def _frobenius_norm(self) -> Tensor:
        """``‖W ⊙ U‖_F`` (0-dim), computed from the stored parameters only."""
        raise NotImplementedError

    def _spectral_norm(self) -> Tensor:
        """``‖W ⊙ U‖_2`` (0-dim), computed from the stored parameters only."""
        raise NotImplementedError

    # -- the shared API -------------------------------------------------------------------------------------

    def normalizer(self) -> Tensor:
        """The divisor ``c`` (0-dim) applied to every score: 1 for ``norm="none"`` and at initialisation.

        Differentiable in the parameters, so training sees the normalised score. Depends on the parameters only,
        never on the data: at inference it is a constant and can be folded into the weights.
        """
        if self.norm == "frobenius":
            return (self._frobenius_norm() / math.sqrt(self.dim)).clamp_min(_MIN_DIVISOR)
        if self.norm == "spectral":
            return self._spectral_norm().clamp_min(_MIN_DIVISOR)
        return self._one

    def transform(self, x: Tensor) -> Tensor:
        """The one-sided map ``[B, D] → [B, D]``, ``x ↦ x (W ⊙ U) / c``: ``scores(x, y) == transform(x) @ y.T``.

        Transform a gallery (or the queries) once and retrieve by plain inner product; this is the metric head
        that exports to ONNX. Also accepts ``[..., D]``.
        """
        out = self._raw_transform(x)
        if self.norm == "none":
            return out
        return out / self.normalizer()

    def scores(self, x: Tensor, y: Tensor) -> Tensor:
        """Score matrix ``[Bx, By]`` of ``x [Bx, D]`` against ``y [By, D]``: one GEMM after the transform.

        Not symmetric: for text-to-image use the transpose of ``scores(images, texts)``.
        """
        return self.transform(x) @ y.T

    def pairwise(self, x: Tensor, y: Tensor) -> Tensor:
        """Scores ``[B]`` of matching rows ``x[i]``, ``y[i]`` (``x, y [B, D]``): the diagonal of :meth:`scores`
        without the ``B×B`` matrix."""
        return (self.transform(x) * y).sum(-1)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """:meth:`scores`: ``x [Bx, D]``, ``y [By, D]`` → ``[Bx, By]``."""
        return self.scores(x, y)

    def num_parameters(self) -> int:
        """Learnable entries: cosine 0, diag D, bdiag D·d, dense D², gssf D + D·d."""
        return sum(p.numel() for p in self.parameters())

    def effective_matrix(self, normalized: bool = True) -> Tensor:
        """``W ⊙ U`` materialised as ``[D, D]`` (divided by :meth:`normalizer` unless ``normalized=False``).

        For inspection only — heatmaps, tests, comparing members. Scoring never builds this matrix.
        ``scores(x, y) == x @ effective_matrix() @ y.T`` up to rounding; differentiable in the parameters.
        """
        matrix = self._raw_matrix()
        if normalized and self.norm != "none":
            return matrix / self.normalizer()
        return matrix

    def folded(self) -> Similarity:
        """A copy with ``norm="none"`` and the weights divided by :meth:`normalizer`: the same scores (up to
        rounding) with no norm computed at run time.

        What to export or deploy: ONNX has no SVD, so a ``"spectral"`` member exports only folded. Not for
        training — the copy is no longer scale-invariant.
        """
        folded = copy.deepcopy(self)
        folded.norm = "none"
        with torch.no_grad():
            divisor = self.normalizer()
            for parameter in folded.parameters():
                parameter.div_(divisor)
        return folded

    def extra_repr(self) -> str:
        block = f", block_size={self.block_size}" if self.block_size is not None else ""
        return f"dim={self.dim}{block}, norm={self.norm!r}"


class CosineSimilarity(Similarity):
    """``xᵀy`` (``U = I``, ``W`` fixed to ones): the baseline, no parameters; every norm of it is 1."""

    name = "cosine"

    def _raw_transform(self, x: Tensor) -> Tensor:
        return x

    def _raw_matrix(self) -> Tensor:
        return torch.diag(self._one.expand(self.dim))

    def _frobenius_norm(self) -> Tensor:
        return self._one * math.sqrt(self.dim)

    def _spectral_norm(self) -> Tensor:
        return self._one


class DiagonalSimilarity(Similarity):
    """``Σ_m w_m x_m y_m``: one learnable weight per channel (``diagonal [D]``, starts at 1), no interactions."""

    name = "diag"

    def __init__(self, dim: int, norm: str = _NORM) -> None:
        super().__init__(dim, norm)
        self.diagonal = nn.Parameter(torch.ones(self.dim))

    def _raw_transform(self, x: Tensor) -> Tensor:
        return x * self.diagonal

    def _raw_matrix(self) -> Tensor:
        return torch.diag(self.diagonal)

    def _frobenius_norm(self) -> Tensor:
        return torch.linalg.vector_norm(self.diagonal)

    def _spectral_norm(self) -> Tensor:
        return self.diagonal.abs().max()


class BlockDiagonalSimilarity(Similarity):
    """``Σ_k x_(k)ᵀ W_k y_(k)``: N = D/d dense ``d×d`` blocks (``blocks [N, d, d]``, start at I).

    Channels interact only within their block. d = 1 is :class:`DiagonalSimilarity`, d = D is
    :class:`DenseSimilarity`.
    """

    name = "bdiag"

    def __init__(self, dim: int, block_size: int | None, norm: str = _NORM) -> None:
        super().__init__(dim, norm)
        self.block_size = check_block_size(self.name, self.dim, block_size)
        self.num_blocks = self.dim // self.block_size
        self.blocks = nn.Parameter(torch.eye(self.block_size).repeat(self.num_blocks, 1, 1))

    def _raw_transform(self, x: Tensor) -> Tensor:
        return blockwise(x, self.blocks)

    def _raw_matrix(self) -> Tensor:
        return block_diagonal(self.blocks)

    def _frobenius_norm(self) -> Tensor:
        return torch.linalg.vector_norm(self.blocks)

    def _spectral_norm(self) -> Tensor:
        return spectral_norm_of_blocks(self.blocks)


class DenseSimilarity(Similarity):
    """``xᵀ W y`` with a full ``matrix [D, D]`` (starts at I): every channel pair interacts, D² parameters."""

    name = "dense"

    def __init__(self, dim: int, norm: str = _NORM) -> None:
        super().__init__(dim, norm)
        self.matrix = nn.Parameter(torch.eye(self.dim))

    def _raw_transform(self, x: Tensor) -> Tensor:
        return x @ self.matrix

    def _raw_matrix(self) -> Tensor:
        return self.matrix

    def _frobenius_norm(self) -> Tensor:
        return torch.linalg.vector_norm(self.matrix)

    def _spectral_norm(self) -> Tensor:
        return torch.linalg.matrix_norm(self.matrix, ord=2)


class GSSFSimilarity(Similarity):
    """GSSF: ``Σ_m w_m x_m y_m + Σ_k x_(k)ᵀ W_k y_(k)`` — a diagonal plus a block-diagonal term.

    Separately parameterised (``diagonal [D]`` starts at 1, ``blocks [N, d, d]`` at 0), so the per-channel
    weighting and the within-block interactions are learned (and regularised) independently. Its
    ``W ⊙ U`` is block-diagonal with blocks ``diag(w_(k)) + W_k``; the norms are taken of those.
    """

    name = "gssf"

    def __init__(self, dim: int, block_size: int | None, norm: str = _NORM) -> None:
        super().__init__(dim, norm)
        self.block_size = check_block_size(self.name, self.dim, block_size)
        self.num_blocks = self.dim // self.block_size
        self.diagonal = nn.Parameter(torch.ones(self.dim))
        self.blocks = nn.Parameter(torch.zeros(self.num_blocks, self.block_size, self.block_size))

    def _raw_transform(self, x: Tensor) -> Tensor:
        return x * self.diagonal + blockwise(x, self.blocks)

    def _raw_matrix(self) -> Tensor:
        return torch.diag(self.diagonal) + block_diagonal(self.blocks)

    def _frobenius_norm(self) -> Tensor:
        return torch.linalg.vector_norm(with_diagonal(self.blocks, self.diagonal))

    def _spectral_norm(self) -> Tensor:
        return spectral_norm_of_blocks(with_diagonal(self.blocks, self.diagonal))


def head_parameters(name: str, dim: int, block_size: int) -> int:
    """Learned entries of a metric head's ``W ⊙ U`` (docs/method.md), without building the module (the memory
    check sizes a model before allocating it); a test proves it equals :meth:`Similarity.num_parameters`."""
    return {
        "cosine": 0,
        "diag": dim,
        "bdiag": dim * block_size,
        "dense": dim * dim,
        "gssf": dim + dim * block_size,
    }[name]


def make_similarity(name: str, dim: int, block_size: int | None = None, norm: str = _NORM) -> Similarity:
    """Build a member of the family by name (one of :data:`SIMILARITY_NAMES`) for embeddings of size ``dim``.

    ``block_size`` is required by ``bdiag`` and ``gssf`` and must divide ``dim`` (see
    :func:`valid_block_sizes`); the other members ignore it. Anything invalid raises
    :class:`~gssf_cli.core.errors.UserInputError` with a one-line message that lists the valid choices.
    """
    _check_dim(dim)
    _check_norm(norm)
    if name == "cosine":
        return CosineSimilarity(dim, norm)
    if name == "diag":
        return DiagonalSimilarity(dim, norm)
    if name == "dense":
        return DenseSimilarity(dim, norm)
    if name == "bdiag":
        return BlockDiagonalSimilarity(dim, block_size, norm)
    if name == "gssf":
        return GSSFSimilarity(dim, block_size, norm)
    raise UserInputError(f"unknown similarity {name!r}; valid names: {', '.join(SIMILARITY_NAMES)}")
