"""Stage ``tune``: search train settings (the block size above all) with Ray Tune; one MLflow writer.

How a tune runs:

1. :func:`gssf_cli.tuning.make_plan` checks everything it can before Ray starts (parameter names, value
   syntax, block sizes against D for every grid combination, files, the metric) — a mistake costs a second.
2. Ray (:mod:`gssf_cli.ray_trials`, which also says how to join a cluster with ``--address``): a local
   instance by default, results under ``--storage`` (``.gssf/ray`` by default); each trial is the library's
   own training reporting every epoch to Ray, so ASHA can stop weak trials early and a crashed trial resumes
   from its last checkpoint.
3. MLflow, written by this process only: the tune run (a child of ``parent_run_id`` when given), and after
   ``Tuner.fit()`` one child run per trial replayed from the ResultGrid (tag ``mlflow.parentRunId``; params =
   the trial's full train config; per-epoch metrics with step = epoch and the trial's own timestamps; status
   FINISHED, FAILED, or KILLED when the scheduler stopped it early). Trials never open the tracking store:
   many processes writing one SQLite file lock or corrupt it, and on a cluster the file is not even there.
   Replaying after ``fit()`` rather than from a live ``tune.Callback`` also holds under Ray Client
   (``ray://``), where Tune's controller — and so every callback — runs on the cluster's head node.
4. On the tune run: ``trials.csv`` (the results table), ``config/best_train.toml`` (the best trial's full train
   config, top-level keys: ``gssf train --config`` loads it as is) and, when the block size is tuned,
   ``plots/block_size.png`` (the metric against the block size on a log2 axis, metric-head parameters on a
   second axis: the GSSF paper's Fig. 3). The same files land in ``<runs_dir>/<tune run>/``.
5. Ctrl-C: Tune stops the trials; what ran is still logged (unfinished trials KILLED), the tune run ends
   KILLED and the command exits 130. Every trial failing is exit 1 (the tune ran but found nothing).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gssf_cli import tuning
from gssf_cli.config import TuneConfig, dump_toml, to_dict
from gssf_cli.errors import CheckFailedError

if TYPE_CHECKING:
    from gssf_cli.tracking import StageRun, Tracker
    from gssf_cli.tuning import TrialOutcome, TunePlan

TRIAL_STAGE = "tune_trial"


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


def run(
    config: TuneConfig,
    tracker: Tracker | None = None,
    parent_run_id: str | None = None,
    progress: bool = True,
    base_values: Mapping[str, Any] | None = None,
) -> TuneResult:
    """Plan and check the search (before Ray), run the trials on Ray, log the tune run and one child per trial.

    ``base_values`` is a base train config as values (a pipeline's ``[train]`` table), used when the config
    names no ``base_config`` file.

    Raises :class:`CheckFailedError` (after logging) when every trial failed, and ``KeyboardInterrupt`` (after
    logging what ran; the tune run ends KILLED) when Ctrl-C stopped the search.
    """
    from gssf_cli.ray_trials import check_reachable, run_trials, storage_path

    plan = tuning.make_plan(config, base_values=base_values)
    check_outputs(config, plan)
    if tracker is not None:
        _ = tracker.experiment_id
    if config.address:
        check_reachable(config.address)
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        tune_run: StageRun | None = None
        if tracker is not None:
            tune_run = stack.enter_context(
                tracker.start_run("tune", run_name=f"tune {', '.join(plan.names)}", parent_run_id=parent_run_id)
            )
            _log_start(tune_run, config, plan)
        run_id = tune_run.run_id if tune_run is not None else uuid.uuid4().hex
        storage = storage_path(config.storage)
        ray_run = run_trials(plan, config, f"tune-{run_id}", storage, progress)
        outcomes = ray_run.outcomes
        if tracker is not None and tune_run is not None:
            outcomes = [replace(o, run_id=_log_trial(tracker, tune_run.run_id, o, plan)) for o in outcomes]
        ranked = sorted(outcomes, key=lambda o: tuning.rank_key(o.metric, plan.mode))
        best = next((o for o in ranked if o.metric is not None), None)
        out_dir = plan.base.runs_dir / run_id
        best_file = _write_outputs(out_dir, ranked, best, plan, tune_run)
        seconds = time.perf_counter() - started
        if tune_run is not None:
            _log_end(tune_run, ranked, best, plan, seconds)
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
        scheduler=config.scheduler,
        tuned=list(plan.names),
        trials=[o.to_json() for o in ranked],
        best=best.to_json() if best is not None else None,
        best_config=str(best_file) if best_file is not None else None,
        out_dir=str(out_dir),
        storage=storage,
        seconds=round(seconds, 2),
        trial_seconds=round(sum(o.seconds for o in outcomes), 2),
        ray_start_seconds=round(ray_run.ray_start_seconds, 2),
    )


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


def _log_start(run_: StageRun, config: TuneConfig, plan: TunePlan) -> None:
    from gssf_cli.data.manifest import load_manifest, manifest_digest

    run_.log_config("tune", to_dict(config))
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
            "gssf.tune.params": ", ".join(f"{d.name}={d.describe()}" for d in plan.dimensions),
            "gssf.task": plan.task,
        }
    )


def _log_trial(tracker: Tracker, tune_run_id: str, outcome: TrialOutcome, plan: TunePlan) -> str:
    train_values = tuning.trial_values_or_none(plan, outcome.values) or {}
    tags = {
        "gssf.tune.trial_id": outcome.trial_id,
        "gssf.tune.trial_path": outcome.path,
        "gssf.tune.values": tuning.describe_values(outcome.values),
        "gssf.task": plan.task,
    }
    if train_values:
        tags["gssf.metric"] = str(train_values["metric"])
    if outcome.error:
        tags["gssf.error"] = outcome.error[:5000]
    if outcome.status == "KILLED":
        tags["gssf.tune.stopped"] = f"stopped early after {outcome.epochs} of {plan.base.epochs} epochs"
    metrics: list[tuple[int, int, Mapping[str, float]]] = list(outcome.history)
    return tracker.record_run(
        TRIAL_STAGE,
        run_name=f"trial {tuning.describe_values(outcome.values)}",
        status=outcome.status,
        parent_run_id=tune_run_id,
        params={f"train.{k}": v for k, v in train_values.items()} or outcome.values,
        history=metrics,
        tags=tags,
        start_time_ms=outcome.start_ms,
        end_time_ms=outcome.end_ms,
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
    run_: StageRun, ranked: list[TrialOutcome], best: TrialOutcome | None, plan: TunePlan, seconds: float
) -> None:
    counts = {status: sum(o.status == status for o in ranked) for status in ("FINISHED", "KILLED", "FAILED")}
    metrics: dict[str, float] = {f"trials_{k.lower()}": float(v) for k, v in counts.items()}
    metrics["trials"] = float(len(ranked))
    metrics["seconds"] = seconds
    if best is not None and best.metric is not None:
        metrics[f"best_{plan.metric}"] = best.metric
    run_.log_metrics(metrics)
    if best is not None:
        run_.set_tags({"gssf.tune.best_trial": best.trial_id, "gssf.tune.best_run": best.run_id or ""})
        run_.log_params({f"best.{k}": v for k, v in best.values.items()})
