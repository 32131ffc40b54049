"""The trial child runs of a tune run, written by the driver: re-attached after a resume, completed from the
outcomes (no Ray: the events are what Tune's callback passes on; real tunes: test_tune.py)."""

from __future__ import annotations

from pathlib import Path

from gssf_cli.core.stage_configs import TuneConfig
from gssf_cli.stages.trial_runs import TrialRuns
from gssf_cli.tracking.adapter import Tracker
from gssf_cli.training.tune_plan import make_plan
from tests.unit.stages.tune_helpers import logged_steps


def test_trial_runs_are_reattached_and_completed_from_the_outcomes(moduledir: Path) -> None:
    """The MLflow side of a trial's life across a driver that died and a resume (no Ray: the events are what
    Tune's callback passes on): a trial that starts again continues its own run, an epoch already there is not
    logged twice, and after ``fit()`` what the live log missed comes from the outcome — the epochs of a run,
    the whole run of a trial never seen live; a trial that never started gets no run."""
    from gssf_cli.training.tune_results import TrialOutcome

    config = TuneConfig(
        params=("block_size=4,8,16",), data=Path("data/syn"), base=("embed_dim=32", "metric=bdiag"), epochs=3
    )
    plan = make_plan(config, cpu_count=2)
    tracker = Tracker(experiment="trial-runs")

    def metrics(epoch: int) -> dict[str, float]:
        return {"val_rsum": 10.0 * epoch, "loss": 1.0 / epoch}

    def outcome(trial_id: str, block: int, epochs: int, status: str) -> TrialOutcome:
        history = [(e, 1_700_000_000_000 + e, metrics(e)) for e in range(1, epochs + 1)]
        best = 10.0 * epochs if epochs else None
        return TrialOutcome(trial_id, {"block_size": block}, status, best, epochs, 1.0, history=history)

    with tracker.start_run("tune") as tune_run:
        with TrialRuns(tracker, tune_run.run_id, plan, replay=False) as first:
            first.trial_started("a", {"block_size": 4}, "/ray/a")
            first.trial_result("a", 1, metrics(1))
            first.trial_result("a", 1, metrics(1))
        assert tracker.run_status(first.run_ids["a"]) == "KILLED", "the driver stopped under a running trial"
        with TrialRuns(tracker, tune_run.run_id, plan, replay=False) as resumed:
            resumed.trial_started("a", {"block_size": 4}, "/ray/a")
            resumed.trial_result("a", 1, metrics(1))
            resumed.trial_result("a", 2, metrics(2))
            ids = [resumed.settle(outcome("a", 4, 3, "FINISHED"), interrupted=False)]
            ids.append(resumed.settle(outcome("b", 8, 1, "KILLED"), interrupted=False))
            assert resumed.settle(outcome("c", 16, 0, "KILLED"), interrupted=True) is None
    children = {c.data.tags["gssf.tune.trial_id"]: c for c in tracker.child_runs(tune_run.run_id)}
    assert sorted(children) == ["a", "b"] and [children["a"].info.run_id, children["b"].info.run_id] == ids
    a, b = children["a"], children["b"]
    assert a.info.status == "FINISHED" and a.info.run_name.startswith("trial-block_size=4-")
    assert logged_steps(tracker, a) == [1, 2, 3] and a.data.params["train.block_size"] == "4"
    assert b.info.status == "KILLED" and b.data.tags["gssf.tune.stopped"] == "stopped early after 1 of 3 epochs"
    assert logged_steps(tracker, b) == [1] and b.data.params["train.metric"] == "bdiag"
