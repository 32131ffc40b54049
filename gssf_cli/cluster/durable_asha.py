"""ASHA whose decisions survive a killed driver: what gssf adds to ``Tuner.restore`` so a resumed sweep stops the
trials an uninterrupted one stops.

Why: Ray Tune saves the trials and the searcher with the experiment, but not the scheduler. ``Tuner.restore``
rebuilds it from ``tuner.pkl``, written when the sweep started, so every value ASHA had recorded at its rungs
is gone (ray #30838), and a trial whose stop decision was made but not yet saved is resumed and trained to the
end. Measured before this module: a ``kill -9`` of the driver 16 s into a 4-trial ASHA sweep, then
``gssf tune --resume``, trained a trial to epoch 3 that the uninterrupted sweep stopped at epoch 1.

What this adds:

- ASHA counts in ``epoch`` (the epochs the trial has trained, which its checkpoint carries) instead of Tune's
  ``training_iteration``, which starts again from 1 for a restored trial;
- every decision, with the rungs' recorded values, is written to ``gssf-asha.json`` in the experiment's folder
  (temporary name, then rename) before Tune acts on it; a resumed sweep loads it, and a result it has already
  decided on gets the same decision again;
- a restored trial reports the epoch its checkpoint holds once more, before training on (see
  :data:`REPLAYED`), so a decision that was lost with the kill is made again, on the same values.

With one trial at a time, the resumed sweep then makes every decision the uninterrupted one made.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ray.tune.schedulers import ASHAScheduler

STATE_FILE = "gssf-asha.json"
"""The scheduler's decisions and rungs, in the experiment's folder next to Tune's own state."""

TIME_ATTR = "epoch"
"""What ASHA counts: epochs trained, as every result reports them (restored trials included)."""

REPLAYED = "gssf_replayed"
"""The key a restored trial sets on the result it reports again: the driver neither prints nor logs it twice."""


def durable_asha(folder: str | None, max_t: int, grace_period: int, reduction_factor: float) -> DurableASHA:
    """The scheduler of the sweep whose experiment folder is ``folder`` (None: a storage URI, so not kept), with
    what an earlier driver decided loaded. Tune pickles the scheduler into ``tuner.pkl`` as a call of this
    function (:meth:`DurableASHA.__reduce__`), so a restore rebuilds it here, from the JSON state."""
    scheduler = DurableASHA(folder, max_t, grace_period, reduction_factor)
    scheduler.read_state()
    return scheduler


class DurableASHA(ASHAScheduler):
    """:class:`ray.tune.schedulers.ASHAScheduler` (one bracket) that keeps its decisions in ``folder``."""

    def __init__(self, folder: str | None, max_t: int, grace_period: int, reduction_factor: float) -> None:
        super().__init__(time_attr=TIME_ATTR, max_t=max_t, grace_period=grace_period, reduction_factor=reduction_factor)
        self.folder, self.settings = folder, (max_t, grace_period, reduction_factor)
        self.decisions: dict[str, str] = {}

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (durable_asha, (self.folder, *self.settings))

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        if TIME_ATTR not in result:
            return str(self.CONTINUE)
        key = f"{trial.trial_id}@{int(result[TIME_ATTR])}"
        if key not in self.decisions:
            self.decisions[key] = str(super().on_trial_result(tune_controller, trial, result))
            self._write_state()
        return self.decisions[key]

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> None:
        super().on_trial_complete(tune_controller, trial, result)
        self._write_state()

    def read_state(self) -> None:
        path = self._path()
        if path is None or not path.is_file():
            return
        state = json.loads(path.read_text())
        self.decisions = {str(k): str(v) for k, v in state["decisions"].items()}
        for (milestone, recorded), saved in zip(self._brackets[0]._rungs, state["rungs"], strict=True):
            if int(saved["milestone"]) != milestone:
                raise ValueError(f"{path}: rung at {saved['milestone']}, this sweep's is at {milestone}")
            recorded.update({str(k): float(v) for k, v in saved["recorded"].items()})

    def _write_state(self) -> None:
        path = self._path()
        if path is None or not path.parent.is_dir():
            return
        rungs = [{"milestone": m, "recorded": dict(recorded)} for m, recorded in self._brackets[0]._rungs]
        temporary = path.with_name(f".{path.name}.{os.getpid()}")
        temporary.write_text(json.dumps({"decisions": self.decisions, "rungs": rungs}))
        os.replace(temporary, path)

    def _path(self) -> Path | None:
        return Path(self.folder) / STATE_FILE if self.folder else None
