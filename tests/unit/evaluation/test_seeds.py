"""Seeds as an axis: the spread every table prints, grouping trials by configuration, the tune's seed summary."""

from __future__ import annotations

import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gssf_cli.core.errors import UserInputError
from gssf_cli.evaluation.seeds import by_configuration, check_seeds, spread, summarize
from gssf_cli.training.tune_plan import rank_key
from gssf_cli.training.tune_results import (
    TrialOutcome,
    best_trial,
    block_size_axes,
    block_size_trials,
    configurations,
    repeated,
)

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


def _trial(i: int, block: int, seed: int, metric: float | None, status: str = "FINISHED") -> TrialOutcome:
    return TrialOutcome(f"t{i}", {"block_size": block, "seed": seed}, status, metric, 2, 1.0)


def test_the_tune_ranks_configurations_by_their_mean_not_their_luckiest_seed() -> None:
    trials = [
        _trial(0, 4, 0, 300.0),  # one lucky seed
        _trial(1, 4, 1, 200.0),
        _trial(2, 8, 0, 260.0),
        _trial(3, 8, 1, 262.0),
        _trial(4, 16, 0, 999.0, status="KILLED"),  # stopped early: not comparable, not counted
    ]
    found = configurations(trials, "max")
    assert repeated(found)
    assert [c.values["block_size"] for c in found] == [8, 4, 16]
    assert found[0].spread is not None and found[0].spread.mean == 261.0 and found[0].spread.n == 2
    assert found[2].spread is None and found[2].trial_ids == ()
    ranked = sorted(trials, key=lambda t: rank_key(t.metric, "max"))
    best = best_trial(ranked, found)
    assert best is not None and best.trial_id == "t3", "the best seed of the best configuration"
    single = configurations(trials[:1] + trials[2:3], "max")
    assert not repeated(single)
    alone = best_trial(sorted(trials[:1] + trials[2:3], key=lambda t: rank_key(t.metric, "max")), single)
    assert alone is not None and alone.trial_id == "t0", "without seeds, the best trial"


def test_the_block_size_figure_draws_error_bars_over_seeds() -> None:
    from types import SimpleNamespace

    from gssf_cli.evaluation import plots

    trials = [_trial(i, block, seed, 250.0 + block + seed) for i, (block, seed) in enumerate(
        [(4, 0), (4, 1), (4, 2), (8, 0), (8, 1), (8, 2)]
    )]  # fmt: skip
    plan = SimpleNamespace(mode="max", metric="rsum", base=SimpleNamespace(embed_dim=64, metric="bdiag"))
    plan.tunes = lambda name: False
    figure = plots.block_size_figure(block_size_trials(trials), block_size_axes(plan))  # type: ignore[arg-type]
    try:
        ax = figure.axes[0]
        assert any("mean ± std" in text.get_text() for text in ax.get_legend().get_texts())
        assert ax.containers, "error bars expected"
    finally:
        plots.close(figure)
