"""Stage ``run``: a pipeline file chains prepare → train → evaluate → tune → export under one parent run.

A pipeline is a TOML file with an optional ``[pipeline]`` table (``name``: the MLflow experiment unless
``--experiment`` is given; ``stages``: which of the stage tables to run, in the fixed order) and one table
per stage holding that stage's settings, exactly as its ``--config`` file would (see
:class:`gssf_cli.config.PipelineConfig`). Links are implicit: train and tune read the prepared dataset,
evaluate and export use the trained run, and tune's base train config is the ``[train]`` table.
``[tune] retrain = true`` trains a final model with the best trial's config, which evaluate and export then
use. :func:`stage_config` builds every stage's config from its table and the links — the same function for
the up-front check (with placeholder links) and for the run.

Caching: each stage's key is the sha256 of its resolved config plus the keys of the stages it reads. A
re-run skips a stage whose key is unchanged and whose outputs are still there (the cache lives in
``.gssf/pipelines/NAME.json``), unless ``force``. A skipped stage is recorded on the parent run.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gssf_cli import __version__
from gssf_cli import metrics as registry
from gssf_cli.config import (
    EvaluateConfig,
    ExportConfig,
    PipelineConfig,
    PrepareConfig,
    TrainConfig,
    TuneConfig,
    from_dict,
    load_pipeline,
    load_toml,
    to_dict,
)
from gssf_cli.errors import CheckFailedError, UserInputError

if TYPE_CHECKING:
    from gssf_cli.tracking import Tracker
    from gssf_cli.training import Progress

__all__ = ["PipelineResult", "StageOutcome", "check", "load_pipeline", "run", "stage_config"]

CACHE_DIR = Path(".gssf") / "pipelines"
CONFIGS: dict[str, type] = {
    "prepare": PrepareConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
    "tune": TuneConfig,
    "export": ExportConfig,
}


@dataclass
class StageOutcome:
    stage: str
    status: str
    key: str
    run_id: str | None = None
    seconds: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class PipelineResult:
    name: str
    parent_run_id: str
    stages: list[StageOutcome]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Links:
    """What a stage takes from the stages before it: the dataset folder and the trained run."""

    data: Path | None
    train_run: str = "latest"


def stage_config(pipeline: PipelineConfig, stage: str, links: Links) -> Any:
    """A stage's config: its table plus the links (a stage's own table may name its dataset; the run it acts on
    is always the pipeline's). Pipeline stages replace their outputs, so prepare and export get ``force``."""
    table = pipeline.table(stage)
    data = {"data": links.data} if links.data is not None else {}
    values: dict[str, Any] = {
        "prepare": {**table, "force": True},
        "train": {**data, **table},
        "evaluate": {**table, "run": links.train_run},
        "tune": {**data, **table},
        "export": {**table, "run": links.train_run, "force": True},
    }[stage]
    return from_dict(CONFIGS[stage], values, stage)


def check(pipeline: PipelineConfig) -> None:
    """Resolve every stage's config before anything runs, so a typo fails in a second, not after training."""
    links = Links(_prepared(pipeline))
    for stage in pipeline.stages:
        stage_config(pipeline, stage, links)


def _prepared(pipeline: PipelineConfig) -> Path | None:
    out = pipeline.tables.get("prepare", {}).get("out")
    return Path(out) if isinstance(out, (str, Path)) else None


def run(
    pipeline: PipelineConfig | Path, tracker: Tracker, force: bool = False, progress: Progress | None = None
) -> PipelineResult:
    """Run a pipeline; a failing stage stops the chain and marks the parent run FAILED."""
    if not isinstance(pipeline, PipelineConfig):
        pipeline = load_pipeline(pipeline)
    check(pipeline)
    cache_file = CACHE_DIR / f"{pipeline.name}.json"
    cache: dict[str, Any] = json.loads(cache_file.read_text()) if cache_file.is_file() and not force else {}
    outcomes: list[StageOutcome] = []
    started = time.perf_counter()
    with tracker.start_run("run", run_name=f"pipeline {pipeline.name}") as parent:
        ctx = _Context(tracker, parent.run_id, pipeline, cache, progress, Links(_prepared(pipeline)))
        parent.log_text(pipeline.text, f"pipeline/{pipeline.path.name}")
        parent.set_tags({"gssf.pipeline": pipeline.name})
        for stage in pipeline.stages:
            stage_started = time.perf_counter()
            try:
                outcome = _RUNNERS[stage](ctx)
            except (UserInputError, CheckFailedError) as exc:
                parent.set_tags({"gssf.failed_stage": stage})
                raise type(exc)(f"stage {stage} failed: {exc}") from exc
            outcome.seconds = round(time.perf_counter() - stage_started, 2)
            outcomes.append(outcome)
            cache[stage] = {"key": outcome.key, "run_id": outcome.run_id, "summary": outcome.summary}
            CACHE_DIR.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(cache, indent=2, default=str))
            tmp.replace(cache_file)
            parent.set_tags({f"gssf.stage.{stage}": f"{outcome.status} {outcome.run_id or ''}".strip()})
        seconds = time.perf_counter() - started
        parent.log_metrics({"seconds": seconds})
        parent.log_dict([asdict(o) for o in outcomes], "pipeline/summary.json")
    return PipelineResult(pipeline.name, parent.run_id, outcomes, round(seconds, 2))


def _key(stage: str, config: dict[str, Any], upstream: list[str]) -> str:
    text = json.dumps({"stage": stage, "config": config, "upstream": upstream, "gssf": __version__}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _cached(stage: str, key: str, cache: dict[str, Any]) -> dict[str, Any] | None:
    entry = cache.get(stage)
    return entry if isinstance(entry, dict) and entry.get("key") == key else None


@dataclass
class _Context:
    """What the stages of one pipeline run share: links between stages and the cache."""

    tracker: Tracker
    parent_run_id: str
    pipeline: PipelineConfig
    cache: dict[str, Any]
    progress: Progress | None
    links: Links
    keys: list[str] = field(default_factory=list)

    def config(self, stage: str) -> Any:
        return stage_config(self.pipeline, stage, self.links)


def _prepare_stage(ctx: _Context) -> StageOutcome:
    from gssf_cli.stages import prepare

    config: PrepareConfig = ctx.config("prepare")
    key = _key("prepare", to_dict(config), [])
    ctx.keys, ctx.links = [key], Links(config.out, ctx.links.train_run)
    hit = _cached("prepare", key, ctx.cache)
    if hit and (config.out / "manifest.json").is_file():
        return StageOutcome("prepare", "cached", key, hit["run_id"], summary=hit["summary"])
    result = prepare.run(config, ctx.tracker, ctx.parent_run_id)
    return StageOutcome("prepare", "ran", key, result.run_id, summary={"path": result.path, "splits": result.splits})


def _evaluate_stage(ctx: _Context) -> StageOutcome:
    from gssf_cli.stages import evaluate

    config: EvaluateConfig = ctx.config("evaluate")
    key = _key("evaluate", to_dict(config), ctx.keys)
    hit = _cached("evaluate", key, ctx.cache)
    if hit:
        return StageOutcome("evaluate", "cached", key, hit["run_id"], summary=hit["summary"])
    result = evaluate.run(config, ctx.tracker, ctx.parent_run_id)
    summary = {k: result.metrics[k] for k in registry.HEADLINE[result.task]}
    return StageOutcome("evaluate", "ran", key, result.run_id, summary=summary)


def _tune_stage(ctx: _Context) -> StageOutcome:
    """Tune over the train table's settings; with ``retrain``, train the best config as the final model."""
    from gssf_cli.stages import tune

    config: TuneConfig = ctx.config("tune")
    base = {k: v for k, v in ctx.pipeline.table("train").items() if k != "data"}
    key = _key("tune", to_dict(config) | {"base": base}, ctx.keys[:1])
    hit = _cached("tune", key, ctx.cache)
    if hit and Path(str(hit["summary"].get("best_config"))).is_file():
        outcome = StageOutcome("tune", "cached", key, hit["run_id"], summary=hit["summary"])
    else:
        result = tune.run(
            config, ctx.tracker, ctx.parent_run_id, progress=ctx.progress is not None, base_values=base or None
        )
        summary = {"best": result.best, "best_config": result.best_config}
        outcome = StageOutcome("tune", "ran", key, result.run_id, summary=summary)
    best_config = outcome.summary.get("best_config")
    if ctx.pipeline.retrain and best_config:
        final = from_dict(TrainConfig, {**load_toml(Path(best_config)), "data": ctx.links.data}, "train")
        retrained = _train(final, ctx, "train_best")
        outcome.summary = {**outcome.summary, "retrained_run": retrained.run_id}
    return outcome


def _export_stage(ctx: _Context) -> StageOutcome:
    from gssf_cli.stages import export

    config: ExportConfig = ctx.config("export")
    key = _key("export", to_dict(config), ctx.keys)
    hit = _cached("export", key, ctx.cache)
    if hit and Path(str(hit["summary"].get("path"))).is_dir():
        return StageOutcome("export", "cached", key, hit["run_id"], summary=hit["summary"])
    result = export.run(config, ctx.tracker, ctx.parent_run_id)
    if not result.passed:
        raise CheckFailedError(f"ONNX parity outside tolerance (see {result.path}/manifest.json)")
    return StageOutcome("export", "ran", key, result.export_run_id, summary={"path": result.path, "passed": True})


def _train(config: TrainConfig, ctx: _Context, name: str) -> StageOutcome:
    """Train (or reuse a cached run whose best checkpoint is still on disk); later stages use this run."""
    from gssf_cli import checkpoint as ckpt
    from gssf_cli.stages import train

    key = _key(name, to_dict(config), ctx.keys[:1])
    hit = _cached(name, key, ctx.cache)
    if hit and hit.get("run_id") and (config.runs_dir / hit["run_id"] / ckpt.BEST).is_dir():
        outcome = StageOutcome(name, "cached", key, hit["run_id"], summary=hit["summary"])
    else:
        result = train.run(config, ctx.tracker, ctx.parent_run_id, progress=ctx.progress)
        metric = result.validation_metric
        summary = {"best_epoch": result.best_epoch, metric: result.metrics.get(f"val_{metric}")}
        outcome = StageOutcome(name, "ran", key, result.run_id, summary=summary)
    ctx.links = Links(ctx.links.data, outcome.run_id or "latest")
    ctx.keys = [*ctx.keys[:1], key]
    ctx.cache[name] = {"key": key, "run_id": outcome.run_id, "summary": outcome.summary}
    return outcome


_RUNNERS = {
    "prepare": _prepare_stage,
    "train": lambda ctx: _train(ctx.config("train"), ctx, "train"),
    "evaluate": _evaluate_stage,
    "tune": _tune_stage,
    "export": _export_stage,
}
