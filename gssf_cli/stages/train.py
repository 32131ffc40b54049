"""Stage ``train``: :mod:`gssf_cli.training.loop` as a tracked MLflow run, resumable by run id.

The run logs its resolved config, the dataset, parameter counts, per-epoch metrics (loss, validation metrics,
lr, samples/s, ``best_<metric>``) with the epoch as step (counted from 1: the first epoch is step 1), and at the
end ``best_epoch`` (counted from 1, as everywhere), the best checkpoint, the resolved config as TOML and a
heatmap of the learned W ⊙ U. With ``--workers N`` (or ``--address``) the epochs run on Ray Train workers
(:func:`gssf_cli.cluster.train_workers.data_parallel`) and this process, the driver, still writes the one MLflow run.
Every check (dataset, teacher, block size, resume compatibility, the workers' CPUs and GPUs) runs before the
MLflow run is opened, so bad input leaves no run behind.

Resuming a run killed at any moment: a run killed before its first checkpoint starts again at epoch 1 from the
``config.json`` written as it opened (:func:`gssf_cli.modeling.checkpoint.write_run_config`); a checkpoint whose epoch
metrics never reached MLflow (a kill between the two) has them logged from the checkpoint; the MLflow run is
reopened whatever its status (a killed process leaves it RUNNING) and ends FINISHED, FAILED or KILLED.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gssf_cli.core.config import dump_toml, to_dict
from gssf_cli.core.errors import RESUME_COMMANDS, DiskFullError, TrackingServerLostError, WorkerLostError
from gssf_cli.core.stage_configs import TrainConfig
from gssf_cli.tracking.store import lost_server

if TYPE_CHECKING:
    from gssf_cli.cluster.train_workers import DataParallel
    from gssf_cli.data.dataset import Dataset
    from gssf_cli.modeling.model import RetrievalModel
    from gssf_cli.tracking.adapter import StageRun, Tracker
    from gssf_cli.training.loop import FitResult, Progress, Trainer


@dataclass(frozen=True)
class TrainResult:
    """What ``gssf train`` prints (``--json``): ``best_epoch`` counts from 1, like every epoch number."""

    run_id: str
    out_dir: str
    best_epoch: int
    epochs_run: int
    metrics: dict[str, float]
    validation_metric: str
    parameters: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    model_id: str | None = None

    @classmethod
    def of(cls, run_id: str, fitted: FitResult, model_id: str | None) -> TrainResult:
        """The result of run ``run_id``'s training ``fitted`` (``model_id``: its logged model, if tracked)."""
        return cls(
            run_id=run_id,
            out_dir=str(fitted.out_dir),
            best_epoch=fitted.best_epoch,
            epochs_run=fitted.epochs_run,
            metrics=fitted.metrics,
            validation_metric=fitted.validation_metric,
            parameters=fitted.parameters,
            seconds=fitted.seconds,
            model_id=model_id,
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def run(
    config: TrainConfig,
    tracker: Tracker | None = None,
    parent_run_id: str | None = None,
    resume: str | None = None,
    progress: Progress | None = None,
    tags: dict[str, str] | None = None,
) -> TrainResult:
    """Train per ``config``; with ``resume`` (a run id), continue that run from its last checkpoint.

    Without a tracker the run folder gets a random id (a plain, untracked training). ``tags`` go on a new run from
    its creation (a pipeline's step key, so that a killed step can be found and resumed).
    """
    import uuid

    from gssf_cli.core.files import check_writable
    from gssf_cli.data.dataset import Dataset
    from gssf_cli.modeling import checkpoint as ckpt
    from gssf_cli.training.loop import Trainer

    check_writable(config.runs_dir, f"the runs folder {config.runs_dir}", "--runs-dir")
    dataset = Dataset(config.data)
    resume_from = config.runs_dir / resume / ckpt.LAST if resume is not None else None
    trainer = Trainer(config, dataset, resume_from=resume_from, progress=progress)
    with contextlib.ExitStack() as stack:
        workers: DataParallel | None = None
        if config.on_ray():
            from gssf_cli.cluster import train_workers

            workers = stack.enter_context(train_workers.data_parallel(trainer.config))
        tracked: StageRun | None = None
        if tracker is not None:
            started = json.dumps({"config": to_dict(config), "dataset_sha256": dataset.digest}, default=str)
            tracked = stack.enter_context(
                tracker.start_run(
                    "train",
                    run_name=f"train-{config.model_label()}",
                    parent_run_id=parent_run_id,
                    resume_run_id=resume,
                    tags=(tags or {}) | ({STARTED_TAG: started} if len(started) <= STARTED_TAG_MOST else {}),
                )
            )
        run_id = tracked.run_id if tracked is not None else (resume or uuid.uuid4().hex)
        # First of all, what the run started with: a run killed before its first checkpoint can then resume.
        ckpt.write_run_config(config.runs_dir / run_id, to_dict(config), dataset.digest)
        if tracker is not None and tracked is not None:
            if resume is None or not _start_logged(tracker, resume):
                _log_start(tracked, trainer.config, dataset, trainer.model, trainer.lr_auto)
            if resume is not None:
                _log_lost_epoch(tracker, tracked, trainer)

        def log_epoch(epoch: int, metrics: dict[str, float], _: Path) -> None:
            if tracked is not None:
                tracked.log_metrics(metrics, step=epoch)

        out_dir = config.runs_dir / run_id
        resume_with = RESUME_COMMANDS["train"].format(run_id=run_id)
        try:
            if workers is not None:
                fitted = workers.fit(trainer, out_dir, on_epoch_end=log_epoch, progress=progress)
            else:
                fitted = trainer.fit(out_dir, on_epoch_end=log_epoch)
            model_id = None
            if tracked is not None:
                _log_end(tracked, fitted, trainer.model)
                model_id = log_served_model(tracked, config, fitted.out_dir / ckpt.BEST, dataset)
        except (WorkerLostError, DiskFullError) as lost:
            raise type(lost)(
                f"{lost}; run {run_id} ended FAILED at its last checkpoint; continue it with: {resume_with}"
            ) from None
        except Exception as exc:
            if (lost_at := lost_server(exc)) is None:
                raise
            raise TrackingServerLostError(
                f"{lost_at[0]} stopped answering ({lost_at[1]}); run {run_id} keeps its last checkpoint on disk; "
                f"once the server answers, continue it with: {resume_with}"
            ) from None
    return TrainResult.of(run_id, fitted, model_id)


STARTED_TAG = "gssf.train.started"
"""On a train run, from the moment it is created (the tags of MLflow's create call, one transaction): the JSON of
the config and dataset digest it starts with, as the runs folder's ``config.json`` records them a moment later. A
run killed between the two is still resumable (:func:`started_config` writes the file back from the tag)."""
STARTED_TAG_MOST = 8000
"""MLflow's longest tag value; a config whose JSON is longer (very long paths) relies on ``config.json`` alone."""


def started_config(tracker: Tracker, run_id: str, runs_dir: Path) -> dict[str, Any]:
    """The config train run ``run_id`` started with, to resume it: from its runs folder (last checkpoint, else
    ``config.json``); when the run was killed before either was written, from :data:`STARTED_TAG`, whose
    record is then written back to the folder so that the resumed run starts at epoch 1 like any other."""
    from gssf_cli.modeling import checkpoint as ckpt

    run_dir = runs_dir / run_id
    if not (run_dir / ckpt.LAST).exists() and ckpt.read_run_config(run_dir) is None:
        recorded = tracker.client.get_run(run_id).data.tags.get(STARTED_TAG)
        if recorded is not None:
            started = json.loads(recorded)
            ckpt.write_run_config(run_dir, started["config"], started["dataset_sha256"])
    return ckpt.saved_config(run_id, runs_dir)


@dataclass(frozen=True)
class SeedsResult:
    """What ``gssf train --seeds`` prints (``--json``): one :class:`TrainResult` per seed (each its own train run,
    a child of the ``seeds`` run), and per metric of the best epochs the mean, sample std and n over the seeds."""

    run_id: str | None
    seeds: tuple[int, ...]
    runs: tuple[TrainResult, ...]
    summary: dict[str, dict[str, float | int]]
    validation_metric: str

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "seeds": list(self.seeds),
            "validation_metric": self.validation_metric,
            "summary": self.summary,
            "runs": [r.to_json() for r in self.runs],
        }


def run_seeds(
    config: TrainConfig,
    seeds: tuple[int, ...],
    tracker: Tracker | None = None,
    parent_run_id: str | None = None,
    progress: Progress | None = None,
) -> SeedsResult:
    """Train ``config`` once per seed, each a ``train`` run under one ``seeds`` run that gets, per metric of the
    best epochs, ``mean_<metric>``, ``std_<metric>`` (sample) and ``n_seeds``.

    Every seed's trainer is built (and every check run) before the ``seeds`` run opens, so bad input leaves no run.
    """
    from gssf_cli.data.dataset import Dataset
    from gssf_cli.evaluation.seeds import SEEDS_TAG, check_seeds, summarize
    from gssf_cli.tracking.tags import SEEDS_STAGE
    from gssf_cli.training.loop import Trainer

    check_seeds(seeds)
    configs = [replace(config, seed=seed) for seed in seeds]
    trainer = Trainer(configs[0], Dataset(config.data))  # the checks of a run, before any run exists
    if config.on_ray():
        from gssf_cli.cluster import train_workers

        train_workers.precheck(trainer.config)
    with contextlib.ExitStack() as stack:
        parent: StageRun | None = None
        if tracker is not None:
            parent = stack.enter_context(
                tracker.start_run(
                    SEEDS_STAGE,
                    run_name=f"seeds-{config.model_label()}",
                    parent_run_id=parent_run_id,
                    tags={SEEDS_TAG: ",".join(map(str, seeds)), "gssf.metric": config.metric},
                )
            )
            parent.log_config("train", {k: v for k, v in to_dict(config).items() if k != "seed"})
            parent.log_params({"seeds": ",".join(map(str, seeds))})
        results = tuple(
            run(c, tracker, parent.run_id if parent is not None else None, progress=progress) for c in configs
        )
        summary = summarize([r.metrics for r in results])
        if parent is not None:
            parent.log_metrics({f"mean_{k}": v.mean for k, v in summary.items()})
            parent.log_metrics({f"std_{k}": v.std for k, v in summary.items()} | {"n_seeds": len(seeds)})
    return SeedsResult(
        run_id=parent.run_id if parent is not None else None,
        seeds=tuple(seeds),
        runs=results,
        summary={k: v.to_json() for k, v in summary.items()},
        validation_metric=results[0].validation_metric,
    )


def _log_start(
    run_: StageRun, config: TrainConfig, dataset: Dataset, model: RetrievalModel, lr_auto: bool = False
) -> None:
    """Config (the resolved one: ``train.lr`` is the rate used, ``gssf.lr`` says whether the budget chose it),
    dataset and parameter counts; the ``gssf.task`` tag last, which marks the start as logged."""
    run_.log_config("train", to_dict(config))
    run_.log_dataset(
        dataset.name, dataset.folder, dataset.digest, context="training", tags={"kind": dataset.manifest["kind"]}
    )
    run_.log_params({f"params_{k}": v for k, v in model.parameter_counts().items()})
    run_.set_tags({"gssf.lr": "auto" if lr_auto else "given"})
    run_.set_tags({"gssf.metric": config.metric, "gssf.task": dataset.task})


def _start_logged(tracker: Tracker, run_id: str) -> bool:
    """Whether :func:`_log_start` completed on this run (its tags come last); a kill may have cut it short."""
    return "gssf.task" in tracker.get_run(run_id).data.tags


def _log_lost_epoch(tracker: Tracker, run_: StageRun, trainer: Trainer) -> None:
    """Log the resumed checkpoint's epoch metrics that a kill between the checkpoint and its logging lost: the
    checkpoint's epoch is number ``epochs_done`` (counted from 1, the step its metrics are logged at)."""
    epoch = trainer.epochs_done
    if epoch < 1:
        return
    lost = {k: v for k, v in trainer.resumed_metrics.items() if epoch not in tracker.metric_steps(run_.run_id, k)}
    if lost:
        run_.log_metrics(lost, step=epoch)


def _log_end(run_: StageRun, fitted: FitResult, model: RetrievalModel) -> None:
    """Best checkpoint and config as artifacts; a heatmap of the learned W ⊙ U for learned metrics. Safe to
    repeat on a resumed run: artifacts are replaced, and each final metric is logged once."""
    from gssf_cli.modeling import checkpoint as ckpt

    best_state = fitted.best_state
    run_.log_artifacts(fitted.out_dir / ckpt.BEST, "checkpoint")
    run_.log_text(dump_toml({"train": best_state["config"]}), "config/train_resolved.toml")
    final = {f"final_{k}": v for k, v in best_state["last_metrics"].items()} | {"best_epoch": best_state["best_epoch"]}
    logged = run_.logged_metrics()  # a resumed run whose final logging a kill cut short logs the rest, once
    run_.log_metrics({k: v for k, v in final.items() if k not in logged})
    if model.similarity.num_parameters() > 0:
        from gssf_cli.evaluation import plots

        similarity = model.similarity
        matrix = similarity.effective_matrix().detach().cpu().numpy()
        fig = plots.metric_heatmap(matrix, similarity.name, block_size=similarity.block_size, run=run_.run_id)
        run_.log_figure(fig, "plots/metric_heatmap.png")
        plots.close(fig)


def log_served_model(run_: StageRun, config: TrainConfig, best_folder: Path, dataset: Dataset) -> str:
    """The best model as an MLflow model (``mlflow.pyfunc.load_model``; PyTorch inside, safetensors weights)."""
    import tempfile

    import torch

    from gssf_cli import __version__
    from gssf_cli.stages.runs import pack_model

    with tempfile.TemporaryDirectory(prefix="gssf-model-") as tmp:
        folder = pack_model(best_folder, dataset, Path(tmp) / "model")
        return run_.log_served_model(
            f"{config.model_label()}-{run_.run_id[:6]}",
            folder,
            loader="gssf_cli.stages.runs:TrainedModel",
            requirements=[f"gssf=={__version__}", f"torch=={torch.__version__.split('+')[0]}", "safetensors", "numpy"],
            tags={"gssf.stage": "train", "gssf.metric": config.metric},
        )
