"""Losses on a batch score matrix: checked against slow loop references, hand-computed fixtures and gradients."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from gssf_cli.core.errors import UserInputError
from gssf_cli.modeling.losses import (
    CrossModalObjective,
    DistillInputs,
    HingeTripletLoss,
    InfoNCELoss,
    StructureDistillation,
    make_objective,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tensors here are tiny: intra-op threads only add overhead (far slower on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------------
# slow, obviously-correct references


def _is_negative(i: int, j: int, ids: list[int] | None) -> bool:
    return i != j if ids is None else ids[i] != ids[j]


def reference_triplet(s: list[list[float]], ids: list[int] | None, hardest: bool, margin: float = 0.2) -> float:
    b = len(s)
    total = 0.0
    for i in range(b):
        row = [max(0.0, margin + s[i][j] - s[i][i]) for j in range(b) if _is_negative(i, j, ids)]
        total += (max(row) if row else 0.0) if hardest else sum(row)
    for j in range(b):
        col = [max(0.0, margin + s[i][j] - s[j][j]) for i in range(b) if _is_negative(i, j, ids)]
        total += (max(col) if col else 0.0) if hardest else sum(col)
    return total


def reference_infonce(s: list[list[float]], ids: list[int] | None, tau: float) -> float:
    b = len(s)

    def ce(rows: list[list[float]]) -> float:
        total = 0.0
        for i in range(b):
            kept = [rows[i][j] / tau for j in range(b) if j == i or _is_negative(i, j, ids)]
            total += -(rows[i][i] / tau) + math.log(sum(math.exp(v) for v in kept))
        return total / b

    transposed = [[s[i][j] for i in range(b)] for j in range(b)]
    return 0.5 * (ce(s) + ce(transposed))


@st.composite
def score_batches(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor | None]:
    b = draw(st.integers(1, 7))
    values = draw(st.lists(st.floats(-1, 1, allow_nan=False), min_size=b * b, max_size=b * b))
    scores = torch.tensor(values, dtype=torch.float64).reshape(b, b)
    if draw(st.booleans()):
        return scores, None
    ids = draw(st.lists(st.integers(0, 3), min_size=b, max_size=b))
    return scores, torch.tensor(ids, dtype=torch.int64)


# ---------------------------------------------------------------------------------------------------------------
# hinge triplet


@settings(max_examples=150, deadline=None)
@given(batch=score_batches(), hardest=st.booleans())
def test_triplet_matches_loop_reference(batch: tuple[torch.Tensor, torch.Tensor | None], hardest: bool) -> None:
    scores, ids = batch
    ids_list = None if ids is None else ids.tolist()
    expected = reference_triplet(scores.tolist(), ids_list, hardest)
    got = HingeTripletLoss()(scores, ids, hardest=hardest)
    assert got.item() == pytest.approx(expected, abs=1e-12)
    got_mean = HingeTripletLoss(reduction="mean")(scores, ids, hardest=hardest)
    assert got_mean.item() == pytest.approx(expected / scores.shape[0], abs=1e-12)


def test_triplet_hand_computed_2x2() -> None:
    # c_s: (0,1) = .2+.4-.5 = .1, (1,0) = .2+.6-.7 = .1 ; c_im: (1,0) = .2+.6-.5 = .3, (0,1) = .2+.4-.7 < 0
    s = torch.tensor([[0.5, 0.4], [0.6, 0.7]], dtype=torch.float64)
    assert HingeTripletLoss()(s, hardest=False).item() == pytest.approx(0.5)
    assert HingeTripletLoss()(s, hardest=True).item() == pytest.approx(0.5)
    assert HingeTripletLoss(reduction="mean")(s, hardest=True).item() == pytest.approx(0.25)


S3 = [[0.8, 0.7, 0.1], [0.2, 0.5, 0.6], [0.9, 0.3, 0.4]]


@pytest.mark.parametrize(
    ("ids", "hardest", "expected"),
    [
        # c_s = {(0,1): .1, (1,2): .3, (2,0): .7, (2,1): .1}; c_im = {(2,0): .3, (0,1): .4, (2,1): 0, (1,2): .4}
        (None, False, 1.2 + 1.1),
        (None, True, (0.1 + 0.3 + 0.7) + (0.3 + 0.4 + 0.4)),
        # pairs 0 and 1 share an image: (0,1) and (1,0) are no longer negatives
        ([0, 0, 1], False, (0.3 + 0.7 + 0.1) + (0.3 + 0.0 + 0.4)),
        ([0, 0, 1], True, (0.0 + 0.3 + 0.7) + (0.3 + 0.0 + 0.4)),
    ],
)
def test_triplet_hand_computed_3x3(ids: list[int] | None, hardest: bool, expected: float) -> None:
    s = torch.tensor(S3, dtype=torch.float64)
    image_ids = None if ids is None else torch.tensor(ids)
    assert HingeTripletLoss()(s, image_ids, hardest=hardest).item() == pytest.approx(expected)


@pytest.mark.parametrize("hardest", [False, True])
def test_triplet_ignores_same_image_pairs(hardest: bool) -> None:
    torch.manual_seed(0)
    s = torch.rand(6, 6, dtype=torch.float64)
    ids = torch.tensor([0, 0, 1, 2, 2, 2])
    loss = HingeTripletLoss()
    before = loss(s, ids, hardest=hardest)
    changed = s.clone()
    changed[0, 1] = 5.0
    changed[4, 3] = -5.0
    changed[3, 5] = 7.0
    assert loss(changed, ids, hardest=hardest).item() == pytest.approx(before.item(), abs=1e-12)
    # without ids the same change is seen
    assert loss(changed, hardest=hardest).item() != pytest.approx(loss(s, hardest=hardest).item())


@pytest.mark.parametrize("hardest", [False, True])
def test_triplet_separated_scores_give_zero_loss_and_gradients_flow(hardest: bool) -> None:
    separated = (torch.full((4, 4), 0.1) + 0.3 * torch.eye(4)).requires_grad_()  # diag = off-diag + margin + .1
    loss = HingeTripletLoss()(separated, hardest=hardest)
    loss.backward()
    assert loss.item() == 0.0
    assert separated.grad is not None and torch.all(separated.grad == 0)

    violated = torch.tensor(S3, requires_grad=True)
    HingeTripletLoss()(violated, hardest=hardest).backward()
    assert violated.grad is not None
    assert violated.grad[2, 0] > 0  # the worst negative is pushed down
    assert violated.grad[2, 2] < 0  # its positive is pushed up


def test_triplet_batch_of_one_and_empty() -> None:
    assert HingeTripletLoss()(torch.tensor([[0.3]])).item() == 0.0
    assert HingeTripletLoss()(torch.zeros(0, 0)).item() == 0.0


def test_triplet_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="square"):
        HingeTripletLoss()(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="image_ids"):
        HingeTripletLoss()(torch.zeros(2, 2), torch.tensor([0, 1, 2]))
    with pytest.raises(UserInputError, match="reduction"):
        HingeTripletLoss(reduction="max")  # type: ignore[arg-type]
    with pytest.raises(UserInputError, match="margin"):
        HingeTripletLoss(margin=-0.1)


# ---------------------------------------------------------------------------------------------------------------
# InfoNCE


@settings(max_examples=100, deadline=None)
@given(batch=score_batches(), tau=st.sampled_from([0.05, 0.1, 1.0]))
def test_infonce_matches_loop_reference(batch: tuple[torch.Tensor, torch.Tensor | None], tau: float) -> None:
    scores, ids = batch
    ids_list = None if ids is None else ids.tolist()
    loss = InfoNCELoss(temperature=tau)
    assert loss.temperature == pytest.approx(tau, rel=1e-6)
    expected = reference_infonce(scores.tolist(), ids_list, loss.temperature)  # τ as stored (float32 log τ)
    assert loss(scores, ids).item() == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_infonce_explicit_log_softmax_without_ids() -> None:
    torch.manual_seed(1)
    s = torch.randn(5, 5, dtype=torch.float64)
    logits = s / InfoNCELoss().temperature
    i2t = -torch.log_softmax(logits, dim=1).diagonal().mean()
    t2i = -torch.log_softmax(logits, dim=0).diagonal().mean()
    assert InfoNCELoss()(s).item() == pytest.approx(0.5 * (i2t + t2i).item())


def test_infonce_masks_same_image_pairs() -> None:
    torch.manual_seed(2)
    s = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([0, 0, 1, 1])
    loss = InfoNCELoss()
    before = loss(s, ids).item()
    changed = s.detach().clone()
    changed[0, 1] = changed[3, 2] = 100.0
    assert loss(changed, ids).item() == pytest.approx(before)
    loss(s, ids).backward()
    assert s.grad is not None
    assert s.grad[0, 1] == 0 and s.grad[1, 0] == 0 and s.grad[2, 3] == 0
    assert torch.isfinite(s.grad).all()
    # every pair of one image: only the positive is left in each softmax
    assert loss(s.detach(), torch.zeros(4, dtype=torch.int64)).item() == pytest.approx(0.0)


def test_infonce_temperature() -> None:
    fixed = InfoNCELoss(temperature=0.1)
    assert fixed.temperature == pytest.approx(0.1)
    assert not list(fixed.parameters())
    learnable = InfoNCELoss(temperature=0.1, learnable_temperature=True)
    s = torch.randn(4, 4)
    learnable(s).backward()
    assert learnable.log_tau.grad is not None and learnable.log_tau.grad != 0
    with torch.no_grad():
        learnable.log_tau.fill_(math.log(5.0))
    assert learnable.temperature == pytest.approx(1.0)
    with pytest.raises(UserInputError, match="temperature"):
        InfoNCELoss(temperature=0.001)


# ---------------------------------------------------------------------------------------------------------------
# structure distillation


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=1)


def _teachers(b: int = 6, fi: int = 5, ft: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, fi, generator=g, dtype=torch.float64), torch.randn(b, ft, generator=g, dtype=torch.float64)


def test_distillation_struct_zero_when_student_matches_fused_teacher() -> None:
    t_img, t_txt = _teachers()
    distill = StructureDistillation().double()
    assert distill.tau == pytest.approx(0.07) and distill.lam == pytest.approx(0.5)
    # τ₂ = τ_t = 0.07 at init (τ₂ up to float32 rounding of log τ₂), so the fused cosines reproduce the teachers
    student = 0.5 * (_unit(t_img) @ _unit(t_img).T) + 0.5 * (_unit(t_txt) @ _unit(t_txt).T)
    student = student + 3.0 * torch.eye(6, dtype=torch.float64)  # the diagonal must not matter
    out = distill(student, t_img, t_txt)
    assert out.struct.item() == pytest.approx(0.0, abs=1e-6)
    assert distill(_unit(t_img) @ _unit(t_img).T, t_img, t_img).struct.item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kind", ["mae", "mse"])
def test_distillation_matches_explicit_formula(kind: str) -> None:
    t_img, t_txt = _teachers(b=5, fi=4, ft=7, seed=3)
    student = torch.randn(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    distill = StructureDistillation(kind=kind).double()  # type: ignore[arg-type]
    with torch.no_grad():
        distill.lambda_logit.fill_(0.8)
    lam = 1 / (1 + math.exp(-0.8))
    off = ~torch.eye(5, dtype=torch.bool)
    r_s = student[off] / distill.tau
    r_img = (_unit(t_img) @ _unit(t_img).T)[off] / 0.07
    r_txt = (_unit(t_txt) @ _unit(t_txt).T)[off] / 0.07
    r_t = lam * r_txt + (1 - lam) * r_img

    def d(x: torch.Tensor) -> float:
        return (x.abs().mean() if kind == "mae" else x.square().mean()).item()

    out = distill(student, t_img, t_txt)
    assert out.struct.item() == pytest.approx(d(r_s - r_t))
    assert out.lambda_terms.item() == pytest.approx(d(r_img - r_t) + d(r_txt - r_t))
    assert out.total.item() == pytest.approx(2.0 * d(r_s - r_t) + 1.0 * (d(r_img - r_t) + d(r_txt - r_t)))
    assert distill.lam == pytest.approx(lam)


def test_distillation_gradient_routing() -> None:
    t_img, t_txt = _teachers()
    t_img.requires_grad_()
    t_txt.requires_grad_()
    student = torch.randn(6, 6, dtype=torch.float64, requires_grad=True)
    distill = StructureDistillation(kind="mse").double()
    with torch.no_grad():
        distill.lambda_logit.fill_(1.0)  # away from 0.5, where the mse λ terms are stationary

    out = distill(student, t_img, t_txt)
    out.struct.backward(retain_graph=True)  # struct trains the student, τ₂ and λ
    assert distill.lambda_logit.grad is not None and distill.lambda_logit.grad != 0
    assert distill.log_tau.grad is not None and distill.log_tau.grad != 0
    assert student.grad is not None and student.grad.abs().sum() > 0

    distill.log_tau.grad = distill.lambda_logit.grad = student.grad = None
    out.lambda_terms.backward()  # the λ terms reach λ only
    assert distill.lambda_logit.grad is not None and distill.lambda_logit.grad != 0
    assert distill.log_tau.grad is None and student.grad is None
    assert t_img.grad is None and t_txt.grad is None


def _relations(student: torch.Tensor, t_img: torch.Tensor, t_txt: torch.Tensor, tau: float) -> tuple[torch.Tensor, ...]:
    off = ~torch.eye(student.shape[0], dtype=torch.bool)
    r_img = (_unit(t_img) @ _unit(t_img).T)[off] / 0.07
    r_txt = (_unit(t_txt) @ _unit(t_txt).T)[off] / 0.07
    return student[off] / tau, r_img, r_txt


@pytest.mark.parametrize("kind", ["mae", "mse"])
@pytest.mark.parametrize("logit", [0.0, 0.8, -1.3])
def test_distillation_lambda_gradient_matches_formula(kind: str, logit: float) -> None:
    """d total / d logit = σ′ · (2 · d struct/dλ + d lambda_terms/dλ), with struct's part not detached."""
    t_img, t_txt = _teachers(b=7, fi=4, ft=9, seed=5)
    student = torch.randn(7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    distill = StructureDistillation(kind=kind).double()  # type: ignore[arg-type]
    with torch.no_grad():
        distill.lambda_logit.fill_(logit)
    lam = distill.lam
    r_s, r_img, r_txt = _relations(student, t_img, t_txt, distill.tau)
    residual, delta = r_s - (lam * r_txt + (1 - lam) * r_img), r_txt - r_img
    if kind == "mae":
        d_struct = -(residual.sign() * delta).mean().item()
        d_terms = 0.0  # mean|R_img − R_txt| whatever λ
    else:
        d_struct = -(2 * residual * delta).mean().item()
        d_terms = (4 * lam - 2) * delta.square().mean().item()
    distill(student, t_img, t_txt).total.backward()
    assert distill.lambda_logit.grad is not None
    expected = lam * (1 - lam) * (2.0 * d_struct + 1.0 * d_terms)
    assert distill.lambda_logit.grad.item() == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert distill.lambda_logit.grad.item() != 0


@pytest.mark.parametrize("kind", ["mae", "mse"])
def test_distillation_lambda_gradient_points_to_the_teacher_the_student_follows(kind: str) -> None:
    t_img, t_txt = _teachers(b=8, fi=5, ft=5, seed=7)
    noise = 0.05 * torch.randn(8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    for teacher, sign in ((t_txt, -1.0), (t_img, 1.0)):  # λ is the text teacher's weight
        distill = StructureDistillation(kind=kind).double()  # type: ignore[arg-type]
        student = _unit(teacher) @ _unit(teacher).T + noise  # the student's relations follow this teacher
        distill(student, t_img, t_txt).total.backward()
        grad = distill.lambda_logit.grad
        assert grad is not None and grad.item() * sign > 0  # a descent step moves λ towards `teacher`


def test_distillation_mse_lambda_equilibrium() -> None:
    """With mse the λ terms pull towards 0.5: for a fixed student and τ₂, λ settles at (2 λ* + 1) / 4."""
    t_img, t_txt = _teachers(b=9, fi=6, ft=6, seed=9)
    student = 0.8 * (_unit(t_txt) @ _unit(t_txt).T) + 0.2 * (_unit(t_img) @ _unit(t_img).T)
    student = student + 0.1 * torch.randn(9, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    distill = StructureDistillation(kind="mse").double()
    r_s, r_img, r_txt = _relations(student, t_img, t_txt, distill.tau)
    delta = r_txt - r_img
    lam_struct = ((r_s - r_img) * delta).mean() / delta.square().mean()  # least-squares λ of struct alone
    lam_total = (2 * lam_struct + 1) / 4
    assert 0.5 < lam_total.item() < lam_struct.item() < 1
    with torch.no_grad():
        distill.lambda_logit.fill_(torch.logit(lam_total).item())
    distill(student, t_img, t_txt).total.backward()
    assert distill.lambda_logit.grad is not None
    assert distill.lambda_logit.grad.item() == pytest.approx(0.0, abs=1e-9)


def _learn_lambda(kind: str, informative: str, steps: int = 100, n: int = 256, batch: int = 32, seed: int = 0) -> float:
    """Train a small two-tower student (InfoNCE + distillation) where one teacher carries the pairs' structure.

    A latent z [n, 16] underlies everything: the student's image and text inputs are noisy views of z, the
    informative teacher is a noisy rotated view of z (its cosines follow z's), the other teacher is independent
    Gaussian noise. The ranking loss makes the student's relations follow z, so λ must move to the informative
    teacher. Returns the final λ (the text teacher's weight).
    """
    torch.manual_seed(seed)
    z = torch.randn(n, 16)
    x_img, x_txt = z + 0.2 * torch.randn(n, 16), z + 0.2 * torch.randn(n, 16)
    rotation = torch.linalg.qr(torch.randn(16, 16))[0]
    structured, noise = z @ rotation + 0.2 * torch.randn(n, 16), torch.randn(n, 16)
    t_txt, t_img = (structured, noise) if informative == "txt" else (noise, structured)
    f_img, f_txt = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)
    objective = make_objective("infonce", distill_weight=1.0, distill_kind=kind)
    distill = objective.distillation
    assert distill is not None and distill.lam == pytest.approx(0.5)
    params = [*f_img.parameters(), *f_txt.parameters(), *objective.parameters()]
    optimizer = torch.optim.Adam(params, lr=0.05)
    for _ in range(steps):
        idx = torch.randperm(n)[:batch]
        images, texts = _unit(f_img(x_img[idx])), _unit(f_txt(x_txt[idx]))
        scores = images @ texts.T
        loss = objective(scores, distill_inputs=DistillInputs(scores, t_img[idx], t_txt[idx]))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return distill.lam


@pytest.mark.parametrize(
    ("kind", "txt_above", "img_below"),
    # reached (seed 0): mae 0.85 / 0.15; mse 0.62 / 0.38, as mse's λ terms hold λ nearer 0.5 (equilibrium test)
    [("mae", 0.75, 0.25), ("mse", 0.58, 0.42)],
)
def test_distillation_lambda_learns_the_informative_teacher(kind: str, txt_above: float, img_below: float) -> None:
    assert _learn_lambda(kind, informative="txt") > txt_above  # text teacher informative: λ (its weight) grows
    assert _learn_lambda(kind, informative="img") < img_below  # image teacher informative: λ shrinks


def test_distillation_mae_lambda_terms_do_not_depend_on_lambda() -> None:
    """Documents a property of the specified λ terms: with mae they sum to mean|R_img − R_txt| for every λ."""
    t_img, t_txt = _teachers()
    distill = StructureDistillation(kind="mae").double()
    student = torch.zeros(6, 6, dtype=torch.float64)
    values = []
    for logit in (-2.0, 0.0, 1.5):
        with torch.no_grad():
            distill.lambda_logit.fill_(logit)
        values.append(distill(student, t_img, t_txt).lambda_terms.item())
    assert values == pytest.approx([values[0]] * 3)
    distill(student, t_img, t_txt).lambda_terms.backward()
    assert distill.lambda_logit.grad is not None
    assert distill.lambda_logit.grad.item() == pytest.approx(0.0, abs=1e-9)


def test_distillation_mae_and_mse_differ() -> None:
    t_img, t_txt = _teachers()
    student = torch.randn(6, 6, dtype=torch.float64)
    mae = StructureDistillation(kind="mae").double()(student, t_img, t_txt)
    mse = StructureDistillation(kind="mse").double()(student, t_img, t_txt)
    assert mae.struct.item() != pytest.approx(mse.struct.item())
    with pytest.raises(UserInputError, match="mae"):
        StructureDistillation(kind="l1")  # type: ignore[arg-type]


def test_distillation_batch_of_one_is_zero_and_backpropagates() -> None:
    student = torch.tensor([[0.4]], requires_grad=True)
    out = StructureDistillation()(student, torch.randn(1, 5), torch.randn(1, 3))
    assert out.struct.item() == out.lambda_terms.item() == out.total.item() == 0.0
    out.total.backward()
    assert student.grad is not None


def test_distillation_rejects_mismatched_teachers() -> None:
    with pytest.raises(ValueError, match="teacher_txt"):
        StructureDistillation()(torch.zeros(3, 3), torch.zeros(3, 4), torch.zeros(2, 4))


# ---------------------------------------------------------------------------------------------------------------
# objective


def test_make_objective_errors() -> None:
    with pytest.raises(UserInputError, match=r"unknown loss 'arcface'; valid: infonce, triplet"):
        make_objective("arcface")
    with pytest.raises(UserInputError, match="distillation weight"):
        make_objective(distill_weight=-1.0)
    with pytest.raises(UserInputError, match="distillation kind"):
        make_objective(distill_weight=1.0, distill_kind="huber")
    with pytest.raises(UserInputError, match="temperature"):
        make_objective("infonce", temperature=5.0)


@pytest.mark.parametrize("name", ["triplet", "infonce", "InfoNCE"])
def test_objective_without_distillation(name: str) -> None:
    objective = make_objective(name)
    assert objective.distillation is None
    s = torch.tensor(S3, requires_grad=True)
    ids = torch.tensor([0, 0, 1])
    out = objective(s, ids, hardest=False)
    assert set(out) == {"loss", "base", "struct", "lambda_terms"}
    assert out["loss"].item() == pytest.approx(out["base"].item())
    assert out["struct"].item() == out["lambda_terms"].item() == 0.0
    out["loss"].backward()
    assert s.grad is not None


def test_objective_hardest_switch_reaches_triplet() -> None:
    objective = make_objective("triplet")
    s = torch.tensor(S3, dtype=torch.float64)
    assert objective(s, hardest=False)["loss"].item() == pytest.approx(2.3)
    assert objective(s, hardest=True)["loss"].item() == pytest.approx(2.2)


def test_objective_with_distillation() -> None:
    objective = make_objective("triplet", distill_weight=0.5).double()
    assert isinstance(objective, CrossModalObjective) and objective.distillation is not None
    t_img, t_txt = _teachers(b=3)
    student = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(S3, dtype=torch.float64, requires_grad=True)
    out = objective(s, None, True, DistillInputs(student, t_img, t_txt))
    expected_distill = objective.distillation(student, t_img, t_txt).total.item()
    assert out["loss"].item() == pytest.approx(2.2 + 0.5 * expected_distill)
    assert not out["base"].requires_grad and not out["struct"].requires_grad
    out["loss"].backward()
    assert student.grad is not None and s.grad is not None
    with pytest.raises(ValueError, match="distill_inputs"):
        objective(s, None, True)
