"""The pure half of ``gssf tune``: search-space syntax, the base train config, and every check that must pass
before Ray starts.

Why a separate module: a typo in ``--param`` should cost a second, not a Ray start-up and a failed trial, so
everything that can be checked without running a trial is checked here — parameter names, value syntax, block
sizes against the embedding size (for every combination of grid values and range ends), files named by the
base config or a tuned value, the optimisation metric against the dataset's task. It imports the standard
library and :mod:`gssf_cli.core.config` only; Ray lives in :mod:`gssf_cli.cluster`. What the driver
does with the trials' outcomes is :mod:`gssf_cli.training.tune_results`.

Scheduler: ``--scheduler auto`` (the default) is FIFO for a pure grid — every value listed, as in the
block-size figure, so every trial runs its whole budget and the curve compares like with like — and ASHA as soon
as any dimension is sampled from a range, where stopping weak samples early is what makes a random search cheap.

Search-space syntax (``--param NAME=SPEC``, repeatable, or ``--param NAME --values SPEC`` for one parameter):

- ``a,b,c``: a grid — every value is tried (crossed with the other grids);
- ``lo:hi``: uniform in [lo, hi] (integers: every integer in between equally likely);
- ``lo:hi:log``: log-uniform in [lo, hi] (lo > 0);
- ``block_size`` also takes ``divisors`` (every divisor of the embedding size D) or ``divisors:lo:hi`` (the
  divisors in [lo, hi]); ``--param block_size`` alone means ``divisors``. A random block size in a range would
  rarely divide D, so ``block_size`` takes no plain range.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from gssf_cli.core import limits
from gssf_cli.core import metrics as registry
from gssf_cli.core.config import default_of, from_dict, load_toml, resolve, to_dict
from gssf_cli.core.errors import UserInputError
from gssf_cli.core.stage_configs import SchedulerName, TrainConfig, TuneConfig
from gssf_cli.data.rankable import split_problem

Kind = Literal["grid", "uniform", "loguniform", "randint", "lograndint"]

NOT_TUNABLE: dict[str, str] = {
    "data": "the dataset is fixed for a whole tune (--data)",
    "epochs": "it is every trial's budget (--epochs); ASHA stops weak trials before it",
    "device": "every trial runs on the same kind of device (--base device=...)",
    "threads": "each trial uses --cpus-per-trial threads",
    "workers": "each trial uses --workers-per-trial workers",
    "address": "trials run where the tune runs (--address)",
    "runs_dir": "trials keep their checkpoints in Ray's storage (--storage)",
    "val_split": "trials are only comparable on one validation split (--base val_split=...)",
}
"""TrainConfig fields that are settings of the whole tune rather than of one trial, with the reason."""

DEFAULT_RANDOM_TRIALS = 8
MAX_CHECKED_COMBINATIONS = 4096


@dataclasses.dataclass(frozen=True)
class Dimension:
    """One tuned parameter: a grid of values, or a range to sample (``low``/``high`` inclusive)."""

    name: str
    kind: Kind
    values: tuple[Any, ...] = ()
    low: float = 0.0
    high: float = 0.0

    @property
    def is_grid(self) -> bool:
        return self.kind == "grid"

    def probes(self) -> tuple[Any, ...]:
        """Values that stand for the whole dimension when checking configs: the grid, or the range ends."""
        if self.is_grid:
            return self.values
        if self.kind in ("randint", "lograndint"):
            return (int(self.low), int(self.high))
        return (self.low, self.high)

    def describe(self) -> str:
        if self.is_grid:
            return ", ".join(str(v) for v in self.values)
        scale = " (log)" if self.kind.startswith("log") else ""
        return f"{_number(self.low)} … {_number(self.high)}{scale}"


@dataclasses.dataclass(frozen=True)
class TunePlan:
    """Everything a tune needs, checked: the base config, the space, the metric and the trial count."""

    base: TrainConfig
    dimensions: tuple[Dimension, ...]
    task: str
    metric: str
    metric_key: str
    mode: str
    num_samples: int
    num_trials: int
    scheduler: SchedulerName
    """fifo or asha: ``auto`` is resolved here."""

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.dimensions)

    def run_name(self) -> str:
        """The tune run's name before the tracker's short id: ``tune-block_size+lr``."""
        return "tune-" + "+".join(self.names)

    def tunes(self, name: str) -> bool:
        return name in self.names


def tunable_parameters() -> dict[str, Any]:
    """The TrainConfig fields a trial may vary, with their type hints."""
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig) if f.name not in NOT_TUNABLE}


def combine_param_options(params: Sequence[str], values: str | None) -> tuple[str, ...]:
    """``--param NAME --values SPEC`` (one parameter) or repeatable ``--param NAME=SPEC`` as ``NAME=SPEC`` items."""
    items = tuple(p.strip() for p in params)
    if values is None:
        return items
    if len(items) != 1:
        raise UserInputError(
            f"--values goes with exactly one --param (got {len(items)}); for several use --param NAME=SPEC each"
        )
    if "=" in items[0]:
        raise UserInputError(f"--param {items[0]} already has values; drop --values or write --param NAME only")
    return (f"{items[0]}={values}",)


def parse_param(item: str, embed_dim: int) -> Dimension:
    """One ``NAME=SPEC`` (or bare ``NAME``) as a :class:`Dimension`, with one-line errors that show the fix;
    ``embed_dim`` (the base config's D) gives the divisors for ``block_size=divisors``."""
    name, _, spec = item.partition("=")
    name = _normalise(name)
    tunable = tunable_parameters()
    if not name:
        raise UserInputError(f"--param {item!r}: expected NAME=SPEC, e.g. block_size=8,16,32 or lr=1e-4:1e-2:log")
    if name in NOT_TUNABLE:
        raise UserInputError(f"--param {name}: not tunable, {NOT_TUNABLE[name]}")
    if name not in tunable:
        raise UserInputError(f"--param {name}: unknown parameter; tunable: {', '.join(sorted(tunable))}")
    spec = spec.strip()
    if not spec:
        if name != "block_size":
            raise UserInputError(
                f"--param {name}: give its values, e.g. --param {name}=A,B,C or a range LO:HI (LO:HI:log)"
            )
        spec = "divisors"
    where = f"--param {name}={spec}"
    hint = _strip_optional(tunable[name])
    if name == "block_size" and spec.split(":", 1)[0].strip() == "divisors":
        return Dimension(name, "grid", _divisors_spec(spec, embed_dim, where))
    if ":" in spec and hint in (int, float):
        if name == "block_size":
            raise UserInputError(
                f"{where}: a block size must divide the embedding size; list sizes or use divisors:{spec}"
            )
        return _range(name, spec, hint, where)
    values = tuple(_grid_value(part.strip(), hint, where) for part in spec.split(","))
    if any(v == "" for v in values):
        raise UserInputError(f"{where}: empty value in the list")
    if len(set(map(str, values))) != len(values):
        raise UserInputError(f"{where}: a value is listed twice")
    return Dimension(name, "grid", values)


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``--base KEY=VALUE`` items as config values: TOML values (``0.5``, ``true``, ``"x"``), else plain text."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = _normalise(key)
        if not sep or not key:
            raise UserInputError(f"--base {item!r}: expected KEY=VALUE, e.g. --base metric=bdiag")
        try:
            out[key] = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = text.strip()
    return out


def base_file_values(path: Path) -> dict[str, Any]:
    """A train config TOML: top-level keys as ``gssf train --config`` reads them, or one ``[train]`` table
    (the form a train run logs as ``config/train_resolved.toml``)."""
    values = load_toml(path)
    if set(values) == {"train"} and isinstance(values["train"], Mapping):
        return dict(values["train"])
    return values


def make_plan(
    config: TuneConfig, cpu_count: int | None = None, base_values: Mapping[str, Any] | None = None
) -> TunePlan:
    """Resolve the base config and the space, and check every trial config that can be checked up front.

    The base train config is ``config.base_config`` (a TOML file) if given, else ``base_values``.
    """
    base, dimensions = check_search(config, base_values)
    manifest = _manifest(base.data)
    task, splits = str(manifest["task"]), set(manifest.get("splits", {}))
    metric, metric_key = resolve_metric(config.metric, task)
    if metric != "loss" and base.val_split not in splits:
        raise UserInputError(
            f"{base.data} has no {base.val_split!r} split to validate trials on; "
            "prepare one, set --base val_split=..., or tune on --metric loss"
        )
    problem = split_problem(base.data, manifest, base.val_split) if metric != "loss" else None
    if problem is not None:
        raise UserInputError(
            f"{base.data}: the {base.val_split} split {problem}, so trials could not be compared on it; "
            "set --base val_split=..., prepare the dataset again, or tune on --metric loss"
        )
    available = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    if config.address is None and config.cpus_per_trial > available:
        raise UserInputError(
            f"--cpus-per-trial {config.cpus_per_trial}: this machine has {available} CPUs, so no trial could start"
        )
    if config.address is None and config.workers_per_trial * config.cpus_per_trial > available:
        raise UserInputError(
            f"--workers-per-trial {config.workers_per_trial}: needs {config.workers_per_trial * config.cpus_per_trial}"
            f" CPUs ({config.cpus_per_trial} per worker, --cpus-per-trial), but this machine has {available}, so no "
            "trial could start"
        )
    grid_size = math.prod(len(d.values) for d in dimensions if d.is_grid)
    scheduler = config.scheduler
    if scheduler == "auto":
        scheduler = "fifo" if all(d.is_grid for d in dimensions) else "asha"
    samples = config.trials or (1 if all(d.is_grid for d in dimensions) else DEFAULT_RANDOM_TRIALS)
    return TunePlan(
        base=base,
        dimensions=tuple(dimensions),
        task=task,
        metric=metric,
        metric_key=metric_key,
        mode=config.mode or default_mode(metric),
        num_samples=samples,
        num_trials=grid_size * samples,
        scheduler=scheduler,
    )


def check_search(
    config: TuneConfig, base_values: Mapping[str, Any] | None = None
) -> tuple[TrainConfig, list[Dimension]]:
    """The base train config and the parsed space, with every check that needs no dataset: the ``--param``
    syntax, names and values, the ``--base`` overrides, and every combination's train config
    (:func:`check_space`). A pipeline runs it before its first stage; :func:`make_plan` starts with it."""
    file_values = base_file_values(config.base_config) if config.base_config else dict(base_values or {})
    overrides = parse_overrides(config.base)
    values = {**file_values, **overrides}
    if config.data is None and "data" not in values:
        raise UserInputError("--data is required: the dataset folder from `gssf prepare`")
    if config.epochs is not None:
        values["epochs"] = config.epochs
    if config.data is not None:
        values["data"] = config.data
    embed_dim = values.get("embed_dim", default_of(TrainConfig, "embed_dim"))
    if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim < 1:
        raise UserInputError(f"base.embed_dim: expected a positive integer, got {embed_dim!r}")
    dimensions: list[Dimension] = []
    for item in config.params:
        dimension = parse_param(item, embed_dim)
        if dimension.name in (d.name for d in dimensions):
            raise UserInputError(f"--param {dimension.name}: given twice; put all its values in one SPEC")
        if dimension.name in overrides:
            raise UserInputError(f"--param {dimension.name} is tuned, so --base {dimension.name}=... has no effect")
        dimensions.append(dimension)
    names = [d.name for d in dimensions]
    if "embed_dim" in names and any(_uses_divisors(item) for item in config.params):
        raise UserInputError(
            "--param block_size=divisors: the embedding size is tuned too, so list the block sizes instead"
        )
    base = resolve(TrainConfig, "base", {**values, **{d.name: d.probes()[0] for d in dimensions}})
    check_space(base, dimensions)
    return base, dimensions


def probe_configs(plan: TunePlan) -> list[TrainConfig]:
    """The train configs of every combination of grid values and range ends (at most
    :data:`MAX_CHECKED_COMBINATIONS`): the trials' extremes, for checks that need the dataset (model size)."""
    base_values = to_dict(plan.base)
    combos = itertools.islice(_combinations(plan.dimensions), MAX_CHECKED_COMBINATIONS)
    return [from_dict(TrainConfig, {**base_values, **combo}, "train") for combo in combos]


def check_space(base: TrainConfig, dimensions: Sequence[Dimension]) -> None:
    """Build the train config of every combination of grid values and range ends (TrainConfig's own checks,
    e.g. a block size that does not divide D), and check that the files they name exist."""
    by_name = {d.name: d for d in dimensions}
    embed = by_name.get("embed_dim")
    if embed is not None and not embed.is_grid and _any_uses_block_size(base, by_name):
        raise UserInputError(
            f"--param embed_dim={_number(embed.low)}:{_number(embed.high)}: a sampled size would rarely be "
            "divisible by the block size; list the embedding sizes instead"
        )
    if "block_size" in by_name and not _any_uses_block_size(base, by_name):
        raise UserInputError(
            f"--param block_size: the metric {base.metric!r} has no blocks; "
            "set --base metric=bdiag (or gssf), or tune --param metric=bdiag,gssf too"
        )
    base_values = to_dict(base)
    combos = list(itertools.islice(_combinations(dimensions), MAX_CHECKED_COMBINATIONS))
    for combo in combos:
        values = {**base_values, **combo}
        try:
            from_dict(TrainConfig, values, "train")
        except UserInputError as exc:
            shown = ", ".join(f"{k}={v}" for k, v in combo.items())
            raise UserInputError(f"--param {shown}: {_without_key(str(exc))}") from None
    teachers = [base.teacher] if base.teacher is not None else []
    teachers += [Path(v) for v in by_name["teacher"].values] if "teacher" in by_name else []
    for teacher in teachers:
        if not Path(teacher).expanduser().is_file():
            raise UserInputError(f"teacher file {teacher} not found: fix --param teacher / the base config")


def resolve_metric(name: str | None, task: str) -> tuple[str, str]:
    """The optimisation metric (as the user names it) and the key trials report it under."""
    metric = registry.resolve(name, task)
    return metric.name, metric.name if metric.task == "training" else f"val_{metric.name}"


def default_mode(metric: str) -> str:
    return registry.mode(metric)


def trial_status(failed: bool, epochs_done: int, epochs: int) -> str:
    """MLflow's run status for a trial: an error is FAILED; fewer epochs than its budget without an error
    means the scheduler stopped it early (or the tune was interrupted): KILLED."""
    if failed:
        return "FAILED"
    return "FINISHED" if epochs_done >= epochs else "KILLED"


def best_value(values: Iterable[float], mode: str) -> float | None:
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not finite:
        return None
    return max(finite) if mode == "max" else min(finite)


def rank_key(value: float | None, mode: str) -> tuple[int, float]:
    """Sort key: best first, trials without a value last."""
    if value is None:
        return (1, 0.0)
    return (0, -value if mode == "max" else value)


def trial_train_values(plan: TunePlan, tuned: Mapping[str, Any]) -> dict[str, Any]:
    """The full train config of a trial, as ``gssf train --config`` reads it (top-level keys)."""
    config = from_dict(TrainConfig, {**to_dict(plan.base), **dict(tuned)}, "train")
    return to_dict(config)


def _uses_divisors(item: str) -> bool:
    name, _, spec = item.partition("=")
    return _normalise(name) == "block_size" and (not spec.strip() or spec.strip().startswith("divisors"))


def _combinations(dimensions: Sequence[Dimension]) -> Iterable[dict[str, Any]]:
    names = [d.name for d in dimensions]
    for values in itertools.product(*(d.probes() for d in dimensions)):
        yield dict(zip(names, values, strict=True))


def _any_uses_block_size(base: TrainConfig, by_name: Mapping[str, Dimension]) -> bool:
    metrics = by_name["metric"].values if "metric" in by_name else (base.metric,)
    return any(m in limits.BLOCK_SIMILARITIES for m in metrics)


def _manifest(folder: Path) -> dict[str, Any]:
    from gssf_cli.data.manifest import load_manifest

    return load_manifest(folder, verify=False)


def _divisors_spec(spec: str, dim: int, where: str) -> tuple[int, ...]:
    parts = [p.strip() for p in spec.split(":")]
    divisors = limits.valid_block_sizes(dim)
    if len(parts) == 1:
        return tuple(divisors)
    if len(parts) != 3:
        raise UserInputError(f"{where}: expected divisors or divisors:LO:HI, e.g. divisors:4:64")
    low, high = (_parse_number(p, int, where) for p in parts[1:])
    chosen = tuple(k for k in divisors if low <= k <= high)
    if not chosen:
        raise UserInputError(
            f"{where}: no divisor of the embedding size {dim} in [{low}, {high}]; "
            f"divisors: {', '.join(map(str, divisors))}"
        )
    return chosen


def _range(name: str, spec: str, hint: Any, where: str) -> Dimension:
    parts = [p.strip() for p in spec.split(":")]
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "log"):
        raise UserInputError(f"{where}: a range is LO:HI or LO:HI:log")
    low, high = (_parse_number(p, hint, where) for p in parts[:2])
    log = len(parts) == 3
    if not low < high:
        raise UserInputError(f"{where}: the range needs LO < HI")
    if log and low <= 0:
        raise UserInputError(f"{where}: a log range needs LO > 0")
    if hint is int:
        return Dimension(name, "lograndint" if log else "randint", low=low, high=high)
    return Dimension(name, "loguniform" if log else "uniform", low=low, high=high)


def _grid_value(text: str, hint: Any, where: str) -> Any:
    if text == "":
        return ""
    if hint is bool:
        lowered = text.lower()
        if lowered not in ("true", "false"):
            raise UserInputError(f"{where}: {text!r} is not true or false")
        return lowered == "true"
    if hint in (int, float):
        return _parse_number(text, hint, where)
    if get_origin(hint) is Literal:
        allowed = get_args(hint)
        if text not in allowed:
            raise UserInputError(f"{where}: {text!r} is not one of {', '.join(map(str, allowed))}")
        return text
    return text


def _parse_number(text: str, hint: Any, where: str) -> Any:
    try:
        value = int(text) if hint is int else float(text)
    except ValueError:
        kind = "an integer" if hint is int else "a number"
        raise UserInputError(f"{where}: {text!r} is not {kind}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise UserInputError(f"{where}: {text!r} is not a finite number")
    return value


def _strip_optional(hint: Any) -> Any:
    if get_origin(hint) in (typing.Union, types.UnionType):
        options = [a for a in get_args(hint) if a is not type(None)]
        return options[0] if len(options) == 1 else hint
    return hint


def _normalise(name: str) -> str:
    return name.strip().replace("-", "_")


def _number(value: float) -> str:
    return f"{value:g}"


def _without_key(message: str) -> str:
    """``train.lr: must be positive`` reads better after ``--param lr=...`` as ``lr: must be positive``."""
    return message.removeprefix("train.")
