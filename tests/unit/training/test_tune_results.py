"""gssf_cli.training.tune_results: what a tune makes of its trials; with a seed axis, configurations ranked by their
mean over seeds and the best trial taken from the best configuration."""

from __future__ import annotations

from gssf_cli.training.tune_plan import rank_key
from gssf_cli.training.tune_results import TrialOutcome, best_trial, configurations, repeated


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
