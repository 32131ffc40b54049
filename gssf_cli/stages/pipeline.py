"""Stage ``run``: a pipeline file chains prepare → train → evaluate → tune → export under one parent run.

A pipeline is a TOML file with an optional ``[pipeline]`` table (``name``: the MLflow experiment unless
``--experiment`` is given; ``stages``: which of the stage tables to run, in the fixed order) and one table
per stage holding that stage's settings, exactly as its ``--config`` file would. Links are implicit: train
and tune read the prepared dataset, evaluate and export use the trained run. ``[tune] retrain = true`` trains
a final model with the best trial's config, which evaluate and export then use.

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
from gssf_cli.config import (
    EvaluateConfig,
    ExportConfig,
    PrepareConfig,
    TrainConfig,
    TuneConfig,
    dump_toml,
    from_dict,
    load_toml,
    to_dict,
)
from gssf_cli.errors import CheckFailedError, UserInputError

if TYPE_CHECKING:
    from gssf_cli.tracking import Tracker

STAGES = ("prepare", "train", "evaluate", "tune", "export")
PIPELINE_KEYS = ("name", "stages")
CACHE_DIR = Path(".gssf") / "pipelines"


@dataclass(frozen=True)
class Pipeline:
    name: str
    stages: tuple[str, ...]
    tables: dict[str, dict[str, Any]]
    retrain: bool = False


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


def load_pipeline(path: Path) -> Pipeline:
    """Read and check a pipeline file: unknown stages or keys are one-line errors naming them."""
    values = load_toml(path)
    header = values.pop("pipeline", {})
    if not isinstance(header, dict):
        raise UserInputError(f"{path}: [pipeline] must be a table")
    unknown = sorted(set(values) - set(STAGES))
    if unknown:
        raise UserInputError(f"{path}: unknown stage [{unknown[0]}] (valid stages: {', '.join(STAGES)})")
    for key in sorted(set(header) - set(PIPELINE_KEYS)):
        raise UserInputError(f"{path}: pipeline.{key}: unknown key (valid keys: {', '.join(PIPELINE_KEYS)})")
    for stage, table in values.items():
        if not isinstance(table, dict):
            raise UserInputError(f"{path}: [{stage}] must be a table of settings")
    listed = header.get("stages", [s for s in STAGES if s in values])
    if not isinstance(listed, list) or any(s not in STAGES for s in listed):
        raise UserInputError(f"{path}: pipeline.stages must list stages among {', '.join(STAGES)}")
    for stage in listed:
        if stage not in values and stage in ("prepare", "tune"):
            raise UserInputError(f"{path}: pipeline.stages lists {stage} but there is no [{stage}] table")
    tables = {stage: dict(values.get(stage, {})) for stage in STAGES if stage in listed}
    retrain = bool(tables.get("tune", {}).pop("retrain", False))
    return Pipeline(str(header.get("name", path.stem)), tuple(s for s in STAGES if s in listed), tables, retrain)


def _key(stage: str, config: dict[str, Any], upstream: list[str]) -> str:
    text = json.dumps({"stage": stage, "config": config, "upstream": upstream, "gssf": __version__}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _check_configs(pipeline: Pipeline) -> None:
    """Resolve every stage's config before anything runs, so a typo fails in a second, not after training."""
    data = pipeline.tables.get("prepare", {}).get("out")
    for stage, table in pipeline.tables.items():
        if stage == "prepare":
            from_dict(PrepareConfig, table, "prepare")
        elif stage == "train":
            from_dict(TrainConfig, {"data": data, **table}, "train")
        elif stage == "evaluate":
            from_dict(EvaluateConfig, {"run": "latest", **table}, "evaluate")
        elif stage == "tune":
            from_dict(TuneConfig, {"data": data, **table}, "tune")
        else:
            from_dict(ExportConfig, table, "export")


def run(path: Path, tracker: Tracker, force: bool = False, progress: bool = True) -> PipelineResult:
    """Run a pipeline file; a failing stage stops the chain and marks the parent run FAILED."""
    pipeline = load_pipeline(path)
    _check_configs(pipeline)
    cache_file = CACHE_DIR / f"{pipeline.name}.json"
    cache: dict[str, Any] = json.loads(cache_file.read_text()) if cache_file.is_file() and not force else {}
    outcomes: list[StageOutcome] = []
    started = time.perf_counter()
    with tracker.start_run("run", run_name=f"pipeline {pipeline.name}") as parent:
        ctx = _Context(
            tracker, parent.run_id, pipeline, cache, progress, data=pipeline.tables.get("prepare", {}).get("out")
        )
        parent.log_text(path.read_text(), f"pipeline/{path.name}")
        parent.set_tags({"gssf.pipeline": pipeline.name})
        for stage in pipeline.stages:
            table = pipeline.tables.get(stage, {})
            stage_started = time.perf_counter()
            try:
                outcome = _run_stage(stage, table, ctx)
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


def _cached(stage: str, key: str, cache: dict[str, Any]) -> dict[str, Any] | None:
    entry = cache.get(stage)
    return entry if isinstance(entry, dict) and entry.get("key") == key else None


@dataclass
class _Context:
    """What the stages of one pipeline run share: links between stages and the cache."""

    tracker: Tracker
    parent_run_id: str
    pipeline: Pipeline
    cache: dict[str, Any]
    progress: bool
    data: str | None = None
    train_run: str | None = None
    keys: list[str] = field(default_factory=list)


def _run_stage(stage: str, table: dict[str, Any], ctx: _Context) -> StageOutcome:
    runners = {
        "prepare": _prepare_stage,
        "train": lambda t, c: _train_stage(from_dict(TrainConfig, {"data": c.data, **t}, "train"), c, "train"),
        "evaluate": _evaluate_stage,
        "tune": _tune_stage,
        "export": _export_stage,
    }
    return runners[stage](table, ctx)


def _prepare_stage(table: dict[str, Any], ctx: _Context) -> StageOutcome:
    from gssf_cli.stages import prepare

    config = from_dict(PrepareConfig, {**table, "force": True}, "prepare")
    key = _key("prepare", to_dict(config), [])
    ctx.keys, ctx.data = [key], str(config.out)
    hit = _cached("prepare", key, ctx.cache)
    if hit and (config.out / "manifest.json").is_file():
        return StageOutcome("prepare", "cached", key, hit["run_id"], summary=hit["summary"])
    result = prepare.run(config, ctx.tracker, ctx.parent_run_id)
    return StageOutcome("prepare", "ran", key, result.run_id, summary={"path": result.path, "splits": result.splits})


def _evaluate_stage(table: dict[str, Any], ctx: _Context) -> StageOutcome:
    from gssf_cli.stages import evaluate

    config = from_dict(EvaluateConfig, {**table, "run": ctx.train_run or "latest"}, "evaluate")
    key = _key("evaluate", to_dict(config), ctx.keys)
    hit = _cached("evaluate", key, ctx.cache)
    if hit:
        return StageOutcome("evaluate", "cached", key, hit["run_id"], summary=hit["summary"])
    result = evaluate.run(config, ctx.tracker, ctx.parent_run_id)
    headline = ("rsum", "i2t_r1", "t2i_r1") if result.task == "cross_modal" else ("map_at_r", "precision_at_1")
    return StageOutcome("evaluate", "ran", key, result.run_id, summary={k: result.metrics[k] for k in headline})


def _tune_stage(table: dict[str, Any], ctx: _Context) -> StageOutcome:
    """Tune over the train table's settings; with ``retrain``, train the best config as the final model."""
    from gssf_cli.stages import tune

    values = {"data": ctx.data, **table}
    base = ctx.pipeline.tables.get("train", {})
    if base and "base_config" not in values:
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        base_file = CACHE_DIR / f"{ctx.pipeline.name}.train-base.toml"
        base_file.write_text(dump_toml({k: v for k, v in base.items() if k != "data"}))
        values["base_config"] = str(base_file)
    config = from_dict(TuneConfig, values, "tune")
    key = _key("tune", to_dict(config) | {"base": base}, ctx.keys[:1])
    hit = _cached("tune", key, ctx.cache)
    if hit and Path(str(hit["summary"].get("best_config"))).is_file():
        outcome = StageOutcome("tune", "cached", key, hit["run_id"], summary=hit["summary"])
    else:
        result = tune.run(config, ctx.tracker, ctx.parent_run_id, progress=ctx.progress)
        summary = {"best": result.best, "best_config": result.best_config}
        outcome = StageOutcome("tune", "ran", key, result.run_id, summary=summary)
    best_config = outcome.summary.get("best_config")
    if ctx.pipeline.retrain and best_config:
        final = from_dict(TrainConfig, {**load_toml(Path(best_config)), "data": ctx.data}, "train")
        retrained = _train_stage(final, ctx, "train_best")
        outcome.summary = {**outcome.summary, "retrained_run": retrained.run_id}
    return outcome


def _export_stage(table: dict[str, Any], ctx: _Context) -> StageOutcome:
    from gssf_cli.stages import export

    config = from_dict(ExportConfig, {**table, "run": ctx.train_run or "latest", "force": True}, "export")
    key = _key("export", to_dict(config), ctx.keys)
    hit = _cached("export", key, ctx.cache)
    if hit and Path(str(hit["summary"].get("path"))).is_dir():
        return StageOutcome("export", "cached", key, hit["run_id"], summary=hit["summary"])
    result = export.run(config, ctx.tracker, ctx.parent_run_id)
    if not result.passed:
        raise CheckFailedError(f"ONNX parity outside tolerance (see {result.path}/manifest.json)")
    return StageOutcome("export", "ran", key, result.export_run_id, summary={"path": result.path, "passed": True})


def _train_stage(config: TrainConfig, ctx: _Context, name: str) -> StageOutcome:
    """Train (or reuse a cached run whose best checkpoint is still on disk); later stages use this run."""
    from gssf_cli.stages import train
    from gssf_cli.stages.train import BEST

    key = _key(name, to_dict(config), ctx.keys[:1])
    hit = _cached(name, key, ctx.cache)
    if hit and hit.get("run_id") and (config.runs_dir / hit["run_id"] / BEST).is_dir():
        outcome = StageOutcome(name, "cached", key, hit["run_id"], summary=hit["summary"])
    else:
        result = train.run(config, ctx.tracker, ctx.parent_run_id, progress=ctx.progress)
        metric = result.validation_metric
        summary = {"best_epoch": result.best_epoch, metric: result.metrics.get(f"val_{metric}")}
        outcome = StageOutcome(name, "ran", key, result.run_id, summary=summary)
    ctx.train_run, ctx.keys = outcome.run_id, [*ctx.keys[:1], key]
    ctx.cache[name] = {"key": key, "run_id": outcome.run_id, "summary": outcome.summary}
    return outcome
