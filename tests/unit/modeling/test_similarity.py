"""gssf_cli.modeling.similarity against references built here: masks U written out entry by entry, full random W
matrices whose in-mask entries are copied into each member, per-pair scores in Python loops, norms of the
dense matrix. Plus the family's identities (d = 1 is diag, d = D is dense, gssf = diag + bdiag, every member is
cosine at init), gradients that respect the mask, scale invariance of the norms and the user errors."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

from gssf_cli.core import limits
from gssf_cli.core.errors import UserInputError
from gssf_cli.modeling.similarity import (
    NORM_NAMES,
    SIMILARITY_NAMES,
    BlockDiagonalSimilarity,
    DenseSimilarity,
    DiagonalSimilarity,
    Similarity,
    head_parameters,
    make_similarity,
    valid_block_sizes,
)

PROPS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DIMS = (2, 4, 8, 16, 32, 6, 12, 18)
RTOL, ATOL = 1e-9, 1e-11

# Which parameter holds which masked matrix: (parameter name, mask kind). cosine has W fixed to ones on U = I.
MASK_PARTS: dict[str, tuple[tuple[str, str], ...]] = {
    "cosine": (),
    "diag": (("diagonal", "identity"),),
    "bdiag": (("blocks", "block"),),
    "dense": (("matrix", "full"),),
    "gssf": (("diagonal", "identity"), ("blocks", "block")),
}
LEARNED = [name for name in SIMILARITY_NAMES if MASK_PARTS[name]]


def assert_close(actual: Tensor, expected: Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL)


def divisors(dim: int) -> list[int]:
    return [k for k in range(1, dim + 1) if dim % k == 0]


@dataclass(frozen=True)
class Case:
    """Sizes D, d, Bx, By and the seed of the random tensors (printed by hypothesis on failure)."""

    dim: int
    block: int
    bx: int
    by: int
    seed: int

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    """D among powers of two and composites, d a divisor of D, batch sizes 1..6."""
    dim = draw(st.sampled_from(DIMS))
    block = draw(st.sampled_from(divisors(dim)))
    return Case(dim, block, draw(st.integers(1, 6)), draw(st.integers(1, 6)), draw(st.integers(0, 2**32 - 1)))


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tensors here are tiny: intra-op threads only add overhead (3x slower on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randn(gen: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def embeddings(gen: torch.Generator, rows: int, dim: int) -> Tensor:
    return torch.nn.functional.normalize(randn(gen, rows, dim), dim=-1)


def mask(kind: str, dim: int, block: int) -> Tensor:
    """U written out entry by entry: 'identity', 'block' (i and j in the same block of size d) or 'full'."""
    rule = {"identity": lambda i, j: i == j, "block": lambda i, j: i // block == j // block, "full": lambda i, j: True}
    return torch.tensor([[float(rule[kind](i, j)) for j in range(dim)] for i in range(dim)], dtype=torch.float64)


def copy_in_mask_entries(module: Similarity, name: str, full: Tensor, block: int) -> None:
    """Set parameter ``name`` from the in-mask entries of a full ``[D, D]`` matrix, by explicit indexing."""
    param = getattr(module, name)
    with torch.no_grad():
        if name == "diagonal":
            param.copy_(torch.diagonal(full))
        elif name == "blocks":
            for k in range(param.shape[0]):
                param[k] = full[k * block : (k + 1) * block, k * block : (k + 1) * block]
        else:
            param.copy_(full)


def random_member(name: str, dim: int, block: int, norm: str, gen: torch.Generator) -> tuple[Similarity, Tensor]:
    """A float64 member with random parameters and its ``W ⊙ U`` (unnormalised) built independently here."""
    module = make_similarity(name, dim, block, norm).double()
    matrix = torch.eye(dim, dtype=torch.float64) if name == "cosine" else torch.zeros(dim, dim, dtype=torch.float64)
    for param, kind in MASK_PARTS[name]:
        full = randn(gen, dim, dim)
        copy_in_mask_entries(module, param, full, block)
        matrix = matrix + full * mask(kind, dim, block)
    return module, matrix


def expected_divisor(norm: str, matrix: Tensor) -> float:
    """The norm of the dense ``W ⊙ U``: Frobenius scaled so that I gives 1, or the largest singular value."""
    if norm == "frobenius":
        return float(torch.linalg.norm(matrix)) / math.sqrt(matrix.shape[0])
    if norm == "spectral":
        return float(torch.linalg.matrix_norm(matrix, ord=2))
    return 1.0


def per_pair_scores(x: Tensor, y: Tensor, matrix: Tensor) -> Tensor:
    return torch.tensor(
        [[float(x[i] @ matrix @ y[j]) for j in range(len(y))] for i in range(len(x))], dtype=torch.float64
    )


def masked_sum(matrix: Tensor, masks: list[Tensor]) -> Tensor:
    """Σ_p matrix ⊙ U_p: what a full matrix looks like through each masked part of a member."""
    return torch.stack([matrix * u for u in masks]).sum(0)


def placed_gradients(module: Similarity, block: int) -> Tensor:
    """Every parameter's gradient put at the entries of ``W ⊙ U`` it parameterises, summed into ``[D, D]``."""
    placed = torch.zeros(module.dim, module.dim, dtype=torch.float64)
    for name, param in module.named_parameters():
        assert param.grad is not None
        if name == "diagonal":
            placed += torch.diag(param.grad)
        elif name == "blocks":
            for k in range(param.shape[0]):
                placed[k * block : (k + 1) * block, k * block : (k + 1) * block] += param.grad[k]
        else:
            placed += param.grad
    return placed


# ----------------------------------------------------------------------------------------------------------
# Scores against the explicit reference


@pytest.mark.parametrize("name", SIMILARITY_NAMES)
@given(case=cases(), norm=st.sampled_from(NORM_NAMES))
@PROPS
def test_scores_equal_per_pair_reference(name: str, case: Case, norm: str) -> None:
    dim, block, bx, by = case.dim, case.block, case.bx, case.by
    gen = case.generator()
    module, matrix = random_member(name, dim, block, norm, gen)
    x, y = embeddings(gen, bx, dim), embeddings(gen, by, dim)
    expected = per_pair_scores(x, y, matrix) / expected_divisor(norm, matrix)
    assert_close(module.scores(x, y), expected)
    assert_close(module.normalizer(), torch.tensor(expected_divisor(norm, matrix), dtype=torch.float64))


@pytest.mark.parametrize("name", SIMILARITY_NAMES)
@given(case=cases(), norm=st.sampled_from(NORM_NAMES))
@PROPS
def test_transform_pairwise_forward_and_effective_matrix_agree_with_scores(name: str, case: Case, norm: str) -> None:
    dim, block, bx, by = case.dim, case.block, case.bx, case.by
    gen = case.generator()
    module, matrix = random_member(name, dim, block, norm, gen)
    x, y = embeddings(gen, bx, dim), embeddings(gen, by, dim)
    scores = module.scores(x, y)
    assert scores.shape == (bx, by)
    assert_close(module.transform(x) @ y.T, scores)
    assert_close(module(x, y), scores)
    assert_close(module.pairwise(x, y[:1].expand(bx, dim)), scores[:, 0])
    if bx == by:
        assert_close(module.pairwise(x, y), torch.diagonal(scores))
    effective = module.effective_matrix()
    assert_close(effective, matrix / expected_divisor(norm, matrix))
    assert_close(module.effective_matrix(normalized=False), matrix)
    assert_close(x @ effective @ y.T, scores)


@pytest.mark.parametrize("name", SIMILARITY_NAMES)
@given(case=cases())
@PROPS
def test_the_applied_map_is_zero_off_the_mask(name: str, case: Case) -> None:
    """transform(I) is the matrix the scores actually use: an off-mask channel pair contributes nothing."""
    dim, block = case.dim, case.block
    gen = case.generator()
    module, _ = random_member(name, dim, block, "none", gen)
    union = mask("identity", dim, block) if name == "cosine" else torch.zeros(dim, dim, dtype=torch.float64)
    for _, kind in MASK_PARTS[name]:
        union = torch.maximum(union, mask(kind, dim, block))
    applied = module.transform(torch.eye(dim, dtype=torch.float64))
    assert torch.equal(applied * (1 - union), torch.zeros_like(applied))


# ----------------------------------------------------------------------------------------------------------
# Gradients respect the mask


@pytest.mark.parametrize("name", LEARNED)
@given(case=cases())
@PROPS
def test_gradients_are_the_full_matrix_gradient_masked(name: str, case: Case) -> None:
    """For L = Σ G ⊙ S, a full W would get ∂L/∂W = Xᵀ G Y; each part must get exactly that times its mask U,
    so entries outside U get nothing. A deliberately widened mask must fail the same comparison."""
    dim, block, bx, by = case.dim, case.block, case.bx, case.by
    gen = case.generator()
    module, _ = random_member(name, dim, block, "none", gen)
    x, y, weights = embeddings(gen, bx, dim), embeddings(gen, by, dim), randn(gen, bx, by)
    (weights * module.scores(x, y)).sum().backward()
    full_gradient = x.T @ weights @ y
    parts = [mask(kind, dim, block) for _, kind in MASK_PARTS[name]]
    assert_close(placed_gradients(module, block), masked_sum(full_gradient, parts))

    if parts[-1].all():
        return
    broken = parts[-1].clone()
    i, j = torch.nonzero(broken == 0)[0].tolist()
    broken[i, j] = 1
    wrong = masked_sum(full_gradient, [*parts[:-1], broken])
    assert not torch.allclose(placed_gradients(module, block), wrong, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("norm", NORM_NAMES)
@pytest.mark.parametrize("name", LEARNED)
def test_gradients_are_finite_at_initialisation(name: str, norm: str) -> None:
    """At init all singular values are equal (1): the spectral norm's gradient must still be finite."""
    gen = torch.Generator().manual_seed(0)
    module = make_similarity(name, 12, 3, norm).double()
    x, y = embeddings(gen, 5, 12), embeddings(gen, 4, 12)
    module.scores(x, y).square().sum().backward()
    for param in module.parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all()


# ----------------------------------------------------------------------------------------------------------
# The family's identities


@given(case=cases(), norm=st.sampled_from(NORM_NAMES))
@PROPS
def test_bdiag_with_block_size_1_is_diag(case: Case, norm: str) -> None:
    dim, bx, by = case.dim, case.bx, case.by
    gen = case.generator()
    diag = DiagonalSimilarity(dim, norm).double()
    bdiag = BlockDiagonalSimilarity(dim, 1, norm).double()
    with torch.no_grad():
        diag.diagonal.copy_(randn(gen, dim))
        bdiag.blocks[:, 0, 0] = diag.diagonal
    x, y = embeddings(gen, bx, dim), embeddings(gen, by, dim)
    assert_close(bdiag.scores(x, y), diag.scores(x, y))


@given(case=cases(), norm=st.sampled_from(NORM_NAMES))
@PROPS
def test_bdiag_with_block_size_d_is_dense(case: Case, norm: str) -> None:
    dim, bx, by = case.dim, case.bx, case.by
    gen = case.generator()
    dense = DenseSimilarity(dim, norm).double()
    bdiag = BlockDiagonalSimilarity(dim, dim, norm).double()
    with torch.no_grad():
        dense.matrix.copy_(randn(gen, dim, dim))
        bdiag.blocks[0] = dense.matrix
    x, y = embeddings(gen, bx, dim), embeddings(gen, by, dim)
    assert_close(bdiag.scores(x, y), dense.scores(x, y))


@given(case=cases())
@PROPS
def test_gssf_is_diag_plus_bdiag(case: Case) -> None:
    dim, block, bx, by = case.dim, case.block, case.bx, case.by
    gen = case.generator()
    diag, _ = random_member("diag", dim, block, "none", gen)
    bdiag, _ = random_member("bdiag", dim, block, "none", gen)
    gssf = make_similarity("gssf", dim, block).double()
    gssf.load_state_dict({**diag.state_dict(), **bdiag.state_dict()})
    x, y = embeddings(gen, bx, dim), embeddings(gen, by, dim)
    assert_close(gssf.scores(x, y), diag.scores(x, y) + bdiag.scores(x, y))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(case=cases())
@PROPS
def test_every_member_is_exactly_cosine_at_initialisation(dtype: torch.dtype, case: Case) -> None:
    dim, block, bx, by = case.dim, case.block, case.bx, case.by
    gen = case.generator()
    x, y = embeddings(gen, bx, dim).to(dtype), embeddings(gen, by, dim).to(dtype)
    cosine = x @ y.T
    for name in SIMILARITY_NAMES:
        for norm in NORM_NAMES:
            module = make_similarity(name, dim, block, norm).to(dtype)
            assert module.normalizer().item() == 1.0, (name, norm)
            assert torch.equal(module.scores(x, y), cosine), (name, norm)
            assert torch.equal(module.effective_matrix(), torch.eye(dim, dtype=dtype)), (name, norm)


# ----------------------------------------------------------------------------------------------------------
# Norms


@pytest.mark.parametrize("name", LEARNED)
@given(case=cases(), scale=st.floats(1e-2, 1e2), norm=st.sampled_from(["frobenius", "spectral"]))
@PROPS
def test_normalised_scores_are_invariant_to_the_scale_of_w(name: str, case: Case, scale: float, norm: str) -> None:
    """The point of the norms: growing W cannot win the hinge margin. Without a norm the scores do grow."""
    dim, block, bx, by = case.dim, case.block, case.bx, case.by
    gen = case.generator()
    module, _ = random_member(name, dim, block, norm, gen)
    x, y = embeddings(gen, bx, dim), embeddings(gen, by, dim)
    before, raw_before = module.scores(x, y), x @ module.effective_matrix(normalized=False) @ y.T
    with torch.no_grad():
        for param in module.parameters():
            param.mul_(scale)
    assert_close(module.scores(x, y), before)
    module.norm = "none"
    assert_close(module.scores(x, y), scale * raw_before)


@pytest.mark.parametrize("norm", ["frobenius", "spectral"])
@pytest.mark.parametrize("name", LEARNED)
def test_all_zero_weights_score_zero_not_nan(name: str, norm: str) -> None:
    module = make_similarity(name, 8, 4, norm)
    with torch.no_grad():
        for param in module.parameters():
            param.zero_()
    x = torch.nn.functional.normalize(torch.ones(2, 8), dim=-1)
    assert torch.equal(module.scores(x, x), torch.zeros(2, 2))


@pytest.mark.parametrize("name", SIMILARITY_NAMES)
@given(case=cases(), norm=st.sampled_from(NORM_NAMES))
@settings(max_examples=15, deadline=None)
def test_folded_copy_scores_the_same_without_a_norm(name: str, case: Case, norm: str) -> None:
    dim, block, bx, by = case.dim, case.block, case.bx, case.by
    gen = case.generator()
    module, _ = random_member(name, dim, block, norm, gen)
    x, y = embeddings(gen, bx, dim), embeddings(gen, by, dim)
    folded = module.folded()
    assert folded.norm == "none" and module.norm == norm
    assert_close(folded.scores(x, y), module.scores(x, y))
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(folded.parameters(), module.parameters(), strict=True))


# ----------------------------------------------------------------------------------------------------------
# Construction: attributes, parameter counts, user errors


@pytest.mark.parametrize(("dim", "block"), [(12, 3), (16, 4), (1024, 64), (6, 6), (5, 1)])
def test_parameter_counts_and_attributes(dim: int, block: int) -> None:
    expected = {"cosine": 0, "diag": dim, "bdiag": dim * block, "dense": dim * dim, "gssf": dim + dim * block}
    for name in SIMILARITY_NAMES:
        module = make_similarity(name, dim, block)
        assert module.num_parameters() == expected[name]
        assert (module.name, module.dim, module.norm) == (name, dim, "none")
        assert module.block_size == (block if name in ("bdiag", "gssf") else None)


@given(st.integers(1, 600))
@settings(max_examples=60, deadline=None)
def test_valid_block_sizes_are_the_divisors(dim: int) -> None:
    assert valid_block_sizes(dim) == divisors(dim)


def test_block_size_that_does_not_divide_lists_the_valid_sizes() -> None:
    with pytest.raises(UserInputError) as raised:
        make_similarity("gssf", 1024, 48)
    assert str(raised.value) == (
        "block size 48 does not divide the embedding size 1024; "
        "valid block sizes: 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024"
    )


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        ({"name": "blockdiag", "dim": 8}, ["'blockdiag'", "cosine, diag, bdiag, dense, gssf"]),
        ({"name": "bdiag", "dim": 12}, ["needs a block size", "1, 2, 3, 4, 6, 12"]),
        ({"name": "gssf", "dim": 12}, ["needs a block size", "1, 2, 3, 4, 6, 12"]),
        ({"name": "bdiag", "dim": 12, "block_size": 5}, ["block size 5 does not divide the embedding size 12"]),
        ({"name": "bdiag", "dim": 12, "block_size": 0}, ["positive integer", "1, 2, 3, 4, 6, 12"]),
        ({"name": "gssf", "dim": 12, "block_size": -3}, ["positive integer"]),
        ({"name": "gssf", "dim": 12, "block_size": 2.0}, ["positive integer"]),
        ({"name": "diag", "dim": 0}, ["embedding size must be a positive integer"]),
        ({"name": "diag", "dim": 8, "norm": "l2"}, ["'l2'", "none, frobenius, spectral"]),
    ],
)
def test_user_errors_are_one_readable_line(kwargs: dict, fragments: list[str]) -> None:
    with pytest.raises(UserInputError) as raised:
        make_similarity(**kwargs)
    message = str(raised.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    assert isinstance(raised.value, ValueError)


@pytest.mark.parametrize("name", ["cosine", "diag", "dense"])
def test_block_size_is_ignored_where_it_does_not_apply(name: str) -> None:
    assert make_similarity(name, 12, 5).block_size is None


def test_head_parameters_match_every_member() -> None:
    for name in limits.SIMILARITY_NAMES:
        block = 4 if name in limits.BLOCK_SIMILARITIES else None
        assert head_parameters(name, 32, 4) == make_similarity(name, 32, block).num_parameters()
