"""One source of truth: the configs and the library accept and reject exactly the same values."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gssf_cli.core import limits
from gssf_cli.core.config import default_of, from_dict
from gssf_cli.core.errors import UserInputError
from gssf_cli.core.stage_configs import TrainConfig
from gssf_cli.modeling.losses import HingeTripletLoss, InfoNCELoss, make_objective
from gssf_cli.modeling.similarity import make_similarity

NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([0.0, 0.01, 1.0, -0.0, 1e-9, 0.0099, 1.0001, math.nan, math.inf, -math.inf]),
)


def _accepts(build: Any) -> bool:
    try:
        build()
    except UserInputError:
        return False
    return True


def _config_accepts(**values: Any) -> bool:
    return _accepts(lambda: from_dict(TrainConfig, {"data": Path("d"), **values}, "train"))


@settings(max_examples=200, deadline=None)
@given(value=NUMBERS)
def test_temperature_same_rule_in_config_and_losses(value: float) -> None:
    config = _config_accepts(loss="infonce", temperature=value)
    assert config == _accepts(lambda: InfoNCELoss(temperature=value))
    assert config == _accepts(lambda: make_objective("infonce", temperature=value))


@settings(max_examples=200, deadline=None)
@given(value=NUMBERS)
def test_margin_same_rule_in_config_and_losses(value: float) -> None:
    config = _config_accepts(margin=value)
    assert config == _accepts(lambda: HingeTripletLoss(margin=value))
    assert config == _accepts(lambda: make_objective("triplet", margin=value))


@settings(max_examples=200, deadline=None)
@given(value=NUMBERS)
def test_distill_weight_same_rule_in_config_and_objective(value: float) -> None:
    assert _config_accepts(distill_weight=value) == _accepts(lambda: make_objective(distill_weight=value))


@settings(max_examples=100, deadline=None)
@given(dim=st.integers(1, 256), block=st.integers(-2, 300), name=st.sampled_from(limits.BLOCK_SIMILARITIES))
def test_block_size_same_rule_in_config_and_similarity(dim: int, block: int, name: str) -> None:
    config = _config_accepts(metric=name, embed_dim=dim, block_size=block)
    assert config == _accepts(lambda: make_similarity(name, dim, block))


def test_library_defaults_are_the_config_defaults() -> None:
    assert HingeTripletLoss().margin == default_of(TrainConfig, "margin")
    assert InfoNCELoss().temperature == pytest.approx(default_of(TrainConfig, "temperature"))
    from gssf_cli.modeling.encoder_spec import EncoderSpec

    spec = EncoderSpec(vocab_size=5)
    for name in ("embed_dim", "word_dim", "pooling", "mlp", "gru_layers"):
        assert getattr(spec, name) == default_of(TrainConfig, name)


def test_config_literals_are_the_library_names() -> None:
    from typing import get_args, get_type_hints

    hints = get_type_hints(TrainConfig)
    assert get_args(hints["metric"]) == limits.SIMILARITY_NAMES
    assert get_args(hints["loss"]) == limits.LOSS_NAMES
    assert get_args(hints["metric_norm"]) == limits.NORM_NAMES


@pytest.mark.parametrize(
    ("within", "inside", "outside"),
    [
        (limits.AT_LEAST_ONE, [1, 7], [0, -1, math.nan]),
        (limits.POSITIVE, [1e-12, 3.0], [0.0, -1.0, math.nan]),
        (limits.NON_NEGATIVE, [0.0, 2.0, 1e308], [-1e-12, math.nan, -math.inf, math.inf]),
        (limits.FRACTION, [0.5], [0.0, 1.0, math.nan]),
        (limits.TEMPERATURE, [0.01, 1.0], [0.0099, 1.01, math.nan]),
    ],
)
def test_ranges(within: limits.Range, inside: list[float], outside: list[float]) -> None:
    assert all(within.contains(v) for v in inside)
    assert not any(within.contains(v) for v in outside)
    with pytest.raises(UserInputError, match=r"^train\.x: must"):
        within.check("train.x", outside[0])


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("within", [limits.POSITIVE, limits.NON_NEGATIVE, limits.AT_LEAST_ONE, limits.FRACTION])
def test_no_range_holds_a_non_finite_number(within: limits.Range, value: float) -> None:
    assert not within.contains(value)
    with pytest.raises(UserInputError, match=r"^train\.x: must be a finite number, got"):
        within.check("train.x", value)


def test_every_float_setting_must_be_finite() -> None:
    """Generic (config.check_ranges): whatever the field, with or without a declared range."""
    import dataclasses
    import typing

    from gssf_cli.core.stage_configs import EvaluateConfig, ExportConfig, PrepareConfig, TuneConfig

    required: dict[type, dict[str, Any]] = {
        TrainConfig: {"data": "d"},
        PrepareConfig: {"dataset": "digits", "out": "d"},
        ExportConfig: {},
        EvaluateConfig: {"run": "latest"},
        TuneConfig: {"params": ["lr=0.1,0.2"]},
    }
    checked = 0
    for cls, values in required.items():
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if float not in (hints[field.name], *typing.get_args(hints[field.name])):
                continue
            for bad in (math.nan, math.inf, -math.inf):
                with pytest.raises(UserInputError, match=rf"\.{field.name}: must be a finite number"):
                    from_dict(cls, {**values, field.name: bad}, "x")
            checked += 1
    assert checked >= 11


@pytest.mark.parametrize("dim", [1, 2, 12, 64, 97, 360, 1024, 2**20, 3 * 5 * 7 * 11 * 13 * 17])
def test_valid_block_sizes_are_the_divisors(dim: int) -> None:
    small = [k for k in range(1, math.isqrt(dim) + 1) if dim % k == 0]
    assert limits.valid_block_sizes(dim) == sorted({*small, *(dim // k for k in small)})


@pytest.mark.parametrize(
    "dim", [limits.MAX_EMBED_DIM, limits.MAX_EMBED_DIM - 1, 16_777_213, 3 * 5 * 7 * 11 * 13 * 17 * 19]
)
def test_block_sizes_of_the_largest_dimensions_divide(dim: int) -> None:
    """Up to the largest D a config accepts, trial division gives every divisor; a wrong size's message stays
    short (the list is cut), however many divisors D has."""
    sizes = limits.valid_block_sizes(dim)
    assert sizes[0] == 1 and sizes[-1] == dim and all(dim % k == 0 for k in sizes)
    assert sizes == sorted(set(sizes))
    with pytest.raises(UserInputError, match=r"valid block sizes: 1, ") as caught:
        limits.check_block_size("gssf", dim, dim + 1)
    assert len(str(caught.value)) < 600


def test_an_embedding_size_beyond_the_bound_is_refused_by_the_config() -> None:
    from gssf_cli.core.config import from_dict
    from gssf_cli.core.stage_configs import TrainConfig

    values = {"data": "d", "metric": "gssf", "block_size": 1}
    assert from_dict(TrainConfig, {**values, "embed_dim": limits.MAX_EMBED_DIM}, "train").embed_dim == 2**24
    with pytest.raises(UserInputError, match=r"train.embed_dim: .*must be in \[1, 16,777,216\]"):
        from_dict(TrainConfig, {**values, "embed_dim": 10**30}, "train")


def test_checking_a_block_size_that_divides_needs_no_factorisation() -> None:
    import time

    started = time.perf_counter()
    for _ in range(1000):
        limits.check_block_size("gssf", 2**200, 2**100)
    assert time.perf_counter() - started < 0.5
