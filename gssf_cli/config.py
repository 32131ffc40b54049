"""Typed, frozen stage configs with one source of defaults.

Each stage has a frozen dataclass whose field defaults are the only defaults in the project. A config is
resolved with the precedence CLI > TOML file > defaults by :func:`resolve`; unknown keys and wrong types are
rejected with their key path (``prepare.seed: expected int, got str 'x'``) as a :class:`UserInputError`.
This module imports only the standard library so that ``gssf --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from gssf_cli.errors import UserInputError

DatasetKind = Literal["synthetic", "digits", "precomp", "features"]
DATASET_KINDS: tuple[str, ...] = get_args(DatasetKind)


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """How ``gssf prepare`` turns a source into a dataset folder.

    ``source`` is required for ``precomp`` and ``features``; the sizes apply to ``synthetic`` only.
    """

    dataset: DatasetKind
    out: Path
    source: Path | None = None
    seed: int = 0
    force: bool = False
    train_images: int = 2000
    dev_images: int = 250
    test_images: int = 250
    regions: int = 12
    region_dim: int = 64
    concepts: int = 32
    vocab_size: int = 400
    captions_per_image: int = 5
    min_word_count: int = 4
    dev_fraction: float = 0.1
    test_fraction: float = 0.2

    def validate(self) -> None:
        positive = ("train_images", "dev_images", "test_images", "regions", "region_dim", "concepts")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserInputError(f"prepare.{name}: must be at least 1, got {getattr(self, name)}")
        if self.vocab_size < 4 * self.concepts:
            raise UserInputError(
                f"prepare.vocab_size: needs 4 words per concept (3 synonyms + fillers), at least "
                f"{4 * self.concepts}; got {self.vocab_size}"
            )
        if self.captions_per_image < 1:
            raise UserInputError(f"prepare.captions_per_image: must be at least 1, got {self.captions_per_image}")
        if self.min_word_count < 1:
            raise UserInputError(f"prepare.min_word_count: must be at least 1, got {self.min_word_count}")
        for name in ("dev_fraction", "test_fraction"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise UserInputError(f"prepare.{name}: must be between 0 and 1, got {getattr(self, name)}")
        if self.dev_fraction + self.test_fraction >= 1.0:
            raise UserInputError("prepare.dev_fraction + prepare.test_fraction: must leave data for training")
        if self.dataset in ("precomp", "features") and self.source is None:
            raise UserInputError(f"--source is required for --dataset {self.dataset}: point it at your data")


Protocol = Literal["all", "f30k-1k", "coco-1k", "coco-5k"]
EmbeddingMetric = Literal["cosine", "dot"]


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """What ``gssf evaluate`` scores and how.

    ``embeddings`` is an ``.npz`` file (see :mod:`gssf_cli.stages.evaluate` for its keys); ``run`` is a
    trained run (id or ``latest``) evaluated on its dataset (or ``data``), split ``test`` unless given. ``metric``:
    ``cosine`` L2-normalises both sides first, ``dot`` scores raw inner products. ``split`` picks
    ``{split}_images``-style keys when the file holds several splits.
    """

    embeddings: Path | None = None
    run: str | None = None
    data: Path | None = None
    protocol: Protocol = "all"
    split: str | None = None
    ks: tuple[int, ...] = (1, 5, 10)
    metric: EmbeddingMetric = "cosine"
    memory_budget_mb: int = 256
    plots: bool = True

    def validate(self) -> None:
        if (self.embeddings is None) == (self.run is None):
            raise UserInputError("give exactly one of --embeddings FILE.npz or --run RUN (a run id or 'latest')")
        if self.data is not None and self.run is None:
            raise UserInputError("--data applies to --run only (it overrides the run's dataset folder)")
        if not self.ks or any(k < 1 for k in self.ks):
            raise UserInputError(f"evaluate.ks: cut-offs must be positive integers, got {list(self.ks)}")
        if self.memory_budget_mb < 1:
            raise UserInputError(f"evaluate.memory_budget_mb: must be at least 1, got {self.memory_budget_mb}")


MetricName = Literal["cosine", "diag", "bdiag", "dense", "gssf"]
MetricNorm = Literal["none", "frobenius", "spectral"]
LossName = Literal["triplet", "infonce"]
Device = Literal["auto", "cpu", "cuda"]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How ``gssf train`` learns encoders and a metric head.

    Defaults follow the host frameworks (VSE∞/SGRAF): D = 1024, batch 128, AdamW at 5e-4 decayed x0.1
    late in training, gradient clipping 2.0, hinge margin 0.2 with one warm-up epoch over all negatives.
    Weight decay applies to the metric head only (an unconstrained W could otherwise win the fixed margin
    by growing). ``distill_weight`` > 0 adds structure-aware distillation with the raw input features as
    teachers, or the arrays of ``teacher`` (an .npz with ``images`` [N, Fi] and ``texts`` [kN, Ft] for the
    train split).
    """

    data: Path
    metric: MetricName = "gssf"
    block_size: int = 64
    metric_norm: MetricNorm = "none"
    embed_dim: int = 1024
    word_dim: int = 300
    pooling: Literal["mean", "max", "attention"] = "mean"
    mlp: bool = False
    gru_layers: int = 1
    epochs: int = 20
    batch_size: int = 128
    lr: float = 5e-4
    lr_decay_epoch: int = 15
    lr_decay: float = 0.1
    weight_decay: float = 1e-4
    warmup_epochs: int = 1
    grad_clip: float = 2.0
    loss: LossName = "triplet"
    margin: float = 0.2
    temperature: float = 0.05
    distill_weight: float = 0.0
    distill_kind: Literal["mae", "mse"] = "mae"
    distill_use_metric: bool = False
    teacher: Path | None = None
    seed: int = 0
    device: Device = "auto"
    threads: int = 0
    val_split: str = "dev"
    runs_dir: Path = Path("runs")

    def validate(self) -> None:
        for name in ("embed_dim", "word_dim", "gru_layers", "epochs", "batch_size", "block_size"):
            if getattr(self, name) < 1:
                raise UserInputError(f"train.{name}: must be at least 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise UserInputError("train.batch_size: needs at least 2 pairs per batch (negatives come from the batch)")
        for name in ("lr", "margin", "temperature"):
            if getattr(self, name) <= 0:
                raise UserInputError(f"train.{name}: must be positive, got {getattr(self, name)}")
        for name in ("weight_decay", "distill_weight", "grad_clip", "lr_decay", "warmup_epochs", "threads"):
            if getattr(self, name) < 0:
                raise UserInputError(f"train.{name}: must not be negative, got {getattr(self, name)}")
        if self.uses_block_size():
            from gssf_cli.similarity import check_block_size

            check_block_size(self.metric, self.embed_dim, self.block_size)

    def uses_block_size(self) -> bool:
        return self.metric in ("bdiag", "gssf")


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """What ``gssf export --onnx`` writes and how strictly it checks it.

    ``out`` defaults to ``exports/<run id>``. Parity passes when every ONNX Runtime output satisfies
    ``|ort - torch| <= atol + rtol * |torch|`` and test-split retrieval agrees (see the export stage).
    """

    run: str = "latest"
    out: Path | None = None
    opset: int = 20
    atol: float = 1e-5
    rtol: float = 1e-4
    split: str = "test"
    parity_batch: int = 16
    force: bool = False

    def validate(self) -> None:
        if not 18 <= self.opset <= 23:
            raise UserInputError(f"export.opset: the dynamo exporter supports opsets 18 to 23, got {self.opset}")
        if self.atol < 0 or self.rtol < 0:
            raise UserInputError("export.atol / export.rtol: tolerances must not be negative")
        if self.parity_batch < 2:
            raise UserInputError(f"export.parity_batch: must be at least 2, got {self.parity_batch}")


C = TypeVar("C")


def load_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file, turning every failure into one readable line."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise UserInputError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserInputError(f"{path}: not valid TOML ({exc})") from None
    except OSError as exc:
        raise UserInputError(f"{path}: cannot read ({exc.strerror})") from None


def resolve(
    cls: type[C],
    section: str,
    file_values: dict[str, Any] | None = None,
    cli_values: dict[str, Any] | None = None,
) -> C:
    """Build ``cls`` from defaults, then ``file_values``, then the CLI values that were given (not None).

    ``section`` names the config in error messages (``prepare.seed: ...``).
    """
    merged: dict[str, Any] = dict(file_values or {})
    merged.update({k: v for k, v in (cli_values or {}).items() if v is not None})
    return from_dict(cls, merged, section)


def from_dict(cls: type[C], values: dict[str, Any], section: str) -> C:
    """Check keys and types of ``values`` against dataclass ``cls`` and build it."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UserInputError(f"{section}.{unknown[0]}: unknown key (valid keys: {', '.join(sorted(fields))})")
    kwargs: dict[str, Any] = {}
    for name, field in fields.items():
        if name in values:
            kwargs[name] = _coerce(values[name], hints[name], f"{section}.{name}")
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise UserInputError(f"{section}.{name}: required but not given")
    config = cls(**kwargs)
    validate = getattr(config, "validate", None)
    if callable(validate):
        validate()
    return config


def to_dict(config: Any) -> dict[str, Any]:
    """A config as plain TOML/JSON-friendly values (paths as strings, None dropped)."""
    out: dict[str, Any] = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if value is None:
            continue
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[field.name] = value
    return out


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except UserInputError as exc:
                errors.append(str(exc))
        raise UserInputError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is Literal:
        allowed = get_args(hint)
        if value not in allowed:
            raise UserInputError(f"{key}: {value!r} is not one of {', '.join(map(str, allowed))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise UserInputError(f"{key}: expected a list, got {_describe(value)}")
        item_hint = get_args(hint)[0]
        return tuple(_coerce(v, item_hint, f"{key}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise UserInputError(f"{key}: expected true or false, got {_describe(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserInputError(f"{key}: expected an integer, got {_describe(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserInputError(f"{key}: expected a number, got {_describe(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise UserInputError(f"{key}: expected a string, got {_describe(value)}")
        return value
    if hint is Path:
        if not isinstance(value, (str, Path)):
            raise UserInputError(f"{key}: expected a path, got {_describe(value)}")
        return Path(value).expanduser()
    raise TypeError(f"unsupported config type {hint!r} for {key}")


def parse_int_list(text: str | None, option: str) -> tuple[int, ...] | None:
    """``"1,5,10"`` -> ``(1, 5, 10)``; a readable error for anything else."""
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UserInputError(f"{option}: expected comma-separated integers such as 1,5,10, got {text!r}") from None


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def dump_toml(values: Mapping[str, Any]) -> str:
    """TOML text for config values: scalars, lists and one level of tables (all a config needs)."""
    lines: list[str] = []
    scalars = {k: v for k, v in values.items() if not isinstance(v, Mapping)}
    tables = {k: v for k, v in values.items() if isinstance(v, Mapping)}
    lines += [f"{k} = {_toml_value(v)}" for k, v in scalars.items()]
    for name, table in tables.items():
        if lines:
            lines.append("")
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items() if not isinstance(v, Mapping)]
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


SchedulerName = Literal["asha", "fifo"]
Mode = Literal["max", "min"]


@dataclasses.dataclass(frozen=True)
class TuneConfig:
    """How ``gssf tune`` searches train settings with Ray Tune (the search space itself is parsed by
    :mod:`gssf_cli.tuning`, which needs the base train config to check it).

    ``params`` are ``NAME=SPEC`` strings (``block_size=4,8,16``, ``lr=1e-4:1e-2:log``, ``block_size=divisors``).
    The base train config comes from ``base_config`` (a ``gssf train --config`` TOML), then the ``base``
    ``KEY=VALUE`` overrides, then ``data`` and ``epochs``. ``metric`` is the optimisation target, a validation
    metric such as ``rsum`` or ``map_at_r`` (default: the dataset's validation metric), or ``loss``;
    ``mode`` defaults to what the metric means (``min`` for loss and ranks). ``trials`` is Ray's
    ``num_samples``: every grid point is run once per sample (default 1 for a pure grid, 8 otherwise).
    ``max_concurrent`` 0 lets the CPUs decide. ``address`` joins a running Ray cluster instead of starting a
    local one; ``storage`` is where Ray keeps trial results and checkpoints (a folder, or a URI such as
    ``s3://bucket/path`` that every node of a cluster can reach).
    """

    params: tuple[str, ...]
    data: Path | None = None
    base: tuple[str, ...] = ()
    base_config: Path | None = None
    epochs: int | None = None
    metric: str | None = None
    mode: Mode | None = None
    trials: int | None = None
    scheduler: SchedulerName = "asha"
    grace_period: int = 1
    reduction_factor: int = 2
    cpus_per_trial: int = 1
    max_concurrent: int = 0
    max_failures: int = 1
    address: str | None = None
    storage: str = ".gssf/ray"
    seed: int = 0

    def validate(self) -> None:
        if not self.params:
            raise UserInputError("give at least one --param NAME (e.g. --param block_size --values 8,16,32)")
        for name in ("grace_period", "cpus_per_trial"):
            if getattr(self, name) < 1:
                raise UserInputError(f"tune.{name}: must be at least 1, got {getattr(self, name)}")
        if self.reduction_factor < 2:
            raise UserInputError(f"tune.reduction_factor: must be at least 2, got {self.reduction_factor}")
        if self.trials is not None and self.trials < 1:
            raise UserInputError(f"tune.trials: must be at least 1, got {self.trials}")
        if self.epochs is not None and self.epochs < 1:
            raise UserInputError(f"tune.epochs: must be at least 1, got {self.epochs}")
        for name in ("max_concurrent", "max_failures"):
            if getattr(self, name) < 0:
                raise UserInputError(f"tune.{name}: must not be negative, got {getattr(self, name)}")
        if not self.storage.strip():
            raise UserInputError("tune.storage: must name a folder or a URI")
