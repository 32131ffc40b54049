"""Stage ``tune``: search train settings (the block size above all) with Ray Tune; one MLflow writer, live.

1. :func:`gssf_cli.training.tune_plan.make_plan` checks all it can before Ray starts (names, syntax, block sizes
   of every grid combination, files, the metric); ``--scheduler auto`` is FIFO for a grid, else ASHA.
2. Ray (:mod:`gssf_cli.cluster.tune_trials`): local by default, results under ``--storage`` as experiment
   ``tune-<tune run id>``; each trial is the library's own training, reporting every epoch.
3. MLflow, written by this process only (many writers lock or corrupt a SQLite file; on a cluster it is not
   even there): the tune run ``tune-<names>`` and, live, one child run per trial from Tune's driver-side
   callback (:class:`~gssf_cli.stages.trial_runs.TrialRuns`), completed from the ResultGrid after ``fit()`` (wholly
   so under Ray Client, whose callbacks run on the head node).
4. Outputs on the tune run and in ``<runs_dir>/<tune run>/``: ``trials.csv``, ``best_train.toml`` (``gssf
   train --config`` loads it) and, when the block size is tuned, ``block_size.png`` (the paper's Fig. 3).
5. Ctrl-C or SIGTERM: Tune stops and saves its state, what ran is logged, the tune run ends KILLED (exit 130);
   :func:`resume` continues it (or a RUNNING one whose driver was killed) with ``Tuner.restore``, from the
   settings recorded at its start (:func:`~gssf_cli.training.tune_results.resume_tags`), on the same runs. All
   trials failing: exit 1.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gssf_cli.core.config import dump_toml, to_dict
from gssf_cli.core.errors import CheckFailedError, UserInputError
from gssf_cli.core.stage_configs import TuneConfig
from gssf_cli.stages.trial_runs import TRIAL_STAGE, TrialRuns
from gssf_cli.training import tune_plan, tune_results

if TYPE_CHECKING:
    from gssf_cli.tracking.adapter import StageRun, Tracker
    from gssf_cli.training.tune_plan import TunePlan
    from gssf_cli.training.tune_results import TrialOutcome

STAGE = "tune"
EXPERIMENT_TAG = "gssf.tune.experiment_path"


@dataclass(frozen=True)
class TuneResult:
    run_id: str | None
    metric: str
    metric_key: str
    mode: str
    scheduler: str
    tuned: list[str]
    trials: list[dict[str, Any]]
    best: dict[str, Any] | None
    configurations: list[dict[str, Any]]
    """Per configuration across seeds (mean ± std, n), best first; empty when every configuration ran once."""
    best_config: str | None
    out_dir: str
    storage: str
    seconds: float
    trial_seconds: float
    ray_start_seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def run(
    config: TuneConfig,
    tracker: Tracker | None = None,
    parent_run_id: str | None = None,
    progress: bool = True,
    base_values: Mapping[str, Any] | None = None,
) -> TuneResult:
    """Plan and check the search (before Ray), run the trials on Ray, log the tune run and one child per trial.

    ``base_values`` is a base train config as values (a pipeline's ``[train]`` table), used when the config
    names no ``base_config`` file. ``progress`` prints one plain line per trial event on stderr.

    Raises :class:`CheckFailedError` (after logging) when every trial failed, and ``KeyboardInterrupt`` (after
    logging what ran; the tune run ends KILLED, and :func:`resume` continues it) when Ctrl-C stopped the search.
    """
    from gssf_cli.cluster.session import check_reachable, storage_path

    plan = tune_plan.make_plan(config, base_values=base_values)
    if config.address:
        check_reachable(config.address)
    check_outputs(config, plan)
    storage = storage_path(config.storage)
    if tracker is not None:
        _ = tracker.experiment_id
    search = tune_results.Search(config, plan, storage, Path.cwd())
    return _search(search, tracker, progress, parent_run_id=parent_run_id)


def resume(run_ref: str, tracker: Tracker, progress: bool = True) -> TuneResult:
    """Continue the interrupted tune run ``run_ref`` (a run id or ``latest``: the newest tune run) with the settings
    it recorded when it started; the same tune run ends FINISHED.

    Everything is checked before anything is written: a run that is not a tune run, a tune run that already
    finished, one without recorded settings, or one whose Ray results folder is gone is a one-line
    :class:`UserInputError`; so is anything :func:`tune_plan.make_plan` refuses (the dataset moved, say).
    """
    from gssf_cli.cluster.session import check_reachable, check_restorable, experiment_path
    from gssf_cli.tracking.adapter import PARENT_TAG, STAGE_TAG

    found = tracker.get_run(run_ref, stage=STAGE)
    run_id, tags = found.info.run_id, found.data.tags
    stage = tags.get(STAGE_TAG)
    if stage == TRIAL_STAGE:
        raise UserInputError(f"run {run_id} is one trial of tune run {tags.get(PARENT_TAG)}: resume that run instead")
    if stage != STAGE:
        what = f"a {stage} run" if stage else "not a gssf run"
        raise UserInputError(f"run {run_id} is not a tune run ({what}): pass the id of a `gssf tune` run, or latest")
    if found.info.status == "FINISHED":
        raise UserInputError(f"tune run {run_id} already finished: there is nothing to resume; start a new gssf tune")
    search = tune_results.saved_search(run_id, tags.get(tune_results.RESUME_TAG))
    check_outputs(search.config, search.plan)
    tracker.follow(found)
    if tracker.experiment_id != found.info.experiment_id:
        raise UserInputError(
            f"tune run {run_id} is in another experiment than --experiment {tracker.experiment_name}: "
            "drop --experiment (or name the run's own)"
        )
    if search.config.address:
        check_reachable(search.config.address)
    check_restorable(
        experiment_path(search.storage, _experiment_name(run_id)), search.config.address, f"tune run {run_id}"
    )
    return _search(search, tracker, progress, resume_run_id=run_id)


def check_outputs(config: TuneConfig, plan: TunePlan) -> None:
    """Before Ray starts or a run opens: the folders a tune writes (``--storage`` unless it is a URI, the runs
    folder that gets ``trials.csv`` and the best config) can be written, and every trial's model fits in memory."""
    from gssf_cli.core.files import check_writable
    from gssf_cli.data.manifest import load_manifest
    from gssf_cli.modeling.model import check_fits_memory, manifest_spec

    if "://" not in config.storage:
        check_writable(Path(config.storage), f"--storage {config.storage}", "--storage")
    check_writable(plan.base.runs_dir, f"the runs folder {plan.base.runs_dir}", "--base runs_dir=...")
    manifest = load_manifest(plan.base.data, verify=False)
    for trial in tune_plan.probe_configs(plan):
        check_fits_memory(manifest_spec(manifest, trial), trial)


def _search(
    search: tune_results.Search,
    tracker: Tracker | None,
    progress: bool,
    *,
    parent_run_id: str | None = None,
    resume_run_id: str | None = None,
) -> TuneResult:
    """Start (or, with ``resume_run_id``, continue) the search on Ray and log it: the part :func:`run` and
    :func:`resume` share once everything is checked."""
    from gssf_cli.cluster.tune_trials import connected, run_trials

    config, plan = search.config, search.plan
    started = time.perf_counter()
    with connected(config.address) as ray_seconds, contextlib.ExitStack() as stack:
        tune_run, trial_runs = _open_runs(stack, search, tracker, parent_run_id, resume_run_id)
        run_id = tune_run.run_id if tune_run is not None else uuid.uuid4().hex
        live = trial_runs if trial_runs is not None and not trial_runs.replay else None
        resumed = resume_run_id is not None
        ray_run = run_trials(
            plan, config, _experiment_name(run_id), search.storage, progress, live, resume=resumed, root=search.root
        )
        outcomes = ray_run.outcomes
        if trial_runs is not None:
            outcomes = [replace(o, run_id=trial_runs.settle(o, ray_run.interrupted)) for o in outcomes]
        ranked = sorted(outcomes, key=lambda o: tune_plan.rank_key(o.metric, plan.mode))
        found = tune_results.configurations(ranked, plan.mode)
        best = tune_results.best_trial(ranked, found)
        out_dir = plan.base.runs_dir / run_id
        best_file = _write_outputs(out_dir, ranked, best, plan, tune_run)
        seconds = time.perf_counter() - started
        if tune_run is not None:
            _log_end(tune_run, ranked, best, plan, seconds, final=not ray_run.interrupted)
        if ray_run.interrupted:
            raise KeyboardInterrupt
        if best is None:
            first = next((o for o in ranked if o.error), None)
            why = f"; first error ({first.trial_id}): {first.error}" if first else ""
            raise CheckFailedError(f"no trial reported {plan.metric} ({len(ranked)} trials){why}")
    return TuneResult(
        run_id=tune_run.run_id if tune_run is not None else None,
        metric=plan.metric,
        metric_key=plan.metric_key,
        mode=plan.mode,
        scheduler=plan.scheduler,
        tuned=list(plan.names),
        trials=[o.to_json() for o in ranked],
        best=best.to_json() if best is not None else None,
        configurations=[c.to_json() for c in found] if tune_results.repeated(found) else [],
        best_config=str(best_file) if best_file is not None else None,
        out_dir=str(out_dir),
        storage=search.storage,
        seconds=round(seconds, 2),
        trial_seconds=round(sum(o.seconds for o in outcomes), 2),
        ray_start_seconds=round(ray_seconds[0] + ray_run.ray_start_seconds, 2),
    )


def _open_runs(
    stack: contextlib.ExitStack,
    search: tune_results.Search,
    tracker: Tracker | None,
    parent_run_id: str | None,
    resume_run_id: str | None,
) -> tuple[StageRun | None, TrialRuns | None]:
    """The tune run (new, or the one resumed) and its trials' runs, open until ``stack`` closes; none untracked."""
    from gssf_cli.cluster.session import callbacks_run_here

    if tracker is None:
        return None, None
    if resume_run_id is not None:
        tune_run = stack.enter_context(tracker.start_run(STAGE, resume_run_id=resume_run_id))
    else:
        tags = tune_results.resume_tags(search)
        start = tracker.start_run(STAGE, run_name=search.plan.run_name(), parent_run_id=parent_run_id, tags=tags)
        tune_run = stack.enter_context(start)
        _log_start(tune_run, search)
    replay = not callbacks_run_here(search.config.address)
    return tune_run, stack.enter_context(TrialRuns(tracker, tune_run.run_id, search.plan, replay))


def _experiment_name(run_id: str) -> str:
    """The Ray experiment of a tune run: its results folder under the storage is named after the run."""
    return f"tune-{run_id}"


def _log_start(run_: StageRun, search: tune_results.Search) -> None:
    from gssf_cli.cluster.session import experiment_path
    from gssf_cli.core.files import manifest_digest
    from gssf_cli.data.manifest import load_manifest

    plan = search.plan
    run_.log_config(STAGE, to_dict(replace(search.config, scheduler=plan.scheduler)))
    base = to_dict(plan.base)
    run_.log_params(base, prefix="base.")
    run_.log_text(dump_toml(base), "config/base_train.toml")
    manifest = load_manifest(plan.base.data, verify=False)
    run_.log_dataset(
        str(manifest["name"]),
        plan.base.data,
        manifest_digest(plan.base.data),
        context="tuning",
        tags={"kind": str(manifest["kind"])},
    )
    run_.set_tags(
        {
            "gssf.tune.metric": plan.metric,
            "gssf.tune.mode": plan.mode,
            "gssf.tune.scheduler": plan.scheduler,
            "gssf.tune.params": ", ".join(f"{d.name}={d.describe()}" for d in plan.dimensions),
            EXPERIMENT_TAG: experiment_path(search.storage, _experiment_name(run_.run_id)),
            "gssf.task": plan.task,
        }
    )


def _write_outputs(
    out_dir: Path, ranked: list[TrialOutcome], best: TrialOutcome | None, plan: TunePlan, run_: StageRun | None
) -> Path | None:
    """:func:`~gssf_cli.training.tune_results.write_outputs` into ``out_dir``, and the same files on the tune run;
    the best train config's path."""
    written = tune_results.write_outputs(out_dir, ranked, best, plan)
    if run_ is not None:
        for artifact, path in written.items():
            run_.log_artifact(path, str(Path(artifact).parent) if "/" in artifact else None)
    return written.get(tune_results.BEST_CONFIG)


def _log_end(
    run_: StageRun,
    ranked: list[TrialOutcome],
    best: TrialOutcome | None,
    plan: TunePlan,
    seconds: float,
    final: bool,
) -> None:
    """The tune's counts and best trial. The best values go in as params only when the search is ``final``:
    params cannot change, and a resumed search may find a better trial."""
    counts = {status: sum(o.status == status for o in ranked) for status in ("FINISHED", "KILLED", "FAILED")}
    metrics: dict[str, float] = {f"trials_{k.lower()}": float(v) for k, v in counts.items()}
    metrics["trials"] = float(len(ranked))
    metrics["seconds"] = seconds
    if best is not None and best.metric is not None:
        metrics[f"best_{plan.metric}"] = best.metric
    run_.log_metrics(metrics)
    if best is not None:
        run_.set_tags({"gssf.tune.best_trial": best.trial_id, "gssf.tune.best_run": best.run_id or ""})
        if final:
            run_.log_params({f"best.{k}": v for k, v in best.values.items()})
