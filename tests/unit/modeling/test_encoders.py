"""Encoders: shapes and unit norms, equivalence of the padded bidirectional GRU with the packed one, padding
invariance, pooling, parameter counts, and feature towers with layers. The spec and the builder are
gssf_cli.modeling.encoder_spec, tested in test_encoder_spec.py."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from gssf_cli.core.errors import UserInputError
from gssf_cli.modeling.encoders import (
    DualEncoder,
    FeatureEncoder,
    ImageEncoder,
    SingleTower,
    TextEncoder,
    l2_normalize,
    parameter_counts,
    reverse_within_length,
)

VOCAB, WORD, D, F_IN = 40, 12, 16, 10


def unit_norms(x: Tensor) -> None:
    torch.testing.assert_close(x.norm(dim=-1), torch.ones(x.shape[0]), atol=1e-5, rtol=0)


def random_tokens(batch: int, length: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Tokens ``[B, L]`` with zero padding after random lengths in [1, L] (one full row, one of length 1)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    lengths[0], lengths[-1] = length, 1
    tokens = torch.randint(1, VOCAB, (batch, length), generator=gen)
    tokens[torch.arange(length).unsqueeze(0) >= lengths.unsqueeze(1)] = 0
    return tokens, lengths


def randomise_attention(module: nn.Module) -> None:
    """Attention scoring starts at zero (= mean pooling); give it weights so that it actually weighs."""
    for name, p in module.named_parameters():
        if "pool.score" in name:
            nn.init.normal_(p, std=1.0)


@pytest.mark.parametrize("pooling", ["mean", "max", "attention"])
@pytest.mark.parametrize("mlp", [False, True])
def test_image_encoder_shapes_and_norms(pooling: str, mlp: bool) -> None:
    torch.manual_seed(0)
    enc = ImageEncoder(F_IN, D, pooling, mlp)
    randomise_attention(enc)
    regions = enc(torch.randn(4, 6, F_IN))
    assert regions.shape == (4, D)
    unit_norms(regions)
    glob = torch.randn(1, F_IN)
    out = enc.eval()(glob)
    assert out.shape == (1, D)
    unit_norms(out)
    torch.testing.assert_close(out, enc(glob.unsqueeze(1)))
    torch.testing.assert_close(out, l2_normalize(enc.proj(glob)))


@pytest.mark.parametrize("mlp", [False, True])
def test_feature_encoder_shapes_and_norms(mlp: bool) -> None:
    enc = FeatureEncoder(64, D, mlp)
    out = enc(torch.randn(5, 64))
    assert out.shape == (5, D)
    unit_norms(out)
    unit_norms(enc.eval()(torch.randn(1, 64)))


@pytest.mark.parametrize("pooling", ["mean", "max", "attention"])
@pytest.mark.parametrize("layers", [1, 2])
def test_text_encoder_shapes_and_norms(pooling: str, layers: int) -> None:
    torch.manual_seed(0)
    enc = TextEncoder(VOCAB, D, WORD, layers, pooling)
    tokens, lengths = random_tokens(5, 8)
    out = enc(tokens, lengths)
    assert out.shape == (5, D)
    unit_norms(out)
    torch.testing.assert_close(enc(tokens), out)


def packed_reference(enc: TextEncoder, tokens: Tensor, lengths: Tensor) -> Tensor:
    """Per-token states ``[B, L, D]`` of a standard packed ``nn.GRU(bidirectional=True)`` with ``enc``'s weights,
    directions averaged."""
    ref = nn.GRU(WORD, D, num_layers=enc.num_layers, bidirectional=True, batch_first=True)
    with torch.no_grad():
        for k, (gru_f, gru_b) in enumerate(zip(enc.gru_fwd, enc.gru_bwd, strict=True)):
            for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(ref, f"{kind}_l{k}").copy_(getattr(gru_f, f"{kind}_l0"))
                getattr(ref, f"{kind}_l{k}_reverse").copy_(getattr(gru_b, f"{kind}_l0"))
    packed = nn.utils.rnn.pack_padded_sequence(enc.embed(tokens), lengths, batch_first=True, enforce_sorted=False)
    out, _ = ref(packed)
    out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=tokens.shape[1])
    return (out[..., :D] + out[..., D:]) / 2


@pytest.mark.parametrize("pooling", ["mean", "max", "attention"])
@pytest.mark.parametrize("layers", [1, 2])
def test_padded_bigru_matches_packed_reference(pooling: str, layers: int) -> None:
    torch.manual_seed(layers)
    enc = TextEncoder(VOCAB, D, WORD, layers, pooling).eval()
    randomise_attention(enc)
    tokens, lengths = random_tokens(9, 11, seed=layers)
    with torch.no_grad():
        states, mask = enc.token_states(tokens, lengths)
        ref_states = packed_reference(enc, tokens, lengths)
        assert (states - ref_states)[mask].abs().max() < 1e-5
        ref_out = l2_normalize(enc.pool(ref_states, mask))
        assert (enc(tokens, lengths) - ref_out).abs().max() < 1e-5


@pytest.mark.parametrize("pooling", ["mean", "max", "attention"])
def test_text_outputs_ignore_padding(pooling: str) -> None:
    torch.manual_seed(1)
    enc = TextEncoder(VOCAB, D, WORD, 2, pooling).eval()
    randomise_attention(enc)
    tokens, lengths = random_tokens(6, 7, seed=3)
    with torch.no_grad():
        base = enc(tokens, lengths)
        wider = torch.cat([tokens, torch.zeros(6, 5, dtype=tokens.dtype)], dim=1)
        torch.testing.assert_close(enc(wider, lengths), base, atol=1e-6, rtol=0)
        noisy = wider.clone()
        pad = torch.arange(wider.shape[1]).unsqueeze(0) >= lengths.unsqueeze(1)
        noisy[pad] = torch.randint(1, VOCAB, (int(pad.sum()),))
        torch.testing.assert_close(enc(noisy, lengths), base, atol=1e-6, rtol=0)


def test_text_lengths_are_clipped_to_the_sequence() -> None:
    enc = TextEncoder(VOCAB, D, WORD).eval()
    tokens, _ = random_tokens(4, 6)
    with torch.no_grad():
        full = enc(tokens, torch.full((4,), 6))
        torch.testing.assert_close(enc(tokens, torch.full((4,), 99)), full)
        torch.testing.assert_close(enc(tokens, torch.zeros(4, dtype=torch.long)), enc(tokens, torch.ones(4).long()))
        unit_norms(enc(torch.zeros(2, 3, dtype=torch.long)))


def test_reverse_within_length_flips_valid_steps_only() -> None:
    x = torch.randn(4, 6, 3)
    lengths = torch.tensor([6, 3, 1, 0])
    rev = reverse_within_length(x, lengths)
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(rev[b, :n], x[b, :n].flip(0))
        torch.testing.assert_close(rev[b, n:], x[b, n:])
    torch.testing.assert_close(reverse_within_length(rev, lengths), x)


def test_attention_weights_sum_to_one() -> None:
    torch.manual_seed(0)
    img = ImageEncoder(F_IN, D, "attention")
    randomise_attention(img)
    w = img.pool.weights(img.regions(torch.randn(3, 7, F_IN)))
    assert w.shape == (3, 7)
    assert (w > 0).all()
    torch.testing.assert_close(w.sum(dim=1), torch.ones(3))
    assert w.std(dim=1).min() > 0

    txt = TextEncoder(VOCAB, D, WORD, pooling="attention")
    randomise_attention(txt)
    tokens, lengths = random_tokens(5, 6)
    states, mask = txt.token_states(tokens, lengths)
    w = txt.pool.weights(states, mask)
    torch.testing.assert_close(w.sum(dim=1), torch.ones(5))
    assert (w[~mask] == 0).all()


def test_attention_pooling_starts_as_mean_and_learns() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 7, F_IN)
    att, mean = ImageEncoder(F_IN, D, "attention"), ImageEncoder(F_IN, D, "mean")
    mean.proj.load_state_dict(att.proj.state_dict())
    torch.testing.assert_close(att(x), mean(x))
    (att(x) * torch.randn(3, D)).sum().backward()
    assert att.pool.score is not None
    assert att.pool.score.weight.grad is not None and att.pool.score.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_mean_and_max_pooling_match_direct_computation(pooling: str) -> None:
    torch.manual_seed(0)
    img = ImageEncoder(F_IN, D, pooling, mlp=True)
    x = torch.randn(4, 5, F_IN)
    projected = img.proj.proj(x) + img.proj.mlp(x)  # type: ignore[misc]
    pooled = projected.mean(dim=1) if pooling == "mean" else projected.max(dim=1).values
    torch.testing.assert_close(img(x), pooled / pooled.norm(dim=1, keepdim=True))

    txt = TextEncoder(VOCAB, D, WORD, pooling=pooling)
    tokens, lengths = random_tokens(4, 6)
    states, _ = txt.token_states(tokens, lengths)
    rows = [states[b, :n] for b, n in enumerate(lengths.tolist())]
    direct = torch.stack([r.mean(0) if pooling == "mean" else r.max(0).values for r in rows])
    torch.testing.assert_close(txt(tokens, lengths), l2_normalize(direct))


@pytest.mark.parametrize("shape", [(6, 5, F_IN), (6, F_IN)])
def test_mean_pooling_of_a_linear_projection_pools_first_with_the_same_result(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    img = ImageEncoder(F_IN, D, "mean", mlp=False)
    assert img.pools_first()
    x = torch.randn(*shape, dtype=torch.float64)
    img.double()
    fused = img(x)
    img.pool_first = False
    assert not img.pools_first()
    torch.testing.assert_close(fused, img(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("pooling", "mlp"), [("max", False), ("attention", False), ("mean", True)])
def test_only_mean_of_a_plain_projection_pools_first(pooling: str, mlp: bool) -> None:
    assert not ImageEncoder(F_IN, D, pooling, mlp).pools_first()


def test_parameter_counts_add_up() -> None:
    gru = lambda n_in: 3 * (n_in * D + D * D + 2 * D)  # noqa: E731
    text_expected = VOCAB * WORD + 2 * gru(WORD) + 2 * gru(2 * D)
    image_expected = F_IN * D + D + (F_IN * (D // 2) + D // 2) + 2 * (D // 2) + (D // 2 * D + D) + D + 1
    model = DualEncoder(ImageEncoder(F_IN, D, "attention", mlp=True), TextEncoder(VOCAB, D, WORD, 2))
    counts = parameter_counts(model)
    assert counts == {"image": image_expected, "text": text_expected, "total": image_expected + text_expected}
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    inner = parameter_counts(model.text)
    assert sum(v for k, v in inner.items() if k != "total") == inner["total"] == text_expected
    assert parameter_counts(SingleTower(FeatureEncoder(64, D))) == {"encoder": 64 * D + D, "total": 64 * D + D}


def test_dual_encoder_forward() -> None:
    model = DualEncoder(ImageEncoder(F_IN, D), TextEncoder(VOCAB, D, WORD))
    tokens, lengths = random_tokens(6, 5)
    img, txt = model(torch.randn(3, 4, F_IN), tokens, lengths)
    assert img.shape == (3, D) and txt.shape == (6, D)
    torch.testing.assert_close(model.encode_text(tokens, lengths), txt)

    feats = DualEncoder(FeatureEncoder(F_IN, D), FeatureEncoder(7, D))
    img, txt = feats(torch.randn(3, F_IN), torch.randn(3, 7))
    assert img.shape == txt.shape == (3, D)
    with pytest.raises(TypeError, match="no lengths"):
        feats.encode_text(torch.randn(3, 7), torch.ones(3))


# ---------------------------------------------------------------------------------------------------------
# Feature towers with layers (--mlp-layers, --mlp-hidden)


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_feature_tower_layers(layers: int) -> None:
    torch.manual_seed(0)
    tower = FeatureEncoder(F_IN, D, layers=layers, hidden=24)
    linears = [m for m in tower.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == layers
    assert [lin.out_features for lin in linears] == [24] * (layers - 1) + [D]
    assert sum(isinstance(m, nn.ReLU) for m in tower.modules()) == layers - 1
    assert all(torch.count_nonzero(lin.bias) == 0 for lin in linears)
    unit_norms(tower(torch.randn(5, F_IN)))


def test_feature_tower_of_one_layer_is_the_projection_it_was() -> None:
    """One layer keeps the old module layout (``proj.proj``, ``proj.mlp``), so older checkpoints load into it."""
    plain, residual = FeatureEncoder(F_IN, D), FeatureEncoder(F_IN, D, mlp=True, hidden=6)
    assert set(plain.state_dict()) == {"proj.proj.weight", "proj.proj.bias"}
    assert residual.proj.mlp is not None and residual.proj.mlp[0].out_features == 6  # type: ignore[index]
    assert FeatureEncoder(F_IN, D, mlp=True).proj.mlp[0].out_features == D // 2  # type: ignore[index]
    with pytest.raises(UserInputError, match="pass --mlp-layers 1 with --mlp"):
        FeatureEncoder(F_IN, D, mlp=True, layers=2)
