"""Training objectives on a batch score matrix: hinge triplet, InfoNCE and structure-aware distillation.

Every loss here consumes one score matrix ``S [B, B]`` produced by any member of the similarity family (cosine,
diag, bdiag, dense, gssf): row i is image (anchor) i of the batch, column j is caption (positive side) j, and the
positive pairs sit on the diagonal. Keeping the losses ignorant of how S was computed is what lets one trainer
compare metrics: the metric changes S, never the loss.

A batch may hold several captions of one image. ``image_ids [B]`` (int64, optional) names the image each pair came
from; a pair (i, j) with ``image_ids[i] == image_ids[j]`` is never a negative, so a caption is not pushed away from
its own image just because it sits in another row. For label-based (single tower) data pass the class labels as
``image_ids``: same-class pairs are then not negatives either. Without ``image_ids`` only the diagonal is excluded.

Everything is vectorised over the batch: a loss costs a few ``[B, B]`` element-wise passes on top of S.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gssf_cli.core.config import default_of
from gssf_cli.core.errors import UserInputError
from gssf_cli.core.limits import DISTILL_KINDS, LOSS_NAMES, MARGIN, NON_NEGATIVE, TEMPERATURE, DistillKind
from gssf_cli.core.stage_configs import TrainConfig

__all__ = [
    "LOSS_NAMES",
    "CrossModalObjective",
    "DistillInputs",
    "DistillationOutput",
    "HingeTripletLoss",
    "InfoNCELoss",
    "StructureDistillation",
    "make_objective",
    "negative_mask",
]

_REDUCTIONS = ("sum", "mean")
_TAU_MIN, _TAU_MAX = TEMPERATURE.low, TEMPERATURE.high
_MARGIN = default_of(TrainConfig, "margin")
_TEMPERATURE = default_of(TrainConfig, "temperature")
_DISTILL_KIND = default_of(TrainConfig, "distill_kind")

Reduction = Literal["sum", "mean"]


def _check_scores(scores: Tensor, image_ids: Tensor | None) -> None:
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"scores must be a square [B, B] matrix, got shape {tuple(scores.shape)}")
    if image_ids is not None and tuple(image_ids.shape) != (scores.shape[0],):
        raise ValueError(f"image_ids must have shape [{scores.shape[0]}], got {tuple(image_ids.shape)}")


def negative_mask(batch_size: int, image_ids: Tensor | None = None, device: torch.device | None = None) -> Tensor:
    """Which pairs (i, j) of a batch are negatives: ``[B, B]`` bool.

    With ``image_ids [B]`` a pair is a negative iff its two sides come from different images (or classes); without,
    every off-diagonal pair is a negative.
    """
    if image_ids is None:
        return ~torch.eye(batch_size, dtype=torch.bool, device=device)
    ids = image_ids.to(device) if device is not None else image_ids
    return ids[:, None] != ids[None, :]


def _validate_temperature(name: str, value: float) -> None:
    TEMPERATURE.check(name, value)


def _clamped_exp(log_value: Tensor) -> Tensor:
    """exp of a log-parameter, clamped to [0.01, 1].

    The clamp is functional (no in-place projection of the parameter), so two forward passes before one backward
    stay legal; outside the bounds the gradient is zero and the effective value sits at the bound.
    """
    assert _TAU_MIN is not None and _TAU_MAX is not None
    return log_value.clamp(math.log(_TAU_MIN), math.log(_TAU_MAX)).exp()


class HingeTripletLoss(nn.Module):
    """Bidirectional hinge triplet loss of VSE++, in both its warm-up (sum) and "max violation" (hardest) forms.

    For a score matrix ``S [B, B]`` and margin α::

        c_s[i, j]  = [α + S[i, j] − S[i, i]]₊   caption j as a negative of image i
        c_im[i, j] = [α + S[i, j] − S[j, j]]₊   image i as a negative of caption j

    with every non-negative pair (the diagonal, and same-image pairs when ``image_ids`` is given) set to 0.

    * ``hardest=False``: ``L = Σ_ij c_s + Σ_ij c_im`` over all negatives.
    * ``hardest=True``: ``L = Σ_i max_j c_s[i, j] + Σ_j max_i c_im[i, j]``: only the hardest negative per query.

    Warm-up convention: hardest-negative mining from random initialisation tends to collapse the embedding (every
    query's hardest negative is noise), so VSE-style training sums over all negatives for the first warm-up
    epoch(s) and switches to hardest negatives afterwards. This module does not count epochs: the trainer passes
    ``hardest=False`` during its warm-up epochs and ``hardest=True`` after.

    ``reduction="sum"`` (VSE++'s default) sums over the batch; ``"mean"`` divides that sum by B, which makes the
    loss scale independent of the batch size. A row (or column) without any negative contributes 0.
    """

    def __init__(self, margin: float = _MARGIN, reduction: Reduction = "sum") -> None:
        super().__init__()
        MARGIN.check("triplet margin", margin)
        if reduction not in _REDUCTIONS:
            raise UserInputError(f"unknown reduction {reduction!r}; valid: {', '.join(_REDUCTIONS)}")
        self.margin = float(margin)
        self.reduction: Reduction = reduction

    def forward(self, scores: Tensor, image_ids: Tensor | None = None, hardest: bool = True) -> Tensor:
        """``scores [B, B]``, ``image_ids [B]`` or None → scalar loss."""
        _check_scores(scores, image_ids)
        batch = scores.shape[0]
        if batch == 0:
            return scores.sum()
        negatives = negative_mask(batch, image_ids, scores.device)
        positive = scores.diagonal()
        zero = scores.new_zeros(())
        cost_s = torch.where(negatives, (self.margin + scores - positive[:, None]).clamp(min=0), zero)
        cost_im = torch.where(negatives, (self.margin + scores - positive[None, :]).clamp(min=0), zero)
        if hardest:
            cost_s, cost_im = cost_s.amax(dim=1), cost_im.amax(dim=0)
        loss = cost_s.sum() + cost_im.sum()
        return loss / batch if self.reduction == "mean" else loss

    def extra_repr(self) -> str:
        return f"margin={self.margin}, reduction={self.reduction!r}"


class InfoNCELoss(nn.Module):
    """Symmetric softmax cross-entropy (CLIP-style InfoNCE) over a batch score matrix.

    ``logits = S / τ``; image-to-text takes each row as a distribution over captions, text-to-image each column
    as a distribution over images, the target being the diagonal. The loss is the mean of the two cross-entropies
    (each averaged over the batch). Same-image off-diagonal pairs are set to −inf, i.e. removed from the softmax
    denominators: a second caption of the same image is not a wrong answer, so it must not compete with the
    positive.

    τ (default 0.05) is stored as log τ and clamped to [0.01, 1]; with ``learnable_temperature=True`` it is an
    ``nn.Parameter`` the optimiser tunes, otherwise a buffer (saved with the module, not trained).
    """

    def __init__(self, temperature: float = _TEMPERATURE, learnable_temperature: bool = False) -> None:
        super().__init__()
        _validate_temperature("InfoNCE temperature", temperature)
        log_tau = torch.tensor(math.log(temperature))
        self.log_tau: Tensor
        if learnable_temperature:
            self.log_tau = nn.Parameter(log_tau)
        else:
            self.register_buffer("log_tau", log_tau)

    @property
    def temperature(self) -> float:
        return float(_clamped_exp(self.log_tau.detach()))

    def forward(self, scores: Tensor, image_ids: Tensor | None = None) -> Tensor:
        """``scores [B, B]``, ``image_ids [B]`` or None → scalar loss (0 for an empty batch)."""
        _check_scores(scores, image_ids)
        batch = scores.shape[0]
        if batch == 0:
            return scores.sum()
        logits = scores / _clamped_exp(self.log_tau).to(scores.dtype)
        if image_ids is not None:
            eye = torch.eye(batch, dtype=torch.bool, device=scores.device)
            same_image = ~negative_mask(batch, image_ids, scores.device) & ~eye
            logits = logits.masked_fill(same_image, float("-inf"))
        targets = torch.arange(batch, device=scores.device)
        return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


@dataclass(frozen=True)
class DistillationOutput:
    """The parts of :class:`StructureDistillation`, all scalars.

    ``struct`` trains the student, τ₂ and λ; ``lambda_terms`` depends on λ alone (constant in λ under mae, a pull
    towards λ = 0.5 under mse); ``total = relation_weight · struct + lambda_weight · lambda_terms`` is what to
    backpropagate.
    """

    struct: Tensor
    lambda_terms: Tensor
    total: Tensor


class DistillInputs(NamedTuple):
    """What :class:`CrossModalObjective` hands to :class:`StructureDistillation` (a plain 3-tuple works too).

    ``student_scores [B, B]``: student cross-modal scores (cosine of the student embeddings, or the learned metric's
    scores in GSSF's knowledge-distillation scenario); ``teacher_img [B, Fi]`` and ``teacher_txt [B, Ft]``: frozen
    per-modality teacher features of the same B pairs.
    """

    student_scores: Tensor
    teacher_img: Tensor
    teacher_txt: Tensor


class StructureDistillation(nn.Module):
    """Structure-aware (relational) distillation from two frozen intra-modal teachers.

    After Yang et al., "Rebalanced Vision-Language Retrieval Considering Structure-Aware Distillation" (IEEE TIP
    2024): an exact cross-modal matching loss alone distorts the geometry of the common space when one modality is
    weaker, so the batch's relation matrix in the student's cross-modal space is pulled towards the relation
    matrices that each modality's own (frozen) features induce::

        R_student    = student_scores / τ₂                                       [B, B]
        R_img        = cos(teacher_img_i, teacher_img_j) / τ_t                   [B, B]
        R_txt        = cos(teacher_txt_i, teacher_txt_j) / τ_t                   [B, B]
        R_teacher    = λ · R_txt + (1 − λ) · R_img                               [B, B]  (λ: a learnable scalar)
        struct       = mean d(R_student − R_teacher)                             scalar
        lambda_terms = mean d(R_img − R_teacher) + mean d(R_txt − R_teacher)     scalar
        total        = relation_weight · struct + lambda_weight · lambda_terms   scalar

    with d = |·| ("mae", the paper's choice, default) or (·)² ("mse"), and every mean taken over the B(B − 1)
    off-diagonal entries only: the diagonal of a relation matrix is a self-relation (1/τ for the teachers) that
    carries no structure.

    How λ learns (as in the paper's reference implementation): λ is *not* detached inside ``struct``, so ``struct``
    is what trains it. Its gradient in λ is ``−mean d′(R_student − R_teacher) · (R_txt − R_img)`` (d′ = sign for
    mae, 2·(·) for mse): it pulls the fused teacher towards the student's relations, i.e. λ moves towards the
    teacher whose geometry the student already follows (λ → 1: the text teacher, λ → 0: the image teacher). The
    student is pulled towards the fused teacher by the same term at the same time.

    Decisions that are ours, not the paper's (where its text could not be checked):

    * Student scores come from the caller (our choice): the default is the cosine matrix of the student's image
      and text embeddings, ``student_img @ student_txt.T`` for L2-normalised inputs; passing the learned metric's
      score matrix instead is GSSF's "knowledge distillation" scenario. Whether to do so is the trainer's decision.
    * τ₂ divides the student only; the teachers use a FIXED τ_t = 0.07 (our choice). If τ₂ also divided the
      teachers, every relation would shrink as τ₂ grows and the loss could be minimised by growing τ₂ alone; with
      fixed teachers, a learnable τ₂ (start 0.07, stored as a log, clamped to [0.01, 1]) lets the student match
      the teachers' scale.
    * λ = sigmoid(logit), a scalar logit starting at logit(init_lambda) (0 for the default 0.5), so λ stays in
      (0, 1) without clipping and keeps a gradient everywhere (our choice of parameterisation).
    * Teacher features are detached, cast to the student's dtype and L2-normalised here, so any widths work; the
      teachers receive no gradient.
    * B < 2 has no off-diagonal entry: every part is 0 (still connected to ``student_scores``' graph).

    The two λ terms are kept as the paper states them, but they cannot train λ on their own:
    ``R_img − R_teacher = λ (R_img − R_txt)`` and ``R_txt − R_teacher = (1 − λ)(R_txt − R_img)``. With "mae" their
    sum is ``mean |R_img − R_txt|`` for every λ ∈ [0, 1] — a constant in λ (zero gradient up to rounding), so under
    mae λ is trained by ``struct`` alone. With "mse" the sum is ``(λ² + (1 − λ)²) · mean (R_img − R_txt)²``, a pull
    towards λ = 0.5 that competes with ``struct``: for a fixed student and τ₂ the total is minimised at
    ``λ = (relation_weight · λ* + lambda_weight) / (relation_weight + 2 · lambda_weight)``, where λ* is the
    least-squares fit of ``struct`` alone (λ*/2 + 1/4 with the default weights 2 and 1), so mse moves λ less far
    from 0.5 than mae does.
    """

    def __init__(
        self,
        kind: DistillKind = _DISTILL_KIND,
        init_tau: float = 0.07,
        teacher_tau: float = 0.07,
        init_lambda: float = 0.5,
        relation_weight: float = 2.0,
        lambda_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if kind not in DISTILL_KINDS:
            raise UserInputError(f"unknown distillation kind {kind!r}; valid: {', '.join(DISTILL_KINDS)}")
        _validate_temperature("distillation temperature", init_tau)
        if teacher_tau <= 0:
            raise UserInputError(f"teacher temperature must be > 0, got {teacher_tau}")
        if not (0.0 < init_lambda < 1.0):
            raise UserInputError(f"initial lambda must be in (0, 1), got {init_lambda}")
        if relation_weight < 0 or lambda_weight < 0:
            raise UserInputError(
                f"distillation weights must be >= 0, got relation={relation_weight}, lambda={lambda_weight}"
            )
        self.kind: DistillKind = kind
        self.teacher_tau = float(teacher_tau)
        self.relation_weight = float(relation_weight)
        self.lambda_weight = float(lambda_weight)
        self.log_tau = nn.Parameter(torch.tensor(math.log(init_tau)))
        self.lambda_logit = nn.Parameter(torch.tensor(math.log(init_lambda / (1.0 - init_lambda))))

    @property
    def tau(self) -> float:
        """Current student temperature τ₂ (after clamping)."""
        return float(_clamped_exp(self.log_tau.detach()))

    @property
    def lam(self) -> float:
        """Current teacher-fusion weight λ (weight of the text teacher)."""
        return float(torch.sigmoid(self.lambda_logit.detach()))

    def _distance(self, diff: Tensor) -> Tensor:
        return diff.abs().mean() if self.kind == "mae" else diff.square().mean()

    def _teacher_relation(self, features: Tensor, off_diagonal: Tensor, dtype: torch.dtype) -> Tensor:
        unit = F.normalize(features.detach().to(dtype), dim=1)
        return (unit @ unit.T)[off_diagonal] / self.teacher_tau

    def forward(self, student_scores: Tensor, teacher_img: Tensor, teacher_txt: Tensor) -> DistillationOutput:
        """``student_scores [B, B]``, ``teacher_img [B, Fi]``, ``teacher_txt [B, Ft]`` → :class:`DistillationOutput`."""
        _check_scores(student_scores, None)
        batch = student_scores.shape[0]
        for name, teacher in (("teacher_img", teacher_img), ("teacher_txt", teacher_txt)):
            if teacher.dim() != 2 or teacher.shape[0] != batch:
                raise ValueError(f"{name} must have shape [{batch}, F], got {tuple(teacher.shape)}")
        if batch < 2:
            zero = student_scores.sum() * 0.0
            return DistillationOutput(struct=zero, lambda_terms=zero, total=zero)

        off_diagonal = ~torch.eye(batch, dtype=torch.bool, device=student_scores.device)
        dtype = student_scores.dtype
        r_student = student_scores[off_diagonal] / _clamped_exp(self.log_tau).to(dtype)
        r_img = self._teacher_relation(teacher_img, off_diagonal, dtype)
        r_txt = self._teacher_relation(teacher_txt, off_diagonal, dtype)

        lam = torch.sigmoid(self.lambda_logit).to(dtype)
        r_teacher = lam * r_txt + (1 - lam) * r_img  # [B(B − 1)]; λ stays attached: struct trains it
        struct = self._distance(r_student - r_teacher)
        lambda_terms = self._distance(r_img - r_teacher) + self._distance(r_txt - r_teacher)
        total = self.relation_weight * struct + self.lambda_weight * lambda_terms
        return DistillationOutput(struct=struct, lambda_terms=lambda_terms, total=total)

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind!r}, teacher_tau={self.teacher_tau}, relation_weight={self.relation_weight}, "
            f"lambda_weight={self.lambda_weight}"
        )


class CrossModalObjective(nn.Module):
    """What the trainer backpropagates: a base ranking loss plus, optionally, β · structure distillation.

    ``loss = base(scores) + β · distillation.total``. ``forward`` returns a dict with ``"loss"`` (attached to the
    graph, the one to backpropagate) and the detached parts ``"base"``, ``"struct"``, ``"lambda_terms"`` for
    logging (``struct`` and ``lambda_terms`` are 0 without distillation). ``hardest`` is the triplet's warm-up
    switch and is ignored by InfoNCE.
    """

    def __init__(
        self,
        base: HingeTripletLoss | InfoNCELoss,
        distillation: StructureDistillation | None = None,
        distill_weight: float = 0.0,
    ) -> None:
        super().__init__()
        NON_NEGATIVE.check("distillation weight", distill_weight)
        self.base = base
        self.distillation = distillation
        self.distill_weight = float(distill_weight)

    def forward(
        self,
        scores: Tensor,
        image_ids: Tensor | None = None,
        hardest: bool = True,
        distill_inputs: DistillInputs | tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """``scores [B, B]``, ``image_ids [B]`` or None, ``distill_inputs`` as in :class:`DistillInputs`.

        ``distill_inputs`` is required when the objective distils (a silent skip would hide a wiring bug) and
        ignored otherwise.
        """
        if isinstance(self.base, HingeTripletLoss):
            base = self.base(scores, image_ids, hardest=hardest)
        else:
            base = self.base(scores, image_ids)
        zero = base.detach() * 0.0
        parts = {"base": base.detach(), "struct": zero, "lambda_terms": zero}
        loss = base
        if self.distillation is not None:
            if distill_inputs is None:
                raise ValueError(
                    "this objective distils: pass distill_inputs=(student_scores, teacher_img, teacher_txt)"
                )
            out = self.distillation(*distill_inputs)
            loss = loss + self.distill_weight * out.total
            parts["struct"] = out.struct.detach()
            parts["lambda_terms"] = out.lambda_terms.detach()
        return {"loss": loss, **parts}


def make_objective(
    loss: str = "triplet",
    margin: float = _MARGIN,
    temperature: float = _TEMPERATURE,
    distill_weight: float = 0.0,
    distill_kind: str = _DISTILL_KIND,
) -> CrossModalObjective:
    """Build the trainer's objective from config values; distillation is included iff ``distill_weight > 0``.

    Invalid values (unknown loss or distillation kind, negative weight or margin, temperature outside [0.01, 1])
    raise :class:`~gssf_cli.core.errors.UserInputError` with a one-line message.
    """
    name = loss.strip().lower()
    base: HingeTripletLoss | InfoNCELoss
    if name == "triplet":
        base = HingeTripletLoss(margin=margin)
    elif name == "infonce":
        base = InfoNCELoss(temperature=temperature)
    else:
        raise UserInputError(f"unknown loss {loss!r}; valid: {', '.join(sorted(LOSS_NAMES))}")
    kind = distill_kind.strip().lower()
    if kind not in DISTILL_KINDS:
        raise UserInputError(f"unknown distillation kind {distill_kind!r}; valid: {', '.join(DISTILL_KINDS)}")
    distillation = StructureDistillation(kind=cast(DistillKind, kind)) if distill_weight > 0 else None
    return CrossModalObjective(base, distillation, distill_weight)
