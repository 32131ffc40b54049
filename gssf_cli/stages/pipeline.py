"""Stage ``run``: a pipeline file chains prepare → train → evaluate → tune → export → index under one parent run.

A pipeline file holds one table per stage (see :class:`gssf_cli.core.stage_configs.PipelineConfig`); :func:`stage_config`
builds each stage's config from its table and the links to the stages before it — the same function for the
up-front check and for the run. Train and tune read the prepared dataset; tune's base config is ``[train]``.

One final model: with ``[tune] retrain = true`` the best trial's config is trained again with the ``[train]``
budget (``train_best``), and *that* model is evaluated and exported; the first model's test metrics stay
visible as ``evaluate_baseline``, and ``compare`` tests the final model against it, paired over the test
queries exactly as ``gssf compare`` does. Without retraining the trained model is the final one. The parent run
gets the final model's test metrics (``final_*``), the bundle's ONNX Runtime metrics (``onnx_*``), the
baseline's (``baseline_*``) and the test's headline difference and p-value (``vs_baseline_*``). The result
answers the two questions a tuned pipeline raises: which setting won the tune (``tuned``) and whether the final
model beats the baseline (``verdict``).

Caching (:mod:`gssf_cli.stages.cache`): a step is skipped only when its key (config + content of its inputs + the
runs it builds on) is unchanged and every file it wrote still has the checksum recorded when it was written;
otherwise it runs, and so does everything after it that uses it, with the reason reported. ``dry_run`` says
what would run and why without running anything.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gssf_cli.core import metrics as registry
from gssf_cli.core.config import default_of, from_dict, load_toml, to_dict
from gssf_cli.core.errors import CheckFailedError, UserInputError
from gssf_cli.core.limits import COCO_TRUTHS
from gssf_cli.core.stage_configs import CompareConfig, PipelineConfig, load_pipeline
from gssf_cli.stages import cache, steps
from gssf_cli.stages.steps import Links, check, stage_config
from gssf_cli.tracking.tags import FINAL_RUN_TAG, PIPELINE_STAGE, STEP_KEY_TAG

if TYPE_CHECKING:
    from gssf_cli.tracking.adapter import StageRun, Tracker
    from gssf_cli.training.loop import Progress

__all__ = ["PipelineResult", "StageOutcome", "check", "load_pipeline", "run", "stage_config"]


@dataclass
class StageOutcome:
    stage: str
    status: str
    key: str
    run_id: str | None = None
    seconds: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)
    why: str = ""


@dataclass
class PipelineResult:
    name: str
    parent_run_id: str | None
    stages: list[StageOutcome]
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)
    dry_run: bool = False
    tuned: dict[str, Any] | None = None
    """The tune's winner: ``{"values": {name: value}, "metric": name, "value": v, "trials": [{values, metric}]}``."""
    verdict: dict[str, Any] | None = None
    """The final model against the baseline on the headline metric (a ``gssf compare`` row: difference,
    interval, p-value, verdict)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def run(
    pipeline: PipelineConfig | Path,
    tracker: Tracker,
    force: bool = False,
    progress: Progress | None = None,
    dry_run: bool = False,
    notify: Callable[[str], None] | None = None,
) -> PipelineResult:
    """Run a pipeline (or, with ``dry_run``, only say what would run); a failing stage stops the chain and
    marks the parent run FAILED."""
    if not isinstance(pipeline, PipelineConfig):
        pipeline = load_pipeline(pipeline)
    check(pipeline)
    with contextlib.nullcontext() if dry_run else cache.pipeline_lock(pipeline.name):
        return _run(pipeline, tracker, force, progress, dry_run, notify)


def _run(
    pipeline: PipelineConfig,
    tracker: Tracker,
    force: bool,
    progress: Progress | None,
    dry_run: bool,
    notify: Callable[[str], None] | None,
) -> PipelineResult:
    cached = cache.Cache(pipeline.name, allowed=steps.written_places(pipeline))
    ctx = _Context(tracker, pipeline, cached, force, dry_run, progress, notify or (lambda line: None))
    started = time.perf_counter()
    if dry_run or not force:
        preview = ctx if dry_run else _Context(tracker, pipeline, ctx.cache, False, True, progress, ctx.notify)
        for step in steps.plan(pipeline):
            preview.outcomes.append(_STEPS[step](preview))
        if dry_run or all(o.status == "cached" for o in preview.outcomes):
            return _result(preview, None, 0.0)
    with tracker.start_run(PIPELINE_STAGE, run_name=f"pipeline-{pipeline.name}") as parent:
        ctx.parent_run_id = parent.run_id
        parent.log_text(pipeline.text, f"pipeline/{pipeline.path.name}")
        parent.log_params(steps.params(pipeline))
        parent.set_tags({"gssf.pipeline": pipeline.name})
        if "prepare" not in pipeline.stages:
            _log_dataset(ctx, parent)
        for step in steps.plan(pipeline):
            step_started = time.perf_counter()
            try:
                outcome = _STEPS[step](ctx)
            except (UserInputError, CheckFailedError) as exc:
                parent.set_tags({"gssf.failed_stage": step})
                raise type(exc)(f"stage {step} failed: {exc}") from exc
            outcome.seconds = round(time.perf_counter() - step_started, 2)
            ctx.outcomes.append(outcome)
            if step == "prepare":
                _log_dataset(ctx, parent)
            parent.set_tags({f"gssf.stage.{step}": f"{outcome.status} {outcome.run_id or ''}".strip()})
        seconds = time.perf_counter() - started
        parent.log_metrics({**ctx.metrics, "seconds": seconds})
        if ctx.links.train_run != "latest":
            parent.set_tags({FINAL_RUN_TAG: ctx.links.train_run})
        parent.log_dict([asdict(o) for o in ctx.outcomes], "pipeline/summary.json")
    return _result(ctx, parent.run_id, round(seconds, 2))


def _result(ctx: _Context, parent_run_id: str | None, seconds: float) -> PipelineResult:
    by_step = {o.stage: o.summary for o in ctx.outcomes}
    return PipelineResult(
        ctx.pipeline.name,
        parent_run_id,
        ctx.outcomes,
        seconds,
        ctx.metrics,
        ctx.dry_run,
        tuned=by_step.get("tune", {}).get("tuned"),
        verdict=by_step.get("compare", {}).get("test"),
    )


def _log_dataset(ctx: _Context, parent: StageRun) -> None:
    """The dataset the pipeline's models learn from, as the pipeline run's input (the UI's Datasets), once it
    exists: after ``prepare``, or from the start when the pipeline names a prepared folder instead."""
    from gssf_cli.data.manifest import load_manifest

    folder = steps.dataset_folder(ctx.pipeline, ctx.links)
    digest = steps.dataset_digest(folder)
    if folder is None or digest is None:
        return
    manifest = load_manifest(folder, verify=False)
    parent.log_dataset(manifest["name"], folder, digest, context="pipeline", tags={"kind": manifest["kind"]})


@dataclass
class _Context:
    """What the steps of one pipeline run share: the links between them, the cache, and what ran."""

    tracker: Tracker
    pipeline: PipelineConfig
    cache: cache.Cache
    force: bool
    dry_run: bool
    progress: Progress | None
    notify: Callable[[str], None]
    parent_run_id: str | None = None
    links: Links = field(default_factory=lambda: Links(None))
    baseline: Links | None = None
    """The links as the first ``train`` left them: the baseline model that ``compare`` tests against."""
    ran: set[str] = field(default_factory=set)
    outcomes: list[StageOutcome] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.links = Links(steps.prepared(self.pipeline))

    def step(
        self,
        name: str,
        config: Any,
        inputs: dict[str, Any],
        after: tuple[str, ...],
        work: Callable[[], tuple[str | None, dict[str, Any], list[Path]]],
        valid: Callable[[dict[str, Any]], str | None] = lambda entry: None,
    ) -> tuple[StageOutcome, dict[str, Any] | None]:
        """Skip ``name`` when cached and intact, else run ``work`` → (run id, summary, output paths).

        ``after``: the steps whose results this one uses; if one of them ran, so does this one. ``valid``
        checks what the checksums cannot (a run still in the store). Returns the outcome and the cache entry
        (None in a dry run of a step that would run).
        """
        key, basis = cache.key(name, to_dict(config), inputs), cache.basis(to_dict(config), inputs)
        why = self._why(name, key, basis, after, valid)
        entry = self.cache.get(name)
        if why is None and entry is not None:
            summary = dict(entry.get("summary", {}))
            return StageOutcome(name, "cached", key, entry.get("run_id"), summary=summary), entry
        self.ran.add(name)
        if self.dry_run:
            return StageOutcome(name, "would run", key, why=why or ""), None
        if entry is not None:
            self.notify(f"{name}: runs again: {why}")
        run_id, summary, outputs = work()
        if run_id is not None:
            self.tracker.run_handle(run_id).set_tags({STEP_KEY_TAG: key})
        entry = {"key": key, "basis": basis, "run_id": run_id, "summary": summary}
        entry["outputs"] = cache.fingerprint(outputs)
        entry["roots"] = [str(p) for p in outputs if p.is_dir()]
        self.cache.record(name, entry)
        return StageOutcome(name, "ran", key, run_id, summary=dict(summary), why=why or ""), entry

    def _why(
        self, name: str, key: str, basis: dict[str, str], after: tuple[str, ...], valid: Callable[..., str | None]
    ) -> str | None:
        entry = self.cache.get(name)
        upstream = next((step for step in after if step in self.ran), None)
        if self.force:
            return "--force"
        if entry is None:
            return self.cache.absent_because(name) or "first run"
        if upstream is not None:
            return f"{upstream} runs before it"
        if entry.get("key") != key:
            return cache.changes(entry.get("basis"), basis)
        return (
            cache.damage(entry.get("outputs", {}), [Path(r) for r in entry.get("roots", [])])
            or self._untrusted_run(entry, key)
            or valid(entry)
        )

    def _untrusted_run(self, entry: dict[str, Any], key: str) -> str | None:
        """Why the run a cached entry names cannot stand for the step (None: it can): it must be in the store,
        FINISHED, and carry this step's key (:data:`STEP_KEY_TAG`), so an entry edited to name another run —
        or none, which would leave ``latest`` to pick one — never passes another model off as the cached one."""
        run_id = entry.get("run_id")
        if run_id is None:
            return "its cache entry names no run"
        run = self.tracker.stored_run(run_id)
        if run is None or run.info.status != "FINISHED":
            return f"its run {run_id} is {run.info.status.lower() if run else 'no longer in the tracking store'}"
        if run.data.tags.get(STEP_KEY_TAG) != key:
            return f"its run {run_id} was not made by this step with these settings"
        return None


def _prepare(ctx: _Context) -> StageOutcome:
    from gssf_cli.stages import prepare

    config = stage_config(ctx.pipeline, "prepare", ctx.links)
    source = {"source": cache.digest([config.source])} if config.source is not None else {}

    def work() -> tuple[str | None, dict[str, Any], list[Path]]:
        result = prepare.run(config, ctx.tracker, ctx.parent_run_id)
        return result.run_id, {"path": result.path, "splits": result.splits}, [config.out]

    outcome, entry = ctx.step("prepare", config, source, (), work)
    ctx.links = steps.after_prepare(ctx.links, config.out, entry)
    return outcome


def _train(ctx: _Context, name: str = "train", config: Any = None) -> StageOutcome:
    from gssf_cli.stages import train

    config = config if config is not None else stage_config(ctx.pipeline, "train", ctx.links)
    inputs = {"dataset": steps.dataset_digest(config.data), "prepare": ctx.links.prepare_run}
    after = ("prepare", "tune") if name == "train_best" else ("prepare",)

    key = cache.key(name, to_dict(config), inputs)

    def work() -> tuple[str | None, dict[str, Any], list[Path]]:
        interrupted = _interrupted_train(ctx, key, config.runs_dir)
        if interrupted is not None:
            ctx.notify(f"{name}: resumes its interrupted run {interrupted} from its checkpoint")
        result = train.run(config, ctx.tracker, ctx.parent_run_id, progress=ctx.progress, resume=interrupted,
                           tags={STEP_KEY_TAG: key})  # fmt: skip
        metric = result.validation_metric
        on = steps.split_label_of(config.data, config.val_split)
        summary = {"on": on, "best_epoch": result.best_epoch, metric: result.metrics.get(f"val_{metric}")}
        return result.run_id, summary, [Path(result.out_dir) / "best"]

    outcome, entry = ctx.step(name, config, inputs, after, work)
    ctx.links = steps.after_train(ctx.links, outcome.run_id, entry)
    if name == "train":
        ctx.baseline = ctx.links
    return outcome


def _interrupted_train(ctx: _Context, key: str, runs_dir: Path) -> str | None:
    """A train run this step started with these settings and inputs (its key, tagged from the run's creation)
    that a kill ended — RUNNING with its process gone (this pipeline holds the folder's lock, so no live run of
    it exists) or KILLED — and that its runs folder can resume; the newest, or None. A FAILED run is not
    resumed: it would fail again."""
    from gssf_cli.modeling import checkpoint as ckpt

    found = ctx.tracker.client.search_runs(
        [ctx.tracker.experiment_id], f"tags.`{STEP_KEY_TAG}` = '{key}'", order_by=["attributes.start_time DESC"]
    )
    for run in found:
        folder = runs_dir / run.info.run_id
        if run.info.status in ("RUNNING", "KILLED") and (
            (folder / ckpt.LAST).exists() or ckpt.read_run_config(folder) is not None
        ):
            return str(run.info.run_id)
    return None


def _evaluate(ctx: _Context, name: str = "evaluate") -> StageOutcome:
    from gssf_cli.stages import evaluate

    config = stage_config(ctx.pipeline, "evaluate", ctx.links)
    model_step = steps.model_step(ctx.pipeline) if name == "evaluate" else "train"

    def work() -> tuple[str | None, dict[str, Any], list[Path]]:
        result = evaluate.run(config, ctx.tracker, ctx.parent_run_id)
        if result.run_id is not None:
            named = ctx.tracker.get_run(result.run_id).info.run_name
            ctx.tracker.rename_run(result.run_id, steps.evaluation_run_base(name, named))
        summary = {k: result.metrics[k] for k in registry.HEADLINE[result.task]}
        on = steps.split_label_of(ctx.links.data, config.split or "test")
        return result.run_id, {"on": on, **summary, "metrics": result.metrics}, []

    outcome, _ = ctx.step(
        name, config, {"model": ctx.links.model}, (model_step,), work, lambda entry: _gone(ctx, entry)
    )
    metrics = outcome.summary.pop("metrics", {}) if outcome.status != "would run" else {}
    prefix = "baseline" if name == "evaluate_baseline" else "final"
    ctx.metrics.update({f"{prefix}_{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
    return outcome


def _gone(ctx: _Context, entry: dict[str, Any]) -> str | None:
    run_id = entry.get("run_id")
    if run_id and ctx.tracker.run_status(run_id) != "FINISHED":
        return f"its run {run_id} is no longer in the tracking store"
    return None


def _tune(ctx: _Context) -> StageOutcome:
    from gssf_cli.stages import tune

    config = stage_config(ctx.pipeline, "tune", ctx.links)
    base = steps.base_train(ctx.pipeline)
    inputs = {"base": base, "dataset": steps.dataset_digest(config.data), "prepare": ctx.links.prepare_run}

    def work() -> tuple[str | None, dict[str, Any], list[Path]]:
        result = tune.run(config, ctx.tracker, ctx.parent_run_id, ctx.progress is not None, base or None)
        val_split = base.get("val_split", default_of(steps.TrainConfig, "val_split"))
        tuned = steps.tune_winner(result, steps.split_label_of(config.data, val_split))
        won = ", ".join(f"{k}={v}" for k, v in tuned["values"].items()) if tuned else None
        summary = {"won": won, "best": result.best, "best_config": result.best_config, "tuned": tuned}
        return result.run_id, summary, [Path(result.best_config)] if result.best_config else []

    outcome, _ = ctx.step("tune", config, inputs, ("prepare",), work)
    ctx.links = steps.after_tune(ctx.links, outcome.summary.get("best_config"))
    return outcome


def _compare(ctx: _Context) -> StageOutcome:
    """The final model against the baseline, paired over the test queries (the ``gssf compare`` stage, nested
    in the pipeline run); the outcome's summary keeps the headline metric's row as ``test``."""
    from gssf_cli.stages import compare

    baseline = ctx.baseline or ctx.links
    protocol = stage_config(ctx.pipeline, "evaluate", ctx.links).protocol
    if protocol in COCO_TRUTHS:
        protocol = "coco-5k"  # the split they evaluate, by the per-query ranks compare pairs
    config = CompareConfig(runs=(baseline.train_run, ctx.links.train_run), protocol=protocol)
    inputs = {"baseline": baseline.model, "final": ctx.links.model}

    def work() -> tuple[str | None, dict[str, Any], list[Path]]:
        result = compare.run(config, ctx.tracker, ctx.parent_run_id)
        headline = registry.HEADLINE[result.task][0]
        row = next(r for r in result.rows if r["metric"] == headline)
        test = {key: row[key] for key in ("metric", "baseline", "other", "difference", "ci_low", "ci_high", "p_value")}
        verdict = "no significant difference" if row["verdict"] == "n.s." else f"significantly {row['verdict']}"
        test |= {"verdict": verdict, "units": result.units, "unit": result.unit}
        test["line"] = steps.verdict_line(test)
        return result.run_id, {"verdict": test["line"], "test": test}, []

    outcome, _ = ctx.step("compare", config, inputs, ("train", "train_best"), work, lambda entry: _gone(ctx, entry))
    test = outcome.summary.get("test")
    if test:
        ctx.metrics.update({f"vs_baseline_{test['metric']}": test["difference"], "vs_baseline_p": test["p_value"]})
    return outcome


def _train_best(ctx: _Context) -> StageOutcome:
    best = ctx.links.best_config
    if best is None or not Path(best).is_file():
        if ctx.dry_run:
            ctx.ran.add("train_best")
            return StageOutcome("train_best", "would run", "", why="tune runs first")
        raise CheckFailedError("tune found no best config to retrain")
    tune_config = stage_config(ctx.pipeline, "tune", ctx.links)
    config = from_dict(
        steps.TrainConfig, steps.final_values(ctx.pipeline, tune_config, load_toml(Path(best)), ctx.links), "train"
    )
    return _train(ctx, "train_best", config)


def _export(ctx: _Context) -> StageOutcome:
    from gssf_cli.stages import export

    config = stage_config(ctx.pipeline, "export", ctx.links)

    def work() -> tuple[str | None, dict[str, Any], list[Path]]:
        result = export.run(config, ctx.tracker, ctx.parent_run_id)
        if not result.passed:
            raise CheckFailedError(f"ONNX parity outside tolerance (see {result.path}/manifest.json)")
        onnx = result.parity["retrieval"]["metrics_onnx"]
        headline = {f"onnx_{k}": onnx[k] for names in registry.HEADLINE.values() for k in names if k in onnx}
        summary = {"path": result.path, "passed": result.passed, **headline, "metrics": onnx}
        return result.export_run_id, summary, [Path(result.path)]

    outcome, _ = ctx.step("export", config, {"model": ctx.links.model}, (steps.model_step(ctx.pipeline),), work)
    onnx = outcome.summary.pop("metrics", {})
    ctx.metrics.update({f"onnx_{k}": float(v) for k, v in onnx.items()})
    ctx.links = steps.after_export(ctx.links, outcome.summary.get("path"))
    return outcome


def _index(ctx: _Context) -> StageOutcome:
    """The exported bundle's gallery as an index folder (a token index for an interaction bundle)."""
    from gssf_cli.stages import index

    config = stage_config(ctx.pipeline, "index", ctx.links)
    gallery = config.gallery
    inputs = {"bundle": steps.folder_digest(ctx.links.bundle),
              "gallery": cache.digest([gallery]) if gallery is not None and gallery.is_file() else None}  # fmt: skip

    def work() -> tuple[str | None, dict[str, Any], list[Path]]:
        result = index.run(config, ctx.tracker, parent_run_id=ctx.parent_run_id)
        recall = (result.manifest.get("eval") or {}).get("recall_at_10")
        summary = {"path": result.path, "kind": result.manifest["kind"], "count": result.manifest["count"],
                   **({"recall_at_10": recall} if recall is not None else {})}  # fmt: skip
        return result.run_id, summary, [Path(result.path)]

    outcome, _ = ctx.step("index", config, inputs, ("export",), work)
    return outcome


_STEPS: dict[str, Callable[[_Context], StageOutcome]] = {
    "prepare": _prepare,
    "train": _train,
    "evaluate_baseline": lambda ctx: _evaluate(ctx, "evaluate_baseline"),
    "tune": _tune,
    "train_best": _train_best,
    "evaluate": _evaluate,
    "compare": _compare,
    "export": _export,
    "index": _index,
}
