"""gssf_cli.modeling.interaction against SCAN's definition written out here: a plain loop over pairs that cuts each
caption to its valid words and builds the attended vectors (which the module never does), with a GSSF member as the
token similarity. Plus where ``--gssf-at`` puts the learned similarity (one pair computed by hand, scalar by
scalar), the family starting at cosine, padding that never counts, blocks and activation checkpointing that change
neither scores nor gradients, matched-pair scoring and SCAN's published defaults."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

from gssf_cli.core.limits import AGGREGATES, GSSF_AT, NORM_NAMES, SCAN_SETTINGS, SIMILARITY_NAMES
from gssf_cli.modeling import interaction as interaction_module
from gssf_cli.modeling.interaction import Interaction, make_interaction
from gssf_cli.modeling.similarity import Similarity, make_similarity

RTOL, ATOL = 1e-9, 1e-11
DIM, BLOCK = 8, 2
REGIONS, MAX_WORDS = 5, 6
LENGTHS = (4, 1, 6, 3)
"""Caption lengths of the default batch: one single word, one with no padding at all."""
IMAGES = 3
SCAN_KINDS = tuple(SCAN_SETTINGS)
LEARNED = [name for name in SIMILARITY_NAMES if name != "cosine"]


@dataclass(frozen=True)
class Setting:
    """An interaction's settings as the CLI passes them to :func:`make_interaction` (None: the default)."""

    kind: str
    gssf_at: str | None = None
    aggregate: str | None = None
    lambda_softmax: float | None = None
    lambda_lse: float | None = None

    def __str__(self) -> str:
        parts = [self.kind, self.gssf_at, self.aggregate]
        if self.lambda_softmax is not None:
            parts.append(f"l1={self.lambda_softmax:g},l2={self.lambda_lse:g}")
        return "-".join(part for part in parts if part is not None)

    def build(self, similarity: Similarity) -> Interaction:
        built = make_interaction(
            self.kind, similarity, self.gssf_at, self.aggregate, self.lambda_softmax, self.lambda_lse
        )
        assert built is not None
        return built


SETTINGS = [
    *(Setting(kind, at, agg) for kind in SCAN_KINDS for at in GSSF_AT for agg in AGGREGATES),
    Setting("scan-t2i", "both", "lse", lambda_softmax=2.5, lambda_lse=0.7),
    Setting("scan-i2t", "both", "lse", lambda_softmax=13.0, lambda_lse=20.0),
    Setting("maxsim"),
]
DEFAULT_SETTINGS = [Setting(kind, "both") for kind in SCAN_KINDS] + [Setting("maxsim")]
"""One setting per kind, with the learned similarity everywhere SCAN can use it."""


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tensors here are tiny: intra-op threads only add overhead on busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_close(actual: Tensor, expected: Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL)


def randn(gen: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


@dataclass
class Tokens:
    """Regions ``[Bi, R, D]`` (unit rows), words ``[Bt, L, D]`` (unit rows, zero at padding), ``mask [Bt, L]``."""

    regions: Tensor
    words: Tensor
    mask: Tensor

    def scores(self, interaction: Interaction) -> Tensor:
        return interaction(self.regions, self.words, self.mask)


def tokens(
    gen: torch.Generator,
    images: int = IMAGES,
    regions: int = REGIONS,
    lengths: tuple[int, ...] = LENGTHS,
    max_words: int = MAX_WORDS,
    dim: int = DIM,
) -> Tokens:
    mask = torch.arange(max_words)[None] < torch.tensor(lengths)[:, None]
    words = F.normalize(randn(gen, len(lengths), max_words, dim), dim=-1) * mask[..., None]
    return Tokens(F.normalize(randn(gen, images, regions, dim), dim=-1), words, mask)


def member(
    name: str, gen: torch.Generator | None, dim: int = DIM, block: int = BLOCK, norm: str = "none"
) -> Similarity:
    """A float64 member; with ``gen``, every parameter moved off its initial value so that it is not cosine."""
    similarity = make_similarity(name, dim, block, norm).double()
    if gen is not None:
        with torch.no_grad():
            for param in similarity.parameters():
                param.add_(0.5 * randn(gen, *param.shape))
    return similarity


# ----------------------------------------------------------------------------------------------------------
# References


def clipped_l2norm(x: Tensor, dim: int) -> Tensor:
    """SCAN's ``clipped_l2norm``: ``LeakyReLU(0.1)``, then ``l2norm`` (``X / (|X| + 1e-8)``) along ``dim``."""
    x = F.leaky_relu(x, 0.1)
    return x / (x.pow(2).sum(dim=dim, keepdim=True).sqrt() + 1e-8)


def scan_reference(interaction: Interaction, regions: Tensor, words: Tensor, mask: Tensor) -> Tensor:
    """SCAN's definition as a plain loop over pairs (kuanghuei/SCAN ``xattn_score_t2i`` / ``xattn_score_i2t`` with
    ``func_attention`` and ``clipped_l2norm``; maxsim as ColBERT's ``mean_l max_r``): each caption is cut to its
    valid words and the attended vectors are built. ``s(x, y) = transform(x) · y`` (image side transformed)
    replaces the inner product in the attention logits and/or the cosine of the relevance, where ``gssf_at`` says;
    a learned relevance compares unit vectors."""
    sim, kind = interaction.metric, interaction.kind
    learned_logits = interaction.gssf_at in ("attention", "both")
    learned_relevance = interaction.gssf_at in ("relevance", "both")
    lambda_softmax, lambda_lse = interaction.lambda_softmax, interaction.lambda_lse

    def s(image_side: Tensor, text_side: Tensor) -> Tensor:
        """Rows against rows: ``[n, D] × [m, D] → [n, m]``."""
        return sim.transform(image_side) @ text_side.T

    rows = []
    for v in regions:  # [R, D]
        row = []
        for caption, valid in zip(words, mask, strict=True):
            e = caption[valid]  # [n, D]: the caption cut to its words, as SCAN does
            if kind == "maxsim":
                row.append(s(v, e).max(dim=0).values.mean())
                continue
            logits = s(v, e) if learned_logits else v @ e.T  # [R, n]
            if kind == "scan-t2i":
                alpha = torch.softmax(lambda_softmax * clipped_l2norm(logits, dim=1), dim=0)  # a word over regions
                attended = alpha.T @ v  # [n, D]: a_l = Σ_r α_rl v_r
                if learned_relevance:
                    relevance = (sim.transform(F.normalize(attended, dim=1)) * e).sum(1)
                else:
                    relevance = F.cosine_similarity(attended, e, dim=1)
            else:
                beta = torch.softmax(lambda_softmax * clipped_l2norm(logits, dim=0), dim=1)  # a region over words
                attended = beta @ e  # [R, D]: b_r = Σ_l β_rl e_l
                if learned_relevance:
                    relevance = (sim.transform(v) * F.normalize(attended, dim=1)).sum(1)
                else:
                    relevance = F.cosine_similarity(v, attended, dim=1)
            if interaction.aggregate == "mean":
                row.append(relevance.mean())
            else:
                row.append(torch.log(torch.exp(lambda_lse * relevance).sum()) / lambda_lse)
        rows.append(torch.stack(row))
    return torch.stack(rows)


def one_pair_by_hand(
    kind: str, matrix: Tensor, gssf_at: str, v: Tensor, e: Tensor, lambda_softmax: float, lambda_lse: float
) -> float:
    """One pair's LogSumExp score, scalar by scalar, with ``s(x, y) = x M y`` from the member's effective matrix:
    ``attention`` puts ``s`` only in the logits (the relevance stays cosine), ``relevance`` only in the relevance,
    ``both`` in both. ``e`` holds the caption's valid words only."""

    def learned(x: Tensor, y: Tensor) -> float:
        return float(x @ matrix @ y)

    def dot(x: Tensor, y: Tensor) -> float:
        return float(x @ y)

    logit = learned if gssf_at in ("attention", "both") else dot
    pair = learned if gssf_at in ("relevance", "both") else dot

    def relevance(x: Tensor, y: Tensor) -> float:
        return pair(x / x.norm(), y / y.norm())

    regions, words = range(len(v)), range(len(e))
    clipped = [[max(z, 0.1 * z) for z in (logit(v[r], e[w]) for w in words)] for r in regions]
    relevances = []
    if kind == "scan-t2i":
        norms = [math.sqrt(sum(c * c for c in clipped[r])) + 1e-8 for r in regions]  # a region over the words
        for w in words:
            weights = [math.exp(lambda_softmax * clipped[r][w] / norms[r]) for r in regions]
            attended = torch.zeros_like(v[0])
            for r in regions:
                attended = attended + weights[r] / sum(weights) * v[r]
            relevances.append(relevance(attended, e[w]))
    else:
        norms = [math.sqrt(sum(clipped[r][w] ** 2 for r in regions)) + 1e-8 for w in words]  # a word over regions
        for r in regions:
            weights = [math.exp(lambda_softmax * clipped[r][w] / norms[w]) for w in words]
            attended = torch.zeros_like(e[0])
            for w in words:
                attended = attended + weights[w] / sum(weights) * e[w]
            relevances.append(relevance(v[r], attended))
    return math.log(sum(math.exp(lambda_lse * x) for x in relevances)) / lambda_lse


# ----------------------------------------------------------------------------------------------------------
# Scores against SCAN's definition


@pytest.mark.parametrize("setting", SETTINGS, ids=str)
@pytest.mark.parametrize("name", SIMILARITY_NAMES)
def test_scores_equal_the_plain_loop_over_pairs(name: str, setting: Setting) -> None:
    gen = torch.Generator().manual_seed(0)
    interaction = setting.build(member(name, gen))
    batch = tokens(gen)
    with torch.no_grad():
        scores = batch.scores(interaction)
        expected = scan_reference(interaction, batch.regions, batch.words, batch.mask)
    assert scores.shape == (IMAGES, len(LENGTHS))
    assert_close(scores, expected)


@dataclass(frozen=True)
class Case:
    """Sizes D, d, Bi, R, the caption lengths, the member, its norm, the setting and the seed."""

    dim: int
    block: int
    images: int
    regions: int
    lengths: tuple[int, ...]
    name: str
    norm: str
    setting: Setting
    seed: int


@st.composite
def cases(draw: st.DrawFn) -> Case:
    """Edge sizes included: one region, one word, one image or caption, block size 1 or D."""
    dim = draw(st.sampled_from([4, 6, 8]))
    block = draw(st.sampled_from([k for k in range(1, dim + 1) if dim % k == 0]))
    lengths = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
    return Case(
        dim,
        block,
        draw(st.integers(1, 3)),
        draw(st.integers(1, 4)),
        lengths,
        draw(st.sampled_from(SIMILARITY_NAMES)),
        draw(st.sampled_from(NORM_NAMES)),
        draw(st.sampled_from(SETTINGS)),
        draw(st.integers(0, 2**32 - 1)),
    )


@given(case=cases(), extra_padding=st.integers(0, 2))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_scores_equal_the_plain_loop_at_any_size_and_norm(case: Case, extra_padding: int) -> None:
    gen = torch.Generator().manual_seed(case.seed)
    interaction = case.setting.build(member(case.name, gen, case.dim, case.block, case.norm))
    batch = tokens(gen, case.images, case.regions, case.lengths, max(case.lengths) + extra_padding, case.dim)
    with torch.no_grad():
        expected = scan_reference(interaction, batch.regions, batch.words, batch.mask)
        assert_close(batch.scores(interaction), expected)


# ----------------------------------------------------------------------------------------------------------
# Where --gssf-at puts the learned similarity


@pytest.mark.parametrize("aggregate", AGGREGATES)
@pytest.mark.parametrize("kind", SCAN_KINDS)
@pytest.mark.parametrize("name", LEARNED)
def test_gssf_at_changes_the_scores_of_a_learned_member(name: str, kind: str, aggregate: str) -> None:
    gen = torch.Generator().manual_seed(1)
    similarity, batch = member(name, gen), tokens(gen)
    with torch.no_grad():
        scores = {at: batch.scores(Setting(kind, at, aggregate).build(similarity)) for at in GSSF_AT}
    for first, second in itertools.combinations(GSSF_AT, 2):
        gap = float((scores[first] - scores[second]).abs().max())
        assert gap > 1e-4, (first, second, gap)


@pytest.mark.parametrize("aggregate", AGGREGATES)
@pytest.mark.parametrize("kind", SCAN_KINDS)
def test_gssf_at_makes_no_difference_with_cosine(kind: str, aggregate: str) -> None:
    gen = torch.Generator().manual_seed(1)
    similarity, batch = member("cosine", None), tokens(gen)
    with torch.no_grad():
        scores = [batch.scores(Setting(kind, at, aggregate).build(similarity)) for at in GSSF_AT]
    for other in scores[1:]:
        assert_close(other, scores[0])


@pytest.mark.parametrize("gssf_at", GSSF_AT)
@pytest.mark.parametrize("kind", SCAN_KINDS)
@pytest.mark.parametrize("name", LEARNED)
def test_one_pair_by_hand_equals_the_module(name: str, kind: str, gssf_at: str) -> None:
    gen = torch.Generator().manual_seed(2)
    similarity, batch = member(name, gen), tokens(gen)
    interaction = Setting(kind, gssf_at).build(similarity)
    with torch.no_grad():
        scores = batch.scores(interaction)
        matrix = similarity.effective_matrix().detach()
    for image, caption in [(0, 0), (2, 1), (1, 2)]:
        e = batch.words[caption][batch.mask[caption]]
        expected = one_pair_by_hand(
            kind, matrix, gssf_at, batch.regions[image], e, interaction.lambda_softmax, interaction.lambda_lse
        )
        assert math.isclose(float(scores[image, caption]), expected, rel_tol=RTOL, abs_tol=ATOL), (image, caption)


# ----------------------------------------------------------------------------------------------------------
# The family starts at cosine


@pytest.mark.parametrize("setting", SETTINGS, ids=str)
def test_every_member_scores_as_cosine_at_initialisation(setting: Setting) -> None:
    gen = torch.Generator().manual_seed(3)
    batch = tokens(gen)
    with torch.no_grad():
        cosine = batch.scores(setting.build(member("cosine", None)))
        for name, norm in itertools.product(LEARNED, NORM_NAMES):
            assert_close(batch.scores(setting.build(member(name, None, norm=norm))), cosine)
        # and a moved member does not: the comparison can fail
        assert not torch.allclose(batch.scores(setting.build(member("gssf", gen))), cosine, rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------------------------------------
# Padding never counts


def padded(batch: Tokens, extra: int, fill: Tensor | None) -> Tokens:
    """``extra`` more padded positions per caption; ``fill [Bt, L + extra, D]`` (if given) is written at every padded
    position, the old ones included."""
    words = torch.cat([batch.words, batch.words.new_zeros(len(batch.words), extra, batch.words.shape[-1])], dim=1)
    mask = torch.cat([batch.mask, batch.mask.new_zeros(len(batch.mask), extra)], dim=1)
    if fill is not None:
        words = torch.where(mask[..., None], words, fill)
    return Tokens(batch.regions, words, mask)


@pytest.mark.parametrize("garbage", [False, True], ids=["zeros", "garbage"])
@pytest.mark.parametrize("setting", SETTINGS, ids=str)
def test_padded_positions_do_not_change_the_scores(setting: Setting, garbage: bool) -> None:
    gen = torch.Generator().manual_seed(4)
    interaction, batch = setting.build(member("gssf", gen)), tokens(gen)
    extra = 3
    fill = 10 * randn(gen, len(LENGTHS), MAX_WORDS + extra, DIM) if garbage else None
    longer = padded(batch, extra, fill)
    with torch.no_grad():
        assert_close(longer.scores(interaction), batch.scores(interaction))
        index = torch.tensor([0, 1, 2, 0])
        assert_close(
            interaction.pairs(longer.regions[index], longer.words, longer.mask),
            interaction.pairs(batch.regions[index], batch.words, batch.mask),
        )


@pytest.mark.parametrize("setting", SETTINGS, ids=str)
def test_a_pair_scores_the_same_alone_as_in_a_batch(setting: Setting) -> None:
    """Alone: the image against the caption cut to its own length, no other caption padding it out."""
    gen = torch.Generator().manual_seed(5)
    interaction, batch = setting.build(member("gssf", gen)), tokens(gen)
    with torch.no_grad():
        scores = batch.scores(interaction)
        for image, (caption, length) in itertools.product(range(IMAGES), enumerate(LENGTHS)):
            alone = interaction(
                batch.regions[image : image + 1],
                batch.words[caption : caption + 1, :length],
                batch.mask[caption : caption + 1, :length],
            )
            assert_close(alone, scores[image : image + 1, caption : caption + 1])


# ----------------------------------------------------------------------------------------------------------
# Blocks and activation checkpointing


BUDGETS = [1, REGIONS * MAX_WORDS, 2 * REGIONS * MAX_WORDS, 5 * REGIONS * MAX_WORDS, 7 * REGIONS * MAX_WORDS]
"""``BLOCK_ELEMENTS`` below one batch: 1×1 blocks, 2×1 (the last row of blocks short), 3×1, 3×2 (the last column
short). The default batch holds ``3·4·R·L`` token pairs."""


@dataclass
class Spy:
    """Counts the blocks that ``score_block`` scores (their sizes) and the calls to ``checkpoint``."""

    blocks: list[tuple[int, int]]
    checkpoints: int = 0


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Spy:
    record = Spy([])
    real_checkpoint = interaction_module.checkpoint

    def counting_checkpoint(*args: Any, **kwargs: Any) -> Any:
        record.checkpoints += 1
        return real_checkpoint(*args, **kwargs)

    monkeypatch.setattr(interaction_module, "checkpoint", counting_checkpoint)
    return record


def watch_blocks(monkeypatch: pytest.MonkeyPatch, interaction: Interaction, record: Spy) -> None:
    real_score_block: Callable[..., Tensor] = interaction.score_block

    def counting_score_block(regions: Tensor, learned: Any, region_gram: Any, words: Tensor, *rest: Any) -> Tensor:
        record.blocks.append((len(regions), len(words)))
        return real_score_block(regions, learned, region_gram, words, *rest)

    monkeypatch.setattr(interaction, "score_block", counting_score_block)


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("setting", DEFAULT_SETTINGS, ids=str)
def test_scores_in_many_blocks_equal_one_block(
    setting: Setting, budget: int, monkeypatch: pytest.MonkeyPatch, spy: Spy
) -> None:
    gen = torch.Generator().manual_seed(6)
    interaction, batch = setting.build(member("gssf", gen)), tokens(gen)
    with torch.no_grad():
        whole = batch.scores(interaction)
        monkeypatch.setattr(interaction_module, "BLOCK_ELEMENTS", budget)
        watch_blocks(monkeypatch, interaction, spy)
        blocked = batch.scores(interaction)
    assert_close(blocked, whole)
    assert len(spy.blocks) > 1
    per_pair = REGIONS * MAX_WORDS
    assert all(images * captions * per_pair <= max(budget, per_pair) for images, captions in spy.blocks), spy.blocks
    assert sum(images * captions for images, captions in spy.blocks) == IMAGES * len(LENGTHS)
    assert spy.checkpoints == 0  # nothing to recompute without autograd


def leaf(x: Tensor) -> Tensor:
    return x.detach().clone().requires_grad_(True)


def gradients(interaction: Interaction, batch: Tokens, weights: Tensor, score: Callable[..., Tensor]) -> list[Tensor]:
    """Gradients of ``Σ weights ⊙ scores`` w.r.t. regions, words and the similarity's parameters."""
    regions, words = leaf(batch.regions), leaf(batch.words)
    params = list(interaction.metric.parameters())
    loss = (weights * score(regions, words, batch.mask)).sum()
    return list(torch.autograd.grad(loss, [regions, words, *params]))


@pytest.mark.parametrize(("budget", "blocks"), [(1, IMAGES * len(LENGTHS)), (5 * REGIONS * MAX_WORDS, len(LENGTHS))])
@pytest.mark.parametrize("setting", SETTINGS, ids=str)
def test_checkpointed_blocks_give_the_gradients_of_one_plain_pass(
    setting: Setting, budget: int, blocks: int, monkeypatch: pytest.MonkeyPatch, spy: Spy
) -> None:
    gen = torch.Generator().manual_seed(7)
    interaction, batch = setting.build(member("gssf", gen)), tokens(gen)
    weights = randn(gen, IMAGES, len(LENGTHS))
    expected = gradients(interaction, batch, weights, interaction.all_pairs)  # one block, no checkpoint
    monkeypatch.setattr(interaction_module, "BLOCK_ELEMENTS", budget)
    watch_blocks(monkeypatch, interaction, spy)
    got = gradients(interaction, batch, weights, interaction)
    assert spy.checkpoints == blocks  # every block checkpointed ...
    assert len(spy.blocks) == 2 * blocks  # ... and run again in the backward pass
    assert len(got) == len(expected) == 2 + len(list(interaction.metric.parameters()))
    for actual, wanted in zip(got, expected, strict=True):
        assert torch.isfinite(actual).all()
        assert_close(actual, wanted)


# ----------------------------------------------------------------------------------------------------------
# Matched pairs


@pytest.mark.parametrize("setting", SETTINGS, ids=str)
@pytest.mark.parametrize("name", ["cosine", "gssf", "dense"])
def test_pairs_equal_the_selected_entries_of_all_pairs(name: str, setting: Setting) -> None:
    gen = torch.Generator().manual_seed(8)
    interaction, batch = setting.build(member(name, gen)), tokens(gen)
    images, captions = torch.tensor([0, 1, 2, 2, 0, 1]), torch.tensor([0, 3, 2, 1, 1, 0])
    with torch.no_grad():
        scores = batch.scores(interaction)
        matched = interaction.pairs(batch.regions[images], batch.words[captions], batch.mask[captions])
        diagonal = interaction.pairs(batch.regions, batch.words[:IMAGES], batch.mask[:IMAGES])
    assert matched.shape == (len(images),)
    assert_close(matched, scores[images, captions])
    assert_close(diagonal, torch.diagonal(scores[:, :IMAGES]))


# ----------------------------------------------------------------------------------------------------------
# Construction


def test_no_interaction_is_none() -> None:
    assert make_interaction("none", member("gssf", None)) is None


@pytest.mark.parametrize(("kind", "lambda_softmax", "lambda_lse"), [("scan-t2i", 9.0, 6.0), ("scan-i2t", 4.0, 5.0)])
def test_scan_defaults_are_the_published_ones(kind: str, lambda_softmax: float, lambda_lse: float) -> None:
    interaction = Setting(kind).build(member("gssf", None))
    published = SCAN_SETTINGS[kind]
    assert (published.lambda_softmax, published.lambda_lse, published.aggregate) == (lambda_softmax, lambda_lse, "lse")
    assert (interaction.lambda_softmax, interaction.lambda_lse) == (lambda_softmax, lambda_lse)
    assert (interaction.gssf_at, interaction.aggregate) == ("relevance", "lse")


def test_given_settings_override_the_defaults() -> None:
    interaction = Setting("scan-t2i", "attention", "mean", 0.0, 20.0).build(member("gssf", None))
    assert (interaction.gssf_at, interaction.aggregate) == ("attention", "mean")
    assert (interaction.lambda_softmax, interaction.lambda_lse) == (0.0, 20.0)  # 0 is a value, not "unset"


def test_the_interaction_owns_no_parameters() -> None:
    """The model owns (and saves) the similarity: the interaction must not register it a second time."""
    similarity = member("gssf", None)
    interaction = Setting("scan-t2i").build(similarity)
    assert interaction.metric is similarity
    assert list(interaction.parameters()) == [] and interaction.state_dict() == {}


@pytest.mark.parametrize("kind", ["none", "scan", "colbert"])
def test_not_an_interaction_is_refused(kind: str) -> None:
    with pytest.raises(ValueError, match=f"not an interaction: '{kind}'"):
        Interaction(kind, member("gssf", None))
