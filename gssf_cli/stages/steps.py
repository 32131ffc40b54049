"""The steps of a pipeline and the links between them: which step runs when, and each stage's config.

Why a module of its own: the pipeline stage orchestrates tracked runs; *what* runs in which order, which
model is final, and how one stage's output becomes the next stage's config are plain decisions on a
:class:`~gssf_cli.core.stage_configs.PipelineConfig`, made the same way for the up-front check, a dry run and a run.

Steps, in order: ``prepare``, ``train``, then with ``[tune] retrain = true`` ``evaluate_baseline`` (the first
model, for comparison), ``tune``, ``train_best`` (the best trial's config with the ``[train]`` budget),
``evaluate`` of that final model and ``compare`` (the paired test of the final model against the baseline, as
``gssf compare`` runs it, so the summary can say whether the tuned model is really better); ``export`` always
acts on the final model, and ``index`` indexes the bundle ``export`` wrote (its gallery, unless ``[index]``
names one: the prepared dataset's test images).
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gssf_cli.core.config import default_of, from_dict
from gssf_cli.core.errors import UserInputError
from gssf_cli.core.files import MANIFEST, manifest_digest
from gssf_cli.core.stage_configs import (
    EvaluateConfig,
    ExportConfig,
    IndexConfig,
    PipelineConfig,
    PrepareConfig,
    TrainConfig,
    TuneConfig,
)

__all__ = ["Links", "TrainConfig", "check", "plan", "stage_config"]

CONFIGS: dict[str, type] = {
    "prepare": PrepareConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
    "tune": TuneConfig,
    "export": ExportConfig,
    "index": IndexConfig,
}
EVALUATIONS: dict[str, str] = {"evaluate_baseline": "baseline", "evaluate": "final"}
"""Which model each evaluation step measures, said in its run's name (``evaluate-baseline-…``,
``evaluate-final-…``): the stage names a run by the model's metric, and a tune's baseline and final model may
share it, so the runs table could not tell the two apart."""
BUDGET: tuple[str, ...] = ("epochs", "lr_decay_epoch", "warmup_epochs")
"""Train settings that are a run's budget and schedule: a retrained final model takes them from ``[train]``,
not from the tune's per-trial budget."""


@dataclass(frozen=True)
class Links:
    """What a step takes from the steps before it: the dataset folder, the prepare run, the current model (its
    train run and a digest of its best checkpoint) and the best trial's config file."""

    data: Path | None
    train_run: str = "latest"
    prepare_run: str | None = None
    model: str | None = None
    best_config: str | None = None
    bundle: str | None = None


def retrains(pipeline: PipelineConfig) -> bool:
    return pipeline.retrain and "tune" in pipeline.stages


def plan(pipeline: PipelineConfig) -> tuple[str, ...]:
    """The steps to run, in order (see the module docstring)."""
    retrain = retrains(pipeline)
    out: list[str] = []
    for stage in pipeline.stages:
        if stage == "evaluate" and retrain:
            out += ["evaluate_baseline"] if "train" in pipeline.stages else []
        elif stage == "tune":
            out += ["tune", "train_best"] if retrain else ["tune"]
            out += ["evaluate"] if retrain and "evaluate" in pipeline.stages else []
            out += ["compare"] if retrain and {"train", "evaluate"} <= set(pipeline.stages) else []
        else:
            out.append(stage)
    return tuple(out)


def params(pipeline: PipelineConfig) -> dict[str, Any]:
    """The pipeline run's params: its file's settings as written (``pipeline.name``, ``prepare.dataset``,
    ``tune.retrain`` …, flattened by the tracker), so the run's page shows what was asked for."""
    written = tomllib.loads(pipeline.text) if pipeline.text else {}
    return written or {"pipeline": {"name": pipeline.name}, **pipeline.tables}


def evaluation_run_base(step: str, run_name: str) -> str:
    """The name an evaluation step gives its run, less the short id the tracker adds: the stage's own name with
    the step's model (:data:`EVALUATIONS`) after ``evaluate-`` — ``evaluate-gssf-d8-test-1a2b3c`` becomes
    ``evaluate-final-gssf-d8-test``."""
    stem = run_name.rsplit("-", 1)[0]
    return f"evaluate-{EVALUATIONS[step]}-{stem.removeprefix('evaluate-')}"


def dataset_folder(pipeline: PipelineConfig, links: Links) -> Path | None:
    """The dataset the pipeline's models learn from: the folder it prepares, else the one ``[train]`` (or
    ``[tune]``) names."""
    if links.data is not None:
        return links.data
    named = (pipeline.tables.get(stage, {}).get("data") for stage in ("train", "tune"))
    return next((Path(data) for data in named if isinstance(data, (str, Path))), None)


def model_step(pipeline: PipelineConfig) -> str:
    """The step whose model is final: what ``evaluate`` and ``export`` act on."""
    return "train_best" if retrains(pipeline) else "train"


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
        "index": {**_index_inputs(pipeline, links), **table, "bundle": _bundle_of(pipeline, links), "force": True},
    }[stage]
    return from_dict(CONFIGS[stage], values, stage)


def written_places(pipeline: PipelineConfig) -> list[Path]:
    """The folders a pipeline's outputs may lie in: the working folder, and every path its stage tables name
    (an absolute ``runs_dir``, say). The cache's paths are checked against these, never followed elsewhere."""
    import typing

    places = [Path()]
    for stage in pipeline.stages:
        hints = typing.get_type_hints(CONFIGS[stage])
        for name, value in pipeline.table(stage).items():
            if isinstance(value, str) and Path in (*typing.get_args(hints.get(name)), hints.get(name)):
                places.append(Path(value))
    return places


def _bundle_of(pipeline: PipelineConfig, links: Links) -> str:
    """The bundle ``index`` reads: the one ``export`` wrote, else where it will write it (before it ran: its
    ``out``, or ``exports/`` for a run not trained yet — what the up-front check can know)."""
    if links.bundle is not None:
        return links.bundle
    out = pipeline.table("export").get("out")
    return str(out) if isinstance(out, (str, Path)) else "exports"


def _index_inputs(pipeline: PipelineConfig, links: Links) -> dict[str, Any]:
    """``index``'s defaults from the pipeline: the gallery is the dataset's test images, the folder
    ``indexes/<pipeline name>``."""
    folder = dataset_folder(pipeline, links)
    gallery = {"gallery": folder / "test_ims.npy"} if folder is not None else {}
    return {**gallery, "out": Path("indexes") / pipeline.name}


def after_export(links: Links, path: str | None) -> Links:
    return replace(links, bundle=path)


def prepared(pipeline: PipelineConfig) -> Path | None:
    """The dataset folder the pipeline prepares (None without a ``[prepare]`` table)."""
    out = pipeline.tables.get("prepare", {}).get("out")
    return Path(out) if isinstance(out, (str, Path)) else None


def base_train(pipeline: PipelineConfig) -> dict[str, Any]:
    """Tune's base train config: the ``[train]`` table (its dataset comes from the link)."""
    return {k: v for k, v in pipeline.table("train").items() if k != "data"}


def final_values(pipeline: PipelineConfig, tune: TuneConfig, best: Mapping[str, Any], links: Links) -> dict[str, Any]:
    """The final model's train config: the best trial's values, with the budget (:data:`BUDGET`) of
    ``[train]`` (or its defaults) for every budget setting that was not itself tuned, ``[tune]
    retrain_epochs`` over that, and the pipeline's dataset."""
    tuned = {item.partition("=")[0].strip().replace("-", "_") for item in tune.params}
    table = pipeline.table("train")
    budget = {k: table.get(k, default_of(TrainConfig, k)) for k in BUDGET if k not in tuned}
    if pipeline.retrain_epochs is not None:
        budget["epochs"] = pipeline.retrain_epochs
    data = {"data": links.data} if links.data is not None else {}
    return {**best, **budget, **data}


def dataset_digest(folder: Path | None) -> str | None:
    """The dataset's identity by content: its manifest's sha256 (which lists every file's), if it exists."""
    return folder_digest(folder)


def folder_digest(folder: Path | str | None) -> str | None:
    """A folder gssf wrote (a dataset, a bundle), by content: its manifest's sha256, if it exists."""
    if folder is None or not (Path(folder) / MANIFEST).is_file():
        return None
    return manifest_digest(Path(folder))


def after_prepare(links: Links, out: Path, entry: Mapping[str, Any] | None) -> Links:
    return replace(links, data=out, prepare_run=_run_of(entry))


def after_train(links: Links, run_id: str | None, entry: Mapping[str, Any] | None) -> Links:
    """The trained model becomes the current one: its run, and a digest of its best checkpoint's files."""
    outputs = entry.get("outputs", {}) if entry is not None else {}
    model = hashlib.sha256(json.dumps(sorted(outputs.values())).encode()).hexdigest() if outputs else None
    return replace(links, train_run=run_id or "latest", model=model)


def after_tune(links: Links, best_config: str | None) -> Links:
    return replace(links, best_config=best_config)


def _run_of(entry: Mapping[str, Any] | None) -> str | None:
    return None if entry is None else entry.get("run_id")


# How a step's outcome reads in the summary


def split_label_of(folder: Path | None, split: str) -> str:
    """``test (unseen classes)`` on class-disjoint data, else the split's name
    (:func:`gssf_cli.data.manifest.split_label`)."""
    from gssf_cli.data.manifest import load_manifest, split_label

    if folder is None or not (folder / MANIFEST).is_file():
        return split
    return split_label(load_manifest(folder, verify=False), split)


def tune_winner(result: Any, on: str) -> dict[str, Any] | None:
    """Which values of the tuned settings won, by what, against the other trials (the pipeline result's
    ``tuned``)."""
    if result.best is None:
        return None
    trials = [{"values": {k: t["values"].get(k) for k in result.tuned}, "metric": t["metric"]} for t in result.trials]
    best = {k: result.best["values"].get(k) for k in result.tuned}
    return {"values": best, "metric": result.metric, "on": on, "value": result.best["metric"], "trials": trials}


def verdict_line(test: dict[str, Any]) -> str:
    """``rsum -0.67 [-8.00, +6.40], p = 0.8858: no significant difference`` (a compare table's row, one line)."""
    from gssf_cli.evaluation.comparison import format_p, format_value

    metric, p = test["metric"], format_p(test["p_value"])
    low, high = (format_value(metric, test[k]) for k in ("ci_low", "ci_high"))
    return (
        f"{metric} {'+' if test['difference'] >= 0 else ''}{format_value(metric, test['difference'])} "
        f"[{'+' if test['ci_low'] >= 0 else ''}{low}, {'+' if test['ci_high'] >= 0 else ''}{high}], "
        f"p {p.replace('<', '< ') if p.startswith('<') else '= ' + p}: {test['verdict']}"
    )


def check(pipeline: PipelineConfig) -> None:
    """Resolve every stage's config before anything runs, so a typo fails in a second, not after training: each
    stage's table, tune's search space against its base train config (:func:`gssf_cli.training.tune_plan.check_search`,
    which needs no dataset), and that every folder a stage will write can be written."""
    from gssf_cli.core.files import check_output_folder, check_writable
    from gssf_cli.training import tune_plan

    links = Links(prepared(pipeline))
    configs = {stage: stage_config(pipeline, stage, links) for stage in pipeline.stages}
    runs_dirs = [configs["train"].runs_dir] if "train" in configs else []
    if "tune" in configs:
        tune = configs["tune"]
        try:
            base, _ = tune_plan.check_search(tune, base_train(pipeline) or None)
        except UserInputError as exc:
            raise UserInputError(f"[tune] {exc}") from None
        runs_dirs.append(base.runs_dir)
        if "://" not in tune.storage:
            check_writable(Path(tune.storage), f"tune.storage {tune.storage}", "[tune] storage")
    if "prepare" in configs:
        check_output_folder(configs["prepare"].out, force=True, option="[prepare] out")
    for runs_dir in runs_dirs:
        check_writable(runs_dir, f"the runs folder {runs_dir}", "[train] runs_dir")
    if "index" in configs and configs["index"].out is not None:
        check_output_folder(configs["index"].out, force=True, option="[index] out")
    if "export" in configs:
        out = configs["export"].out
        if out is not None:
            check_output_folder(out, force=True, option="[export] out")
        else:
            check_writable(Path("exports"), "output folder exports", "[export] out")
