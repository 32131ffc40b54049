"""gssf's ASHA keeps its decisions and rungs on disk, and a scheduler rebuilt from them (as ``Tuner.restore``
rebuilds it from ``tuner.pkl``) decides as the one that was lost: the same answer for a result it had seen, and
cutoffs from every value recorded before."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

from gssf_cli.cluster.durable_asha import STATE_FILE, TIME_ATTR, DurableASHA, durable_asha


@dataclass
class _Trial:
    trial_id: str


def _scheduler(folder: Path | None) -> DurableASHA:
    scheduler = durable_asha(str(folder) if folder else None, max_t=3, grace_period=1, reduction_factor=2)
    scheduler.set_search_properties("val_rsum", "max")
    return scheduler


def _result(scheduler: DurableASHA, trial: str, epoch: int, value: float) -> str:
    return scheduler.on_trial_result(None, _Trial(trial), {TIME_ATTR: epoch, "val_rsum": value})


def test_a_rebuilt_scheduler_decides_as_the_lost_one(tmp_path: Path) -> None:
    first = _scheduler(tmp_path)
    for trial in ("a", "b", "c"):
        first.on_trial_add(None, _Trial(trial))
    assert _result(first, "a", 1, 10.0) == first.CONTINUE
    assert _result(first, "b", 1, 5.0) == first.STOP
    assert (tmp_path / STATE_FILE).is_file()

    rebuilt = pickle.loads(pickle.dumps(first))  # what Tuner.restore does with tuner.pkl; then, as Tune does:
    rebuilt.set_search_properties("val_rsum", "max")
    fresh = _scheduler(None)
    for scheduler in (rebuilt, fresh):
        for trial in ("a", "b", "c"):
            scheduler.on_trial_add(None, _Trial(trial))
    assert _result(rebuilt, "b", 1, 5.0) == rebuilt.STOP, "a result seen before gets the same decision"
    assert _result(rebuilt, "c", 1, 7.0) == rebuilt.STOP, "below the cutoff of the values recorded before the loss"
    assert _result(fresh, "c", 1, 7.0) == fresh.CONTINUE, "what Ray's own restore does: no values, no cutoff"


def test_without_a_folder_nothing_is_written(tmp_path: Path) -> None:
    scheduler = _scheduler(None)
    scheduler.on_trial_add(None, _Trial("a"))
    assert _result(scheduler, "a", 1, 1.0) == scheduler.CONTINUE
    assert list(tmp_path.iterdir()) == []
