"""Seeds as an axis: the spread every table prints, grouping by configuration, the --seeds checks. The tune's ranking
over seeds is gssf_cli.training.tune_results (tests/unit/training/test_tune_results.py)."""

from __future__ import annotations

import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gssf_cli.core.errors import UserInputError
from gssf_cli.evaluation.seeds import by_configuration, check_seeds, spread, summarize

finite = st.floats(-1e6, 1e6, allow_nan=False)


@given(st.lists(finite, min_size=2, max_size=20))
def test_spread_is_the_mean_and_sample_std(values: list[float]) -> None:
    found = spread(values)
    assert found.n == len(values)
    assert found.mean == pytest.approx(statistics.fmean(values), abs=1e-6)
    assert found.std == pytest.approx(statistics.stdev(values), rel=1e-9, abs=1e-6)


def test_one_value_has_no_spread_and_says_so() -> None:
    one = spread([3.0])
    assert (one.mean, one.std, one.n) == (3.0, 0.0, 1)
    assert one.text() == "3.00" and spread([1.0, 3.0]).text(1) == "2.0 ± 1.4"


def test_summarize_keeps_the_metrics_every_run_has() -> None:
    runs = [{"rsum": 100.0, "loss": 1.0, "only_first": 5.0}, {"rsum": 110.0, "loss": float("nan")}]
    summary = summarize(runs)
    assert list(summary) == ["rsum"]
    assert summary["rsum"].mean == 105.0 and summary["rsum"].n == 2


def test_configurations_differ_in_anything_but_the_seed() -> None:
    items = [{"block_size": 4, "seed": 0}, {"block_size": 8, "seed": 0}, {"block_size": 4, "seed": 1}]
    groups = by_configuration(items, lambda v: v)
    assert [(values, len(members)) for values, members in groups] == [({"block_size": 4}, 2), ({"block_size": 8}, 1)]


@pytest.mark.parametrize("seeds", [(), (0, 1, 0)])
def test_bad_seed_lists_are_refused(seeds: tuple[int, ...]) -> None:
    with pytest.raises(UserInputError, match="--seeds"):
        check_seeds(seeds)
