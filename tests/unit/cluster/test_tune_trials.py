"""The driver's live trial events on real Ray: what a :class:`~gssf_cli.training.tune_results.TrialLog` receives, in what order,
and that a log that keeps failing (a tracking store gone away) neither stops the search nor floods stderr (the
MLflow side of the same events: tests/unit/stages/test_tune.py)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from gssf_cli.cluster.session import storage_path
from gssf_cli.cluster.tune_trials import run_trials
from gssf_cli.core.stage_configs import TuneConfig
from gssf_cli.training.tune_plan import make_plan


class FailingLog:
    """Records every event, then fails as a log whose store went away would."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def trial_started(self, trial_id: str, values: Mapping[str, Any], path: str) -> None:
        self.events.append(("started", trial_id, dict(values), path))
        raise OSError("database is locked")

    def trial_result(self, trial_id: str, epoch: int, metrics: Mapping[str, float]) -> None:
        self.events.append(("result", trial_id, epoch, dict(metrics)))
        raise OSError("database is locked")

    def trial_ended(self, trial_id: str, status: str, epochs: int, error: str | None) -> None:
        self.events.append(("ended", trial_id, status, epochs, error))
        raise OSError("database is locked")


def test_a_failing_trial_log_gets_every_event_and_the_tune_goes_on(
    tiny_syn: Path, workdir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    config = TuneConfig(
        params=("block_size=2,4",),
        data=tiny_syn,
        base=("metric=bdiag", "embed_dim=16", "word_dim=8", "batch_size=16", "device=cpu"),
        epochs=2,
        max_concurrent=1,
        storage="ray",
    )
    plan = make_plan(config, cpu_count=2)
    log = FailingLog()
    ray_run = run_trials(plan, config, "tune-log", storage_path(config.storage), progress=True, log=log)
    out, err = capfd.readouterr()

    assert [o.status for o in ray_run.outcomes] == ["FINISHED", "FINISHED"]
    assert out == "", "progress lines go to stderr only"
    warnings = [line for line in err.splitlines() if line.startswith("gssf: warning: could not log a trial")]
    assert len(warnings) == 1 and "database is locked" in warnings[0]
    for outcome in ray_run.outcomes:
        events = [e for e in log.events if e[1] == outcome.trial_id]
        assert events[0] == ("started", outcome.trial_id, outcome.values, outcome.path)
        results = [e for e in events if e[0] == "result"]
        assert [e[2] for e in results] == [epoch for epoch, _, _ in outcome.history]
        assert all(plan.metric_key in e[3] and "epoch" not in e[3] for e in results)
        assert events[-1] == ("ended", outcome.trial_id, "FINISHED", 2, None)
        assert len(events) == 4
        shown = f"gssf tune: trial {outcome.trial_id} (block_size={outcome.values['block_size']})"
        epochs = [epoch for epoch, _, _ in outcome.history]
        assert f"{shown} started" in err and f"{shown} epoch {epochs[-1]}/2: rsum" in err
        assert f"{shown} FINISHED after 2 epochs" in err
