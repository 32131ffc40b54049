"""Stage ``tune``: search train settings (the block size above all) with Ray Tune; one MLflow writer, live.

How a tune runs:

1. :func:`gssf_cli.tuning.make_plan` checks everything it can before Ray starts (parameter names, value
   syntax, block sizes against D for every grid combination, files, the metric) and resolves ``--scheduler
   auto``: FIFO for a pure grid, ASHA when any value is sampled — a mistake costs a second.
2. Ray (:mod:`gssf_cli.ray_trials`, which also says how to join a cluster with ``--address``): a local
   instance by default, results under ``--storage`` (``.gssf/ray`` by default) as experiment
   ``tune-<tune run id>``; each trial is the library's own training reporting every epoch to Ray, so ASHA can
   stop weak trials early and a crashed trial resumes from its last checkpoint.
3. MLflow, written by this process only: the tune run ``tune-<tuned names>`` (a child of ``parent_run_id``
   when given) and, live, one child run per trial ``trial-<name=value,...>`` (tag ``mlflow.parentRunId``;
   params = the trial's full train config). Tune's driver-side callback hands each trial event to
   :class:`gssf_cli.trial_runs.TrialRuns` (a :class:`~gssf_cli.tuning.TrialLog`): the run opens RUNNING when the trial starts, gets
   each epoch's metrics as the result arrives (step = the epoch number training reported), and ends FINISHED,
   FAILED (tag ``gssf.error``) or KILLED (stopped early by the scheduler: tag ``gssf.tune.stopped``). So the
   UI shows a search while it runs, and a driver that dies leaves everything up to its last epoch. Trials never
   open the tracking store: many processes writing one SQLite file lock or corrupt it, and on a cluster the
   file is not even there. After ``Tuner.fit()`` :meth:`gssf_cli.trial_runs.TrialRuns.settle` checks each trial's run against the
   ResultGrid and adds what is missing — everything under Ray Client (``ray://``), where Tune's callbacks run
   on the cluster's head node and cannot log here; only what a failed store write dropped otherwise.
4. On the tune run: ``trials.csv`` (the results table), ``config/best_train.toml`` (the best trial's full train
   config, top-level keys: ``gssf train --config`` loads it as is) and, when the block size is tuned,
   ``plots/block_size.png`` (the metric against the block size on a log2 axis, metric-head parameters on a
   second axis: the GSSF paper's Fig. 3). The same files land in ``<runs_dir>/<tune run>/``.
5. Ctrl-C or SIGTERM: Tune stops the trials and saves its state; what ran is logged (trials cut short KILLED),
   the tune run ends KILLED and the command exits 130. Every trial failing is exit 1 (the tune ran but found
   nothing).
6. :func:`resume` (``gssf tune --resume RUN``) continues a KILLED tune — or a RUNNING one whose driver was
   killed — from the settings the tune run recorded when it started (tag ``gssf.tune.resume``: the resolved
   tune config and base train config, and the working directory), with ``Tuner.restore``: unfinished and
   errored trials go on from their last checkpoints, finished ones are not run again. The same tune run and the
   same trial runs (found by their ``gssf.tune.trial_id`` tag) carry on; an epoch already logged is not logged
   twice.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gssf_cli import tuning
from gssf_cli.config import TuneConfig, dump_toml, from_dict, to_dict
from gssf_cli.errors import CheckFailedError, UserInputError
from gssf_cli.trial_runs import TRIAL_STAGE, TrialRuns

if TYPE_CHECKING:
    from gssf_cli.tracking import StageRun, Tracker
    from gssf_cli.tuning import TrialOutcome, TunePlan

STAGE = "tune"
RESUME_TAG = "gssf.tune.resume"
EXPERIMENT_TAG = "gssf.tune.experiment_path"
MAX_TAG_LENGTH = 8000
"""MLflow's longest tag value: resume settings longer than this (a huge search space) are not recorded."""


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
    best_config: str | None
    out_dir: str
    storage: str
    seconds: float
    trial_seconds: float
    ray_start_seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Search:
    """A checked search, ready to start or continue: its config, plan, Ray storage (absolute or a URI) and the
    folder relative trial paths (a tuned teacher file) are read from."""

    config: TuneConfig
    plan: TunePlan
    storage: str
    root: Path


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
    from gssf_cli.ray_trials import check_reachable, storage_path

    plan = tuning.make_plan(config, base_values=base_values)
    check_outputs(config, plan)
    if tracker is not None:
        _ = tracker.experiment_id
    if config.address:
        check_reachable(config.address)
    search = _Search(config, plan, storage_path(config.storage), Path.cwd())
    return _search(search, tracker, progress, parent_run_id=parent_run_id)


def resume(run_ref: str, tracker: Tracker, progress: bool = True) -> TuneResult:
    """Continue the interrupted tune run ``run_ref`` (a run id or ``latest``: the newest tune run) with the settings
    it recorded when it started; the same tune run ends FINISHED.

    Everything is checked before anything is written: a run that is not a tune run, a tune run that already
    finished, one without recorded settings, or one whose Ray results folder is gone is a one-line
    :class:`UserInputError`; so is anything :func:`tuning.make_plan` refuses (the dataset moved, say).
    """
    from gssf_cli.ray_trials import check_reachable, check_restorable, experiment_path
    from gssf_cli.tracking import PARENT_TAG, STAGE_TAG

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
    search = _saved_search(run_id, tags)
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
    from gssf_cli.data.files import check_writable
    from gssf_cli.data.manifest import load_manifest
    from gssf_cli.model import check_fits_memory, manifest_spec

    if "://" not in config.storage:
        check_writable(Path(config.storage), f"--storage {config.storage}", "--storage")
    check_writable(plan.base.runs_dir, f"the runs folder {plan.base.runs_dir}", "--base runs_dir=...")
    manifest = load_manifest(plan.base.data, verify=False)
    for trial in tuning.probe_configs(plan):
        check_fits_memory(manifest_spec(manifest, trial), trial)


def _search(
    search: _Search,
    tracker: Tracker | None,
    progress: bool,
    *,
    parent_run_id: str | None = None,
    resume_run_id: str | None = None,
) -> TuneResult:
    """Start (or, with ``resume_run_id``, continue) the search on Ray and log it: the part :func:`run` and
    :func:`resume` share once everything is checked."""
    from gssf_cli.ray_trials import callbacks_run_here, run_trials

    config, plan = search.config, search.plan
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        tune_run: StageRun | None = None
        trial_runs: TrialRuns | None = None
        if tracker is not None:
            if resume_run_id is not None:
                tune_run = stack.enter_context(tracker.start_run(STAGE, resume_run_id=resume_run_id))
            else:
                tune_run = stack.enter_context(
                    tracker.start_run(
                        STAGE, run_name=plan.run_name(), parent_run_id=parent_run_id, tags=_resume_tags(search)
                    )
                )
                _log_start(tune_run, search)
            replay = not callbacks_run_here(config.address)
            trial_runs = stack.enter_context(TrialRuns(tracker, tune_run.run_id, plan, replay))
        run_id = tune_run.run_id if tune_run is not None else uuid.uuid4().hex
        live = trial_runs if trial_runs is not None and not trial_runs.replay else None
        ray_run = run_trials(
            plan,
            config,
            _experiment_name(run_id),
            search.storage,
            progress,
            live,
            resume=resume_run_id is not None,
            root=search.root,
        )
        outcomes = ray_run.outcomes
        if trial_runs is not None:
            outcomes = [replace(o, run_id=trial_runs.settle(o, ray_run.interrupted)) for o in outcomes]
        ranked = sorted(outcomes, key=lambda o: tuning.rank_key(o.metric, plan.mode))
        best = next((o for o in ranked if o.metric is not None), None)
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
        best_config=str(best_file) if best_file is not None else None,
        out_dir=str(out_dir),
        storage=search.storage,
        seconds=round(seconds, 2),
        trial_seconds=round(sum(o.seconds for o in outcomes), 2),
        ray_start_seconds=round(ray_run.ray_start_seconds, 2),
    )


def _experiment_name(run_id: str) -> str:
    """The Ray experiment of a tune run: its results folder under the storage is named after the run."""
    return f"tune-{run_id}"


def _resume_tags(search: _Search) -> dict[str, str]:
    """What :func:`resume` needs, recorded as the tune run is created (so a run that exists can be resumed): the
    tune config as resolved (the scheduler chosen, the storage absolute, the base folded in), the base train
    config with absolute paths, and the working directory relative trial paths are read from."""
    plan = search.plan
    config = replace(
        search.config,
        scheduler=plan.scheduler,
        storage=search.storage,
        base=(),
        base_config=None,
        data=None,
        epochs=None,
    )
    base = to_dict(plan.base)
    base["data"] = str(plan.base.data.expanduser().resolve())
    base["runs_dir"] = str(plan.base.runs_dir.expanduser().resolve())
    if plan.base.teacher is not None:
        base["teacher"] = str(plan.base.teacher.expanduser().resolve())
    text = json.dumps({"tune": to_dict(config), "base": base, "root": str(search.root)}, separators=(",", ":"))
    return {RESUME_TAG: text} if len(text) <= MAX_TAG_LENGTH else {}


def _saved_search(run_id: str, tags: Mapping[str, str]) -> _Search:
    """The search a tune run recorded in :data:`RESUME_TAG`, checked again as a new tune would be."""
    text = tags.get(RESUME_TAG)
    if not text:
        raise UserInputError(
            f"tune run {run_id} recorded no settings to resume from (an older gssf started it, or it was killed "
            "as it started): start a new gssf tune"
        )
    try:
        saved = json.loads(text)
        values, base, root = dict(saved["tune"]), dict(saved["base"]), Path(saved["root"])
    except (ValueError, KeyError, TypeError) as exc:
        raise UserInputError(
            f"tune run {run_id}: its tag {RESUME_TAG} is not readable ({exc}): start a new tune"
        ) from None
    config = from_dict(TuneConfig, values, "tune")
    return _Search(config, tuning.make_plan(config, base_values=base), config.storage, root)


def _log_start(run_: StageRun, search: _Search) -> None:
    from gssf_cli.data.manifest import load_manifest, manifest_digest
    from gssf_cli.ray_trials import experiment_path

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
    """``trials.csv``, the best train config and the block-size plot, in ``out_dir`` and on the tune run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = tuning.results_csv(ranked, plan)
    (out_dir / "trials.csv").write_text(table, encoding="utf-8")
    if run_ is not None:
        run_.log_text(table, "trials.csv")
    best_file = None
    if best is not None:
        best_file = out_dir / "best_train.toml"
        text = dump_toml(tuning.trial_train_values(plan, best.values))
        best_file.write_text(text, encoding="utf-8")
        if run_ is not None:
            run_.log_text(text, "config/best_train.toml")
    if plan.tunes("block_size"):
        from gssf_cli import plots

        figure = plots.block_size_figure(ranked, plan)
        if figure is not None:
            figure.savefig(out_dir / "block_size.png", dpi=120)
            if run_ is not None:
                run_.log_figure(figure, "plots/block_size.png")
            plots.close(figure)
    return best_file


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
