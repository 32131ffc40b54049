"""The config machinery: typed, frozen configs with one source of defaults.

The stage configs (:mod:`gssf_cli.core.stage_configs`) are frozen dataclasses whose field defaults are the only
defaults in the project. A config is resolved with the precedence CLI > TOML file > defaults by :func:`resolve`;
unknown keys and wrong types are rejected with their key path (``prepare.seed: expected int, got str 'x'``) as a
:class:`UserInputError`.

A field is declared with :func:`setting`: its default, its ``help`` (the CLI builds its flag from it), the
:class:`~gssf_cli.core.limits.Range` it must lie in (checked for every config by :func:`from_dict`; the library
checks the same objects), and optionally a custom ``flag`` or, for a setting without a flag, ``file_only`` with
the reason. This module imports only the standard library so that ``gssf --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from gssf_cli.core import limits
from gssf_cli.core.errors import UserInputError
from gssf_cli.core.limits import (
    Range,
)


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    within: Range | None = None,
    flag: str | None = None,
    file_only: str | None = None,
) -> Any:
    """A config field: default, help text, allowed range, and how the CLI spells it (see the module docstring)."""
    metadata = {"help": help, "range": within, "flag": flag, "file_only": file_only}
    return dataclasses.field(default=default, metadata=metadata)


def default_of(cls: type, name: str) -> Any:
    """A config field's default: the library reads its defaults here instead of repeating them."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    if field.default is dataclasses.MISSING:
        raise KeyError(f"{cls.__name__}.{name} has no default")
    return field.default


def check_ranges(config: Any, section: str) -> None:
    """Every float setting (and every float in a list setting) is finite, and every field declared ``within`` a
    range lies inside it (None means "not set" and is skipped)."""
    for field in dataclasses.fields(config):
        within = field.metadata.get("range")
        value = getattr(config, field.name)
        key = f"{section}.{field.name}"
        for i, item in enumerate(value) if isinstance(value, (tuple, list)) else ():
            limits.check_finite(f"{key}[{i}]", item)
        limits.check_finite(key, value)
        if within is not None and value is not None:
            within.check(key, value)


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
    except UnicodeDecodeError as exc:
        line = _line_of(path, exc.start)
        raise UserInputError(f"{path}: not valid TOML (line {line} is not UTF-8; save the file as UTF-8)") from None
    except IsADirectoryError:
        raise UserInputError(f"{path}: is a folder, not a TOML file") from None
    except OSError as exc:
        raise UserInputError(f"{path}: cannot read ({exc.strerror})") from None


def _line_of(path: Path, offset: int) -> int:
    """The 1-based line of byte ``offset`` in ``path`` (for an error message)."""
    try:
        return path.read_bytes()[:offset].count(b"\n") + 1
    except OSError:
        return 0


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
        close = difflib.get_close_matches(unknown[0], fields, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UserInputError(f"{section}.{unknown[0]}: unknown key ({hint}valid keys: {', '.join(sorted(fields))})")
    kwargs: dict[str, Any] = {}
    for name, field in fields.items():
        if name in values:
            kwargs[name] = coerce(values[name], hints[name], f"{section}.{name}")
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise UserInputError(f"{section}.{name}: required but not given")
    config = cls(**kwargs)
    check_ranges(config, section)
    validate = getattr(config, "validate", None)
    if callable(validate):
        validate()
    return config


def field_value(cls: type, name: str, values: Mapping[str, Any], section: str) -> Any:
    """One field of config ``cls`` from ``values`` (type-checked like :func:`from_dict`), else its default:
    for the one setting needed before the rest can be resolved (the runs folder of a resumed run)."""
    if name not in values:
        return default_of(cls, name)
    return coerce(values[name], typing.get_type_hints(cls)[name], f"{section}.{name}")


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


def coerce(value: Any, hint: Any, key: str) -> Any:
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
                return coerce(value, option, key)
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
        return tuple(coerce(v, item_hint, f"{key}[{i}]") for i, v in enumerate(value))
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
