"""The trial child runs of a tune run in MLflow, written by the tune's driver only (never by a trial).

Why a class of its own: the same runs are written live (Tune's driver-side callback calls the
:class:`~gssf_cli.training.tune_results.TrialLog` methods as trials start, report and end), completed after ``fit()`` from the
ResultGrid (:meth:`TrialRuns.settle`: what a failed store write dropped, or every trial under Ray Client, where
callbacks run on the cluster's head node), and re-attached by a resumed tune — one writer, one set of runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

from gssf_cli.training import tune_results

if TYPE_CHECKING:
    from gssf_cli.tracking.adapter import Tracker
    from gssf_cli.training.tune_plan import TunePlan
    from gssf_cli.training.tune_results import TrialOutcome

TRIAL_STAGE = "tune_trial"
TRIAL_TAG = "gssf.tune.trial_id"


class TrialRuns:
    """The trial child runs of one tune run: the :class:`~gssf_cli.training.tune_results.TrialLog` that Tune's callback writes
    live, and :meth:`settle` after ``fit()``.

    The runs already under the tune run (a resumed tune) are re-attached by their :data:`TRIAL_TAG`: a trial
    that starts again continues its own run, and an epoch whose step that run already has is not logged again
    (a trial continues from its last checkpoint, which may be older than the last epoch logged). ``replay``:
    nothing arrives live (Ray Client), so :meth:`settle` writes every trial from its outcome. Leaving the
    ``with`` block ends every run still open KILLED (the driver stopped under it).
    """

    def __init__(self, tracker: Tracker, tune_run_id: str, plan: TunePlan, replay: bool) -> None:
        self.tracker, self.tune_run_id, self.plan, self.replay = tracker, tune_run_id, plan, replay
        self.run_ids: dict[str, str] = {}
        self.status: dict[str, str] = {}
        self.steps: dict[str, set[int]] = {}
        for found in tracker.child_runs(tune_run_id):
            trial_id = found.data.tags.get(TRIAL_TAG)
            if trial_id and trial_id not in self.run_ids:
                self.run_ids[trial_id] = found.info.run_id
                self.status[trial_id] = str(found.info.status)

    def __enter__(self) -> TrialRuns:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        for trial_id, status in list(self.status.items()):
            if status == "RUNNING":
                with contextlib.suppress(Exception):  # never mask what stopped the driver
                    self.tracker.end_run(self.run_ids[trial_id], "KILLED")
                    self.status[trial_id] = "KILLED"

    def trial_started(self, trial_id: str, values: Mapping[str, Any], path: str) -> None:
        run_id = self.run_ids.get(trial_id)
        if run_id is None:
            handle = self.tracker.open_run(
                TRIAL_STAGE,
                run_name=tune_results.trial_run_name(values),
                parent_run_id=self.tune_run_id,
                tags=_trial_tags(self.plan, trial_id, values, path),
            )
            self.run_ids[trial_id], self.steps[trial_id] = handle.run_id, set()
            handle.log_params(_trial_params(self.plan, values))
        elif self.status.get(trial_id) != "RUNNING":
            self.tracker.reopen_run(run_id)
        self.status[trial_id] = "RUNNING"

    def trial_result(self, trial_id: str, epoch: int, metrics: Mapping[str, float]) -> None:
        run_id = self.run_ids.get(trial_id)
        if run_id is None:
            return
        steps = self._steps(trial_id)
        if epoch not in steps:
            self.tracker.run_handle(run_id).log_metrics(metrics, step=epoch)
            steps.add(epoch)

    def trial_ended(self, trial_id: str, status: str, epochs: int, error: str | None) -> None:
        self._end(trial_id, status, epochs, error, stopped=status == "KILLED")

    def settle(self, outcome: TrialOutcome, interrupted: bool) -> str | None:
        """Make the trial's run match its outcome after ``fit()`` (epochs missing, an end that did not arrive —
        trials cut short by Ctrl-C end KILLED here), or create it from the outcome when there is none but there is
        something to show; return its id (None: the trial never started)."""
        trial_id = outcome.trial_id
        if trial_id not in self.run_ids:
            if not (self.replay or outcome.history or outcome.error):
                return None
            run_id = _record_trial(self.tracker, self.tune_run_id, outcome, self.plan, stopped=not interrupted)
            self.run_ids[trial_id], self.status[trial_id] = run_id, outcome.status
            return run_id
        for epoch, _, metrics in outcome.history:
            self.trial_result(trial_id, epoch, metrics)
        if self.status.get(trial_id) != outcome.status:
            stopped = outcome.status == "KILLED" and not interrupted
            self._end(trial_id, outcome.status, outcome.epochs, outcome.error, stopped=stopped)
        return self.run_ids[trial_id]

    def _end(self, trial_id: str, status: str, epochs: int, error: str | None, stopped: bool) -> None:
        run_id = self.run_ids.get(trial_id)
        if run_id is None:
            return
        tags = _end_tags(self.plan, status, epochs, error, stopped)
        if tags:
            self.tracker.run_handle(run_id).set_tags(tags)
        self.tracker.end_run(run_id, status)
        self.status[trial_id] = status

    def _steps(self, trial_id: str) -> set[int]:
        if trial_id not in self.steps:
            self.steps[trial_id] = set(self.tracker.metric_steps(self.run_ids[trial_id], self.plan.metric_key))
        return self.steps[trial_id]


def _trial_tags(plan: TunePlan, trial_id: str, values: Mapping[str, Any], path: str) -> dict[str, str]:
    tags = {
        TRIAL_TAG: trial_id,
        "gssf.tune.trial_path": path,
        "gssf.tune.values": tune_results.describe_values(values),
        "gssf.task": plan.task,
    }
    train_values = tune_results.trial_values_or_none(plan, values)
    if train_values:
        tags["gssf.metric"] = str(train_values["metric"])
    return tags


def _trial_params(plan: TunePlan, values: Mapping[str, Any]) -> dict[str, Any]:
    """The trial's full train config as ``train.*`` params (just its tuned values if no train config takes them)."""
    train_values = tune_results.trial_values_or_none(plan, values) or {}
    return {f"train.{k}": v for k, v in train_values.items()} or dict(values)


def _end_tags(plan: TunePlan, status: str, epochs: int, error: str | None, stopped: bool) -> dict[str, str]:
    """Why a trial ended early: its error, or the scheduler stopping it (``stopped``)."""
    tags: dict[str, str] = {}
    if status == "FAILED" and error:
        tags["gssf.error"] = error[:5000]
    if status == "KILLED" and stopped:
        tags["gssf.tune.stopped"] = f"stopped early after {epochs} of {plan.base.epochs} epochs"
    return tags


def _record_trial(tracker: Tracker, tune_run_id: str, outcome: TrialOutcome, plan: TunePlan, stopped: bool) -> str:
    """A trial's whole run from its outcome, with the trial's own timestamps (Ray Client, or a live log that
    failed)."""
    tags = {
        **_trial_tags(plan, outcome.trial_id, outcome.values, outcome.path),
        **_end_tags(plan, outcome.status, outcome.epochs, outcome.error, stopped),
    }
    metrics: list[tuple[int, int, Mapping[str, float]]] = list(outcome.history)
    return tracker.record_run(
        TRIAL_STAGE,
        run_name=tune_results.trial_run_name(outcome.values),
        status=outcome.status,
        parent_run_id=tune_run_id,
        params=_trial_params(plan, outcome.values),
        history=metrics,
        tags=tags,
        start_time_ms=outcome.start_ms,
        end_time_ms=outcome.end_ms,
    )
