"""What ``gssf tune`` does with its trials' outcomes, without Ray: ranking (by configuration when seeds repeat
it), statuses, the results tables and their CSV, and the :class:`TrialLog` protocol through which the driver
reports each trial while it runs. The plan they came from is :mod:`gssf_cli.training.tune_plan`.
"""

from __future__ import annotations

import csv
import io
import json
import typing
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from gssf_cli.core.config import dump_toml, from_dict, to_dict
from gssf_cli.core.errors import UserInputError
from gssf_cli.core.stage_configs import TuneConfig
from gssf_cli.evaluation.plots import BlockSizeAxes, BlockSizeTrial
from gssf_cli.evaluation.seeds import SEED_KEY, Spread, by_configuration, spread
from gssf_cli.training.tune_plan import TunePlan, make_plan, rank_key, trial_train_values


@dataclass(frozen=True)
class TrialOutcome:
    """One trial as the driver saw it, ready to log and print."""

    trial_id: str
    values: dict[str, Any]
    status: str
    metric: float | None
    epochs: int
    seconds: float
    error: str | None = None
    path: str = ""
    head_params: int | None = None
    run_id: str | None = None
    history: list[tuple[int, int, dict[str, float]]] = field(default_factory=list, repr=False)
    start_ms: int | None = None
    end_ms: int | None = None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("history", "start_ms", "end_ms"):
            out.pop(key)
        return out


def block_size_trials(outcomes: Sequence[TrialOutcome], base_interaction: str = "none") -> list[BlockSizeTrial]:
    """The trials that reported a metric, as the rows of :func:`~gssf_cli.evaluation.plots.block_size_figure`,
    each of the family its ``interaction`` (tuned, else ``base_interaction``) names."""
    return [
        BlockSizeTrial(
            block_size=int(o.values["block_size"]),
            metric=float(o.metric),
            head_params=o.head_params or 0,
            finished=o.status == "FINISHED",
            stopped_early=o.status == "KILLED",
            family=family_of(str(o.values.get("interaction", base_interaction))),
        )
        for o in outcomes
        if o.metric is not None
    ]


def family_of(interaction: str) -> str:
    """A trial's family as the block-size figure names it: ``embedding`` or the interaction."""
    return "embedding" if interaction == "none" else interaction


def block_size_axes(plan: TunePlan) -> BlockSizeAxes:
    """How the block-size figure labels ``plan``'s search."""
    from gssf_cli.modeling.model import head_dim

    subject = "several metrics" if plan.tunes("metric") else plan.base.metric
    return BlockSizeAxes(metric=plan.metric, mode=plan.mode, embed_dim=head_dim(plan.base), subject=subject)


def trial_values_or_none(plan: TunePlan, values: Mapping[str, Any]) -> dict[str, Any] | None:
    """:func:`trial_train_values`, or None for values no train config accepts (a failed trial's)."""
    try:
        return trial_train_values(plan, values)
    except UserInputError:
        return None


def describe_values(values: Mapping[str, Any]) -> str:
    """``block_size=8 lr=0.001``: a trial's tuned values on one line."""
    return " ".join(f"{k}={_short(v)}" for k, v in values.items())


def trial_run_name(values: Mapping[str, Any]) -> str:
    """A trial run's name before the tracker's short id: ``trial-block_size=8,lr=0.001``."""
    return "trial-" + ",".join(f"{k}={_short(v)}" for k, v in values.items())


class TrialLog(typing.Protocol):
    """Where the tune driver sends each trial's life as it happens (the tune stage implements it over MLflow).

    Called from Ray Tune's driver-side callback, in the driver process only, so one process writes the tracking
    store. A trial may start more than once (a retry after a crash, a resumed tune): ``trial_started`` then
    continues the trial's record. ``epoch`` is the number training reported with the epoch's ``metrics``;
    ``status`` is FINISHED, KILLED (stopped early by the scheduler after ``epochs`` of the budget) or FAILED
    (with ``error``, one line).
    """

    def trial_started(self, trial_id: str, values: Mapping[str, Any], path: str) -> None: ...

    def trial_result(self, trial_id: str, epoch: int, metrics: Mapping[str, float]) -> None: ...

    def trial_ended(self, trial_id: str, status: str, epochs: int, error: str | None) -> None: ...


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def results_csv(ranked: list[TrialOutcome], plan: TunePlan) -> str:
    """The results table: one row per trial, best first."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    names = list(plan.names)
    writer.writerow(
        ["rank", "trial_id", "run_id", "status", *names, plan.metric, "epochs", "seconds", "head_params", "error"]
    )
    for rank, o in enumerate(ranked, start=1):
        writer.writerow(
            [
                rank,
                o.trial_id,
                o.run_id or "",
                o.status,
                *(o.values.get(n, "") for n in names),
                "" if o.metric is None else o.metric,
                o.epochs,
                o.seconds,
                "" if o.head_params is None else o.head_params,
                o.error or "",
            ]
        )
    return buffer.getvalue()


RESUME_TAG = "gssf.tune.resume"
MAX_TAG_LENGTH = 8000
"""MLflow's longest tag value: resume settings longer than this (a huge search space) are not recorded."""


@dataclass(frozen=True)
class Search:
    """A checked search, ready to start or continue: its config, plan, Ray storage (absolute or a URI) and the
    folder relative trial paths (a tuned teacher file) are read from."""

    config: TuneConfig
    plan: TunePlan
    storage: str
    root: Path


def resume_tags(search: Search) -> dict[str, str]:
    """What :func:`gssf_cli.stages.tune.resume` needs, recorded as the tune run is created (so a run that exists can be resumed): the
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


def saved_search(run_id: str, text: str | None) -> Search:
    """The search a tune run recorded (``text``: its :data:`RESUME_TAG`), checked again as a new tune would be."""
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
    return Search(config, make_plan(config, base_values=base), config.storage, root)


@dataclass(frozen=True)
class Configuration:
    """The trials of one configuration: equal tuned values but for the seed (several samples of a grid point, or
    a ``seed`` axis). ``spread`` aggregates the finished trials' metric (a trial the scheduler stopped early
    reported a shorter budget); ``trial_ids`` lists those trials."""

    values: dict[str, Any]
    spread: Spread | None
    trial_ids: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "values": self.values,
            "metric": None if self.spread is None else self.spread.to_json(),
            "trial_ids": list(self.trial_ids),
        }


def configurations(outcomes: list[TrialOutcome], mode: str) -> list[Configuration]:
    """The tune summary per configuration across seeds, best mean first (configurations with no finished
    trial last): what picks the best configuration when any has more than one seed."""
    found = []
    for values, group in by_configuration(outcomes, lambda o: o.values):
        finished = [o for o in group if o.status == "FINISHED" and o.metric is not None]
        summary = spread(float(o.metric) for o in finished if o.metric is not None) if finished else None
        found.append(Configuration(values, summary, tuple(o.trial_id for o in finished)))
    return sorted(found, key=lambda c: rank_key(None if c.spread is None else c.spread.mean, mode))


def repeated(found: list[Configuration]) -> bool:
    """Whether any configuration ran with more than one seed (then configurations, not trials, are ranked)."""
    return any(c.spread is not None and c.spread.n > 1 for c in found)


def best_trial(ranked: list[TrialOutcome], found: list[Configuration]) -> TrialOutcome | None:
    """The best trial of ``ranked`` (best first); when configurations ran with several seeds, the best seed of the
    configuration with the best mean (``found``, from :func:`configurations`): one lucky seed must not pick it."""
    if repeated(found) and found[0].spread is not None:
        return next(o for o in ranked if o.trial_id in found[0].trial_ids)
    return next((o for o in ranked if o.metric is not None), None)


def result_tables(ranked: list[TrialOutcome], plan: TunePlan) -> dict[str, str]:
    """The tune's CSV tables by file name: ``trials.csv`` (:func:`results_csv`) and, when a configuration ran with
    several seeds, ``configurations.csv``: one row per configuration, best mean first (mean, sample std, n)."""
    tables = {"trials.csv": results_csv(ranked, plan)}
    found = configurations(ranked, plan.mode)
    if repeated(found):
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        names = [n for n in plan.names if n != SEED_KEY]
        writer.writerow(["rank", *names, f"{plan.metric}_mean", f"{plan.metric}_std", "n", "trial_ids"])
        for rank, c in enumerate(found, start=1):
            stats = [c.spread.mean, c.spread.std, c.spread.n] if c.spread is not None else ["", "", 0]
            writer.writerow([rank, *(c.values.get(n, "") for n in names), *stats, " ".join(c.trial_ids)])
        tables["configurations.csv"] = buffer.getvalue()
    return tables


BEST_CONFIG = "config/best_train.toml"
"""Where the best trial's train config goes (``gssf train --config`` loads it), below the tune's folder and run."""


def write_outputs(
    out_dir: Path, ranked: list[TrialOutcome], best: TrialOutcome | None, plan: TunePlan
) -> dict[str, Path]:
    """``trials.csv`` (and ``configurations.csv`` across seeds), the best train config and, when the block size is
    tuned, the block-size plot, written into ``out_dir``: ``{artifact path on the tune run: file}``."""
    from gssf_cli.evaluation import plots

    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for name, table in result_tables(ranked, plan).items():
        written[name] = out_dir / name
        written[name].write_text(table, encoding="utf-8")
    if best is not None:
        written[BEST_CONFIG] = out_dir / Path(BEST_CONFIG).name
        written[BEST_CONFIG].write_text(dump_toml(trial_train_values(plan, best.values)), encoding="utf-8")
    figure = (
        plots.block_size_figure(block_size_trials(ranked, plan.base.interaction), block_size_axes(plan))
        if plan.tunes("block_size")
        else None
    )
    if figure is not None:
        written["plots/block_size.png"] = out_dir / "block_size.png"
        figure.savefig(written["plots/block_size.png"], dpi=120)
        plots.close(figure)
    return written
