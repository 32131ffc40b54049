"""The pure half of tuning: the search-space syntax, statuses and ranking (no Ray, no dataset)."""

from __future__ import annotations

import pytest

from gssf_cli.core.errors import UserInputError
from gssf_cli.modeling.similarity import head_parameters as metric_head_parameters
from gssf_cli.training.tune_plan import (
    Dimension,
    combine_param_options,
    parse_overrides,
    parse_param,
    rank_key,
    trial_status,
)

# ---------------------------------------------------------------------------------------------------------
# The search-space syntax (pure logic)


def test_param_specs() -> None:
    assert parse_param("block_size=4,8,16", 32) == Dimension("block_size", "grid", (4, 8, 16))
    assert parse_param("block_size", 12).values == (1, 2, 3, 4, 6, 12)
    assert parse_param("block-size=divisors:2:8", 32).values == (2, 4, 8)
    assert parse_param("lr=1e-4:1e-2:log", 32) == Dimension("lr", "loguniform", low=1e-4, high=1e-2)
    assert parse_param("margin=0.1:0.3", 32).kind == "uniform"
    assert parse_param("embed_dim=16:64", 32) == Dimension("embed_dim", "randint", low=16, high=64)
    assert parse_param("metric=bdiag,gssf", 32).values == ("bdiag", "gssf")
    assert parse_param("mlp=true,false", 32).values == (True, False)
    assert parse_param("distill_weight=0,0.5", 32).values == (0.0, 0.5)
    assert combine_param_options(["block_size"], "8,16") == ("block_size=8,16",)
    assert parse_overrides(["metric=bdiag", "lr=0.01", "mlp=true", "teacher=t.npz"]) == {
        "metric": "bdiag",
        "lr": 0.01,
        "mlp": True,
        "teacher": "t.npz",
    }


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (
            "blocksize=4",
            "--param blocksize: unknown parameter; tunable: adapter, aggregate, amp, batch_size, block_size,",
        ),
        ("epochs=1,2", "--param epochs: not tunable, it is every trial's budget (--epochs)"),
        ("lr", "--param lr: give its values, e.g. --param lr=A,B,C"),
        ("lr=1e-3,x", "--param lr=1e-3,x: 'x' is not a number"),
        ("lr=0:1:log", "a log range needs LO > 0"),
        ("lr=1:0", "the range needs LO < HI"),
        ("lr=0.1:0.2:exp", "a range is LO:HI or LO:HI:log"),
        ("block_size=4:16", "list sizes or use divisors:4:16"),
        ("block_size=divisors:100:200", "no divisor of the embedding size 32 in [100, 200]"),
        ("metric=cos", "'cos' is not one of cosine, diag, bdiag, dense, gssf"),
        ("block_size=4,4", "a value is listed twice"),
    ],
)
def test_bad_param_specs(item: str, message: str) -> None:
    with pytest.raises(UserInputError) as caught:
        parse_param(item, 32)
    assert message in str(caught.value)


def test_values_need_exactly_one_param() -> None:
    with pytest.raises(UserInputError, match="exactly one --param"):
        combine_param_options(["lr", "margin"], "1,2")
    with pytest.raises(UserInputError, match="already has values"):
        combine_param_options(["lr=1"], "1,2")


def test_statuses_and_ranking() -> None:
    assert trial_status(False, 2, 2) == "FINISHED"
    assert trial_status(False, 1, 2) == "KILLED"
    assert trial_status(True, 2, 2) == "FAILED"
    values = [3.0, None, 5.0]
    assert sorted(values, key=lambda v: rank_key(v, "max")) == [5.0, 3.0, None]
    assert sorted(values, key=lambda v: rank_key(v, "min")) == [3.0, 5.0, None]


@pytest.mark.parametrize(("metric", "block"), [("cosine", 1), ("diag", 1), ("bdiag", 4), ("gssf", 8), ("dense", 1)])
def test_head_parameter_count_matches_the_model(metric: str, block: int) -> None:
    from gssf_cli.modeling.similarity import make_similarity

    similarity = make_similarity(metric, 32, block if metric in ("bdiag", "gssf") else None)
    assert metric_head_parameters(metric, 32, block) == similarity.num_parameters()
