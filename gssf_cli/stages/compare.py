"""Stage ``compare``: paired significance tests between trained runs, tracked as an MLflow run.

The work is :mod:`gssf_cli.evaluation.comparison`'s: every run is embedded on the same split (byte for byte) and
ranked under the same protocol (:func:`gssf_cli.evaluation.comparison.trained_units`), a comma-separated group of runs
(several seeds of one configuration) is averaged per query, and each later argument is tested against the
first (the baseline) on every metric: difference, bootstrap interval, sign-flip p-value. Everything is checked
and computed before the MLflow run opens — runs that are not train runs, runs for different tasks or on different splits,
a missing split, a protocol that does not fit — so bad input leaves no run and no file behind. The run then
logs the config, the dataset, tags naming the compared runs, one metric per (statistic, metric, run), the
table as ``comparison.json`` and ``comparison.md``, the per-query values as ``units.npz`` (plain float and
integer arrays, readable with ``numpy.load(..., allow_pickle=False)``), a forest plot and the score
distributions of positive and negative pairs under each argument's (first) run, side by side.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gssf_cli.core.config import to_dict
from gssf_cli.core.errors import UserInputError
from gssf_cli.core.stage_configs import CompareConfig
from gssf_cli.evaluation import comparison, seeds
from gssf_cli.evaluation.comparison import Comparison, Units
from gssf_cli.tracking.tags import SEEDS_STAGE

if TYPE_CHECKING:
    from gssf_cli.data.dataset import Dataset
    from gssf_cli.evaluation.plots import ScoreSample
    from gssf_cli.tracking.adapter import StageRun, Tracker

DATASET_TAG = "gssf.dataset.manifest_sha256"
TASK_TAG = "gssf.task"


@dataclass(frozen=True)
class System:
    """One argument of the command: a run or a group of runs (``runs``: ``{run_id, run_name}`` each), its label
    in tables and JSON (``--name``'s, else by what was passed: see :func:`_resolve`), and the short key its MLflow
    metrics end with."""

    label: str
    key: str
    runs: list[dict[str, str]]
    spread: dict[str, dict[str, float | int]] = field(default_factory=dict)
    """Per metric, mean ± sample std and n over the group's runs (each run's own metrics on the split): the
    spread from training (seeds), which the paired test over queries does not see."""

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "key": self.key, "runs": self.runs, "spread": self.spread}


@dataclass(frozen=True)
class CompareResult:
    """What ``gssf compare`` prints (``--json``): what was compared on what, every (metric, run) row, and the
    settings and method of the tests."""

    task: str
    split: str
    protocol: str | None
    dataset: dict[str, Any]
    unit: str
    units: int
    baseline: System
    compared: list[System]
    rows: list[dict[str, Any]]
    settings: dict[str, Any]
    not_tested: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    run_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "split": self.split,
            "protocol": self.protocol,
            "dataset": self.dataset,
            "unit": self.unit,
            "units": self.units,
            "baseline": self.baseline.to_json(),
            "compared": [system.to_json() for system in self.compared],
            "rows": self.rows,
            "settings": self.settings,
            "method": comparison.METHOD,
            "not_tested": self.not_tested,
            "seconds": self.seconds,
            "run_id": self.run_id,
        }


def run(config: CompareConfig, tracker: Tracker, parent_run_id: str | None = None) -> CompareResult:
    """Compare ``config.runs`` (the baseline first); the result goes to a ``compare`` run."""
    from gssf_cli.evaluation.crossmodal import check_ranking_protocol

    started = time.perf_counter()
    check_ranking_protocol(config.protocol)
    comparison.check_bootstrap_fits(config.bootstrap, len(config.groups()) - 1)  # at least one metric each
    groups, passed = _resolve(tracker, config)
    per_run, dataset, samples = _units_of(tracker, config, groups)
    tracker.follow(groups[0][0])  # the compare run lands beside the baseline (unless --experiment says otherwise)
    labels = [named or default for named, default in zip(config.labels(), passed, strict=True)]
    systems = [
        replace(system, spread={k: v.to_json() for k, v in seeds.summarize(
            [per_run[r.info.run_id].means() for r in group]).items()})
        for system, group in zip(_systems(groups, labels), groups, strict=True)
    ]  # fmt: skip
    averaged = [comparison.average_units([per_run[r.info.run_id] for r in group]) for group in groups]
    outcome = comparison.compare_units(
        averaged[0],
        {system.label: units for system, units in zip(systems[1:], averaged[1:], strict=True)},
        bootstrap=config.bootstrap,
        permutations=config.permutations,
        confidence=config.confidence,
        seed=config.seed,
    )
    baseline_units = averaged[0]
    result = CompareResult(
        task=baseline_units.task,
        split=config.split,
        protocol=config.protocol if baseline_units.task == "cross_modal" else None,
        dataset={
            "name": dataset.name,
            "folder": str(dataset.folder),
            "manifest_sha256": dataset.digest,
            "split": config.split,
        },
        unit=baseline_units.unit,
        units=baseline_units.size,
        baseline=systems[0],
        compared=systems[1:],
        rows=[row.to_json() for row in outcome.rows],
        settings={
            "bootstrap": config.bootstrap,
            "permutations": config.permutations,
            "confidence": config.confidence,
            "alpha": round(1.0 - config.confidence, 12),
            "seed": config.seed,
            "ks": list(config.ks),
        },
        not_tested=dict(comparison.NOT_TESTED) if baseline_units.task == "cross_modal" else {},
    )
    all_ids = [r.info.run_id for group in groups for r in group]
    tags = {
        "gssf.source_run": systems[0].runs[0]["run_id"],
        "gssf.compare.baseline": ",".join(r["run_id"] for r in systems[0].runs),
        "gssf.compare.runs": ",".join(dict.fromkeys(all_ids)),
    }
    start = tracker.start_run("compare", run_name=f"compare-{config.split}", parent_run_id=parent_run_id, tags=tags)
    with start as run_:
        seconds = round(time.perf_counter() - started, 3)
        result = replace(result, seconds=seconds, run_id=run_.run_id)
        _log(run_, config, dataset, result, outcome, systems, groups, per_run, averaged, samples)
    return result


def _units_of(
    tracker: Tracker, config: CompareConfig, groups: list[list[Any]]
) -> tuple[dict[str, Units], Dataset, dict[str, ScoreSample]]:
    """Each run's units on ``config.split`` (a run named twice is embedded once), the dataset they all share, and
    with ``config.plots`` the scores of a sample of the split's pairs under each argument's first run (by run id;
    its label is the run's until the figure names it)."""
    from gssf_cli.evaluation.figures import trained_score_sample
    from gssf_cli.stages.runs import load_trained

    per_run: dict[str, Units] = {}
    samples: dict[str, ScoreSample] = {}
    firsts = {group[0].info.run_id for group in groups}
    dataset: Dataset | None = None
    for group in groups:
        for train_run in group:
            run_id = train_run.info.run_id
            if run_id in per_run:
                continue
            _, model, loaded = load_trained(tracker, run_id)
            dataset = _same_dataset(dataset, loaded, run_id, config.split)
            per_run[run_id] = comparison.trained_units(
                model,
                loaded,
                config.split,
                protocol=config.protocol,
                ks=config.ks,
                memory_budget_bytes=config.memory_budget_mb * 2**20,
                full_map=config.full_map,
            )
            if config.plots and run_id in firsts:
                samples[run_id] = trained_score_sample(model, loaded, config.split, run_id)
            del model
    assert dataset is not None
    return per_run, dataset, samples


def _resolve(tracker: Tracker, config: CompareConfig) -> tuple[list[list[Any]], list[str]]:
    """Every argument's train runs (``latest`` resolved) and its label by what was passed: the name of its first
    run (a seeds run's own name) and how many more it names (``train-gssf-d4-1a2b3c +2``). Refused unless each
    is a train or seeds run and all were trained on one dataset (the manifest digest they recorded) for one
    task."""
    groups: list[list[Any]] = []
    labels: list[str] = []
    for refs in config.groups():
        runs, passed = [], []
        for ref in refs:
            found = tracker.get_run(ref, stage="train")
            stage = found.data.tags.get("gssf.stage")
            passed.append(found.info.run_name or found.info.run_id)
            if stage == SEEDS_STAGE:  # a `gssf train --seeds` run: the group of its train runs, one per seed
                children = [child for child in tracker.child_runs(found.info.run_id) if _is_train(child)]
                if not children:
                    raise UserInputError(f"seeds run {found.info.run_id} has no finished train run to compare")
                runs += children
                continue
            if stage != "train":
                raise UserInputError(
                    f"run {found.info.run_id} is a {stage or 'non-gssf'} run, not a train run: compare trained runs"
                )
            runs.append(found)
        groups.append(runs)
        labels.append(passed[0] + (f" +{len(passed) - 1}" if len(passed) > 1 else ""))
    _check_distinct(groups)
    first = groups[0][0]
    for members in groups:
        for other in members:
            mine, theirs = first.data.tags.get(TASK_TAG), other.data.tags.get(TASK_TAG)
            if mine is not None and theirs is not None and mine != theirs:
                raise UserInputError(
                    f"runs {first.info.run_id} and {other.info.run_id} were trained for different tasks "
                    f"({mine} vs {theirs}): compare runs of one dataset"
                )
    return groups, labels


def _check_distinct(groups: list[list[Any]]) -> None:
    """Refuse a run repeated within an argument (it would weigh double in the group's mean) and two arguments
    that are the same runs (a system tested against itself says nothing). Groups that share some runs are
    allowed: they are different systems."""
    seen: dict[frozenset[str], int] = {}
    for position, members in enumerate(groups, start=1):
        ids = [member.info.run_id for member in members]
        repeated = next((run_id for run_id in ids if ids.count(run_id) > 1), None)
        if repeated is not None:
            raise UserInputError(f"run {repeated} is given twice in argument {position}: give each run once")
        same = seen.setdefault(frozenset(ids), position)
        if same != position:
            what = f"run {ids[0]}" if len(ids) == 1 else f"the runs {', '.join(ids)}"
            raise UserInputError(
                f"arguments {same} and {position} are both {what}: a run compared with itself says nothing"
            )


def _is_train(found: Any) -> bool:
    return found.data.tags.get("gssf.stage") == "train" and found.info.status == "FINISHED"


def _same_dataset(known: Dataset | None, loaded: Dataset, run_id: str, split: str) -> Dataset:
    """The dataset the runs are measured on: the first run's, which must have ``split``. A later run's dataset
    may differ elsewhere (runs trained on an imbalanced copy of the train split, say) but must hold ``split``
    byte for byte, with the same vocabulary and modalities, so that every run sees the same queries."""
    if known is None:
        if not loaded.has_split(split):
            raise UserInputError(
                f"{loaded.folder}: no {split!r} split to compare on (has {', '.join(loaded.manifest['splits'])})"
            )
        return loaded
    if loaded.digest != known.digest and (
        not loaded.has_split(split) or loaded.split_content(split) != known.split_content(split)
    ):
        raise UserInputError(
            f"run {run_id} was trained on {loaded.folder} (sha256 {loaded.digest[:12]}), whose {split!r} split "
            f"differs from that of the first run's {known.folder} (sha256 {known.digest[:12]}): compare runs "
            f"measured on one {split} split"
        )
    return known


def _systems(groups: list[list[Any]], labels: list[str]) -> list[System]:
    """Each argument's system: its label, made unique where two arguments share one (the same run given twice),
    and the key its MLflow metrics end with (a short run id; a group's also says how many runs)."""
    systems: list[System] = []
    used_labels: set[str] = set()
    keys: set[str] = set()
    for index, (group, label) in enumerate(zip(groups, labels, strict=True)):
        runs = [{"run_id": r.info.run_id, "run_name": r.info.run_name or r.info.run_id} for r in group]
        key = runs[0]["run_id"][:8] + (f"_g{len(runs)}" if len(runs) > 1 else "")
        if label in used_labels:
            label = f"{label} #{index + 1}"
        if key in keys:
            key = f"{key}_{index + 1}"
        used_labels.add(label)
        keys.add(key)
        systems.append(System(label, key, runs))
    return systems


def _log(
    run_: StageRun,
    config: CompareConfig,
    dataset: Dataset,
    result: CompareResult,
    outcome: Comparison,
    systems: list[System],
    groups: list[list[Any]],
    per_run: dict[str, Units],
    averaged: list[Units],
    samples: dict[str, ScoreSample],
) -> None:
    run_.log_dataset(dataset.name, dataset.folder, dataset.digest, context=config.split)
    run_.log_config("compare", to_dict(config))
    keys = {system.label: system.key for system in systems}
    metrics: dict[str, float] = {"units": float(result.units), "seconds": result.seconds}
    for row in outcome.rows:
        suffix = f"{row.metric}_{keys[row.compared]}"
        metrics |= {
            f"diff_{suffix}": row.difference,
            f"ci_low_{suffix}": row.ci_low,
            f"ci_high_{suffix}": row.ci_high,
            f"p_{suffix}": row.p_value,
        }
    run_.log_metrics(metrics)
    payload = result.to_json()
    run_.log_dict(payload, "comparison.json")
    run_.log_text(comparison.markdown_table(payload), "comparison.md")
    with tempfile.TemporaryDirectory(prefix="gssf-compare-") as tmp:
        path = Path(tmp) / "units.npz"
        np.savez_compressed(path, **comparison.units_arrays(averaged, per_run))  # type: ignore[arg-type]
        run_.log_artifact(path)
    labels = [(system.label, [run["run_id"] for run in system.runs]) for system in systems]
    run_.log_text(comparison.units_readme(labels), "units.txt")
    if config.plots:
        from gssf_cli.evaluation import plots

        figure = plots.forest_plot(
            outcome.rows,
            f"{dataset.name}, {config.split} split: compared - baseline, {round(100 * config.confidence)}% CI",
        )
        run_.log_figure(figure, "plots/comparison_forest.png")
        plots.close(figure)
        shown = [
            replace(samples[system.runs[0]["run_id"]], label=system.label + (
                f"\n(first of its {len(system.runs)} runs)" if len(system.runs) > 1 else ""))
            for system in systems
        ]  # fmt: skip
        figure = plots.similarity_distributions(
            shown, f"{dataset.name}, {config.split} split: scores of positive vs negative pairs"
        )
        run_.log_figure(figure, "plots/similarity_distributions.png")
        plots.close(figure)
