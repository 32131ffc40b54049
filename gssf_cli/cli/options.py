"""What a gssf command line looks like: click-style help, one-line errors, and flags made from configs.

Why a module apart from :mod:`gssf_cli.cli.app`: the commands there stay "parse → config → call → print"; the
Typer/click machinery they share lives here. Typer 0.29's rich help prints a type tag for every option (even
flags: ``--debug <bool>``) and a multi-line box for usage errors; :class:`Group` and :class:`Command` give
click's spelling (no metavar for flags, ``INTEGER``, ``[a|b|c]``, ``PIPELINE.toml``) and report every click error
as one line (exit 2), or one JSON object with ``--json`` (:func:`report`). Their help is laid out by
:func:`print_help` to fit any terminal width. :func:`config_flags` turns a config dataclass into flags: one per
field, with the field's help, choices, default (:func:`shown_default`) and whether it is required.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import json
import os
import sys
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import typer
from typer._click import Context as ClickContext  # pinned: typer 0.29 vendors click as typer._click
from typer._click import exceptions as click_errors  # no public path to its usage errors
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from gssf_cli.core.config import parse_int_list
from gssf_cli.core.errors import (
    CheckFailedError,
    DiskFullError,
    RunInterrupted,
    TrackingServerLostError,
    UserInputError,
    error_chain,
    first_line,
)

T = typing.TypeVar("T")
FULL_INSTALL_ONLY = frozenset({"torch", "mlflow", "ray", "onnx", "onnxscript", "safetensors", "sklearn", "matplotlib"})
"""What ``pip install "gssf[all]"`` adds to the lean ``gssf[search]`` install (see pyproject.toml)."""

# ---------------------------------------------------------------------------------------------------------
# Help that reads like click's, and usage errors in one line


_TYPE_METAVARS: dict[Any, str] = {int: "INTEGER", float: "FLOAT", str: "TEXT", Path: "PATH", bool: "BOOLEAN"}


def _type_metavar(param: TyperOption | TyperArgument) -> str:
    """A parameter's type as click spells it: INTEGER, FLOAT, TEXT, PATH, or its choices as ``[a|b|c]``."""
    descriptor = param.type_descriptor
    if descriptor.is_choice:
        return "[" + "|".join(str(choice) for choice in descriptor.choices or ()) + "]"
    annotation = without_none(descriptor.annotation)
    if get_origin(annotation) is list:
        annotation = get_args(annotation)[0]
    return _TYPE_METAVARS.get(annotation, "VALUE")


class _Option(TyperOption):
    """Typer's option, shown as click shows one. Typer 0.29's rich help prints ``display_type_rich`` for every
    option, and that ignores ``is_flag``: hence ``--debug <bool>``, ``--help <bool>``; a value option shows
    ``<int>``, ``<list[str]>``. Here a flag shows nothing and a value option its metavar, else its type."""

    def display_type_rich(self, ctx: ClickContext) -> str | None:
        if self.is_flag or self.count:
            return None
        return self.metavar or _type_metavar(self)


class _Argument(TyperArgument):
    """Typer's argument, shown as click shows one: by its metavar alone (``PIPELINE.toml``), in the usage line
    too, where Typer 0.29 writes ``{pipeline}``, and without Typer's ``<path>`` beside it in the help."""

    @property
    def display_name_raw(self) -> str:
        return self.metavar or (self.name or "").upper()

    def display_type_rich(self, ctx: ClickContext) -> str | None:
        return None

    def _usage_display_name(self) -> str:
        name = self.display_name_raw if self.required else f"[{self.display_name_raw}]"
        return name if self.nargs == 1 else f"{name}..."


def _readable(param: Any) -> Any:
    """Give a parameter Typer built the click-style help of :class:`_Option` / :class:`_Argument`. Typer builds
    its parameters itself (there is no hook for their class), so the command classes swap it afterwards."""
    if type(param) is TyperOption:
        param.__class__ = _Option
    elif type(param) is TyperArgument:
        param.__class__ = _Argument
    return param


_BOOLEAN_WORDS = frozenset({"true", "false", "yes", "no", "on", "off", "1", "0", "y", "n", "t", "f"})
_ARGS_KEY = "gssf.group_args"


def _flag_message(flag: str) -> str:
    return f"{flag} is a flag; pass it without a value"


def _flag_given_a_value(command: Any, ctx: ClickContext, tokens: Sequence[str], extra: str) -> str | None:
    """The flag of ``command`` that ``tokens`` follow with a value (a word such as ``true``, or ``extra``, the
    first token the parser could not place), else None."""
    flags = {
        opt
        for param in command.get_params(ctx)
        if isinstance(param, TyperOption) and param.is_flag
        for opt in (*param.opts, *param.secondary_opts)
    }
    for before, token in itertools.pairwise(tokens):
        if before in flags and (token.lower() in _BOOLEAN_WORDS or token == extra):
            return before
    return None


def _in_context(exc: click_errors.UsageError, ctx: ClickContext) -> None:
    """Tell ``exc`` its command: the option parser raises without one, and the message says where to look."""
    if exc.ctx is None:
        exc.ctx, exc.cmd = ctx, ctx.command


# ---------------------------------------------------------------------------------------------------------
# Help laid out for the terminal's width


_GAP = 2
"""Spaces between a parameter's names and its help."""


def print_help(command: TyperCommand | TyperGroup, ctx: ClickContext) -> None:
    """A command's help at the terminal's width, in Typer's colours and panels, laid out as click lays it out.

    Why not Typer's layout: its option table gives the names, the metavar and the help a column each and lets rich
    squeeze them all, so at 80 columns it cuts names (``--memory-budget-…``), splits choices mid-word
    (``[cosine|diag|bd iag|...]``) and keeps a docstring's source line breaks. Here a parameter's names and
    metavar are one term, never wrapped (:class:`_Terms`); paragraphs are reflowed to the width; and a required
    parameter says ``[required]``.
    """
    from rich.console import Group as Stack
    from rich.padding import Padding
    from rich.panel import Panel
    from rich.text import Text
    from typer import rich_utils as look  # typer 0.29 (pinned): its console, colours and parameter help

    console = look._get_rich_console()
    console.print(Padding(look.highlighter(command.get_usage(ctx)), 1), style=look.STYLE_USAGE_COMMAND)
    if command.help:
        first, *rest = _paragraphs(command.help)
        prose = [look.highlighter(Text.from_markup(first))]
        if rest:
            prose += [Text(""), look.highlighter(Text.from_markup("\n\n".join(rest), style=look.STYLE_HELPTEXT))]
        console.print(Padding(Stack(*prose), (0, 1, 1, 1)))
    params = [param for param in command.get_params(ctx) if not getattr(param, "hidden", False)]
    panels: list[tuple[str, list[tuple[Text, Text]]]] = [
        (look.ARGUMENTS_PANEL_TITLE, [_param_row(p, ctx) for p in params if isinstance(p, TyperArgument)]),
        (look.OPTIONS_PANEL_TITLE, [_param_row(p, ctx) for p in params if isinstance(p, TyperOption)]),
    ]
    if isinstance(command, TyperGroup):
        subcommands = [command.get_command(ctx, name) for name in command.list_commands(ctx)]
        rows = [
            (
                Text(sub.name or "", style=look.STYLE_COMMANDS_TABLE_FIRST_COLUMN),
                look.highlighter(Text.from_markup(_paragraphs(sub.short_help or sub.help or "")[0])),
            )
            for sub in subcommands
            if sub is not None and not sub.hidden
        ]
        panels.append((look.COMMANDS_PANEL_TITLE, rows))
    for title, panel_rows in panels:
        if panel_rows:
            border = look.STYLE_OPTIONS_PANEL_BORDER
            console.print(Panel(_Terms(panel_rows), title=title, title_align="left", border_style=border))


def _paragraphs(text: str) -> list[str]:
    """A docstring's paragraphs, each joined into one line for the terminal to wrap, except one that starts with
    click's ``\\b`` (keep these line breaks); nothing after click's ``\\f``."""
    paragraphs = inspect.cleandoc(text).partition("\f")[0].split("\n\n")
    return [p.removeprefix("\b\n") if p.startswith("\b") else " ".join(p.split()) for p in paragraphs]


def _param_row(param: TyperOption | TyperArgument, ctx: ClickContext) -> tuple[Any, Any]:
    """A parameter's term (``-h, --help``, ``--mlp / --no-mlp``, ``--metric [a|b]``, ``RUN...``) and its help,
    default and ``[required]`` as Typer words them."""
    from rich.text import Text
    from typer import rich_utils as look

    if isinstance(param, TyperArgument):
        term = Text(param.display_name_raw + ("..." if param.nargs != 1 else ""))
    else:
        term = look.highlighter(Text(", ".join(sorted(param.opts, key=lambda opt: opt.startswith("--")))))
        if param.secondary_opts:
            term.append(" / ").append_text(look.negative_highlighter(Text(", ".join(param.secondary_opts))))
        metavar = param.display_type_rich(ctx)
        if metavar:
            term.append(" ").append_text(look.types_highlighter(Text(metavar, style=look.STYLE_TYPES)))
    parts = look._get_parameter_help(param=param, ctx=ctx, markup_mode="rich").renderables
    return term, Text(" ").join(typing.cast(list[Text], parts))


class _Terms:
    """Terms and their help in two columns, laid out for the width rich gives them (click's rule): the term column
    is as wide as the longest term that fits in two fifths of the width; a longer term gets a line of its own, its
    help beneath, indented; a term wider than the whole width breaks only after a space or a choice's ``|``. A term
    is never wrapped inside a word, so option names and choices stay whole."""

    def __init__(self, rows: list[tuple[Any, Any]]) -> None:
        self.rows = rows

    def __rich_console__(self, console: Any, options: Any) -> Any:
        from rich.padding import Padding
        from rich.table import Table

        width = options.max_width
        fitting = [term.cell_len for term, _ in self.rows if term.cell_len <= width * 2 // 5]
        column = max(fitting, default=width // 3)
        for term, help_text in self.rows:
            if term.cell_len <= column:
                grid = Table.grid(padding=(0, _GAP, 0, 0), expand=True)
                grid.add_column(width=column, no_wrap=True)
                grid.add_column(ratio=1)
                grid.add_row(term, help_text)
                yield grid
                continue
            yield _broken(term, width)
            if help_text.plain:
                yield Padding(help_text, (0, 0, 0, column + _GAP))


def _broken(term: Any, width: int) -> Any:
    """``term`` in lines of at most ``width`` cells, broken only after a space or a ``|`` (a word longer than the
    width stays whole, for the terminal to fold)."""
    from rich.text import Text

    plain = term.plain
    offsets: list[int] = []
    start = fit = 0
    for point in [*(i + 1 for i, char in enumerate(plain) if char in " |"), len(plain)]:
        if point - start > width and fit > start:
            offsets.append(fit)
            start = fit
        fit = point
    lines = term.divide(offsets)
    for line in lines:
        line.rstrip()
    return Text("\n").join(lines)


class _ReadableParams:
    """Click-style help for every parameter of a command or group, ``--help`` included (:func:`_readable`)."""

    params: list[Any]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            _readable(param)

    def get_help_option(self, ctx: ClickContext) -> TyperOption | None:
        return typing.cast(TyperOption | None, _readable(super().get_help_option(ctx)))  # type: ignore[misc]

    def format_help(self, ctx: ClickContext, formatter: Any) -> None:
        print_help(typing.cast(TyperCommand | TyperGroup, self), ctx)


class Command(_ReadableParams, TyperCommand):
    """A gssf command: click-style help (:func:`_readable`) and a readable error for extra arguments."""

    def parse_args(self, ctx: ClickContext, args: list[str]) -> list[str]:
        """As click, but an extra argument after a flag says that flags take no value (``--mlp true``)."""
        tokens, strict = list(args), not ctx.allow_extra_args
        ctx.allow_extra_args = True
        try:
            rest = super().parse_args(ctx, args)
        except click_errors.UsageError as exc:
            _in_context(exc, ctx)
            raise
        finally:
            ctx.allow_extra_args = not strict
        if rest and strict and not ctx.resilient_parsing:
            flag = _flag_given_a_value(self, ctx, tokens, rest[0])
            plural = "s" if len(rest) > 1 else ""
            message = _flag_message(flag) if flag else f"unexpected extra argument{plural}: {' '.join(rest)}"
            raise click_errors.UsageError(message, ctx)
        return rest


class Group(_ReadableParams, TyperGroup):
    """The ``gssf`` group: click-style help, and every click error (unknown option or command, missing or
    malformed value, extra argument) as one line on stderr with exit 2, or a JSON object with ``--json``.

    :meth:`main` runs click in non-standalone mode and renders its exceptions itself; ``typer.Exit`` codes
    from the commands (1, 2, 130) pass through unchanged, ``Abort`` is exit 1, and ``gssf`` alone prints the
    help (exit 2, as click). The console script and ``typer.testing.CliRunner`` both call :meth:`main`.
    """

    def parse_args(self, ctx: ClickContext, args: list[str]) -> list[str]:
        ctx.meta[_ARGS_KEY] = list(args)
        try:
            return super().parse_args(ctx, args)
        except click_errors.UsageError as exc:
            _in_context(exc, ctx)
            raise

    def resolve_command(self, ctx: ClickContext, args: list[str]) -> tuple[str | None, Any, list[str]]:
        if args and self.get_command(ctx, args[0]) is None and not ctx.resilient_parsing:
            flag = _flag_given_a_value(self, ctx, ctx.meta.get(_ARGS_KEY, []), args[0])
            if flag is not None:  # gssf --debug true train: the parser took "true" for the command
                raise click_errors.UsageError(_flag_message(flag), ctx)
        return super().resolve_command(ctx, args)

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        argv = [str(arg) for arg in (sys.argv[1:] if args is None else args)]
        as_json = _wants_json(argv)
        try:
            code = super().main(argv, prog_name, complete_var, False, windows_expand_args, **extra)
        except click_errors.NoArgsIsHelpError as exc:
            if exc.message.strip():  # plain (non-rich) help; rich help prints itself as it is built
                print(exc.message)
            code = exc.exit_code
        except click_errors.ClickException as exc:
            code = report(_usage_failure(exc), as_json)
        except typer.Abort:
            code = report(Failure("interrupted", "aborted", 1), as_json)
        except Exception as exc:  # an error outside guarded(): still one line, unless --debug asks for more
            if "--debug" in argv or os.environ.get("GSSF_DEBUG") == "1":
                raise
            code = report(internal_failure(exc), as_json)
        sys.exit(code if isinstance(code, int) else 0)


def _wants_json(argv: Sequence[str]) -> bool:
    """Whether the command line asks for ``--json`` (before any ``--``): known even when parsing failed."""
    given = argv[: list(argv).index("--")] if "--" in argv else argv
    return "--json" in given


def _usage_failure(exc: click_errors.ClickException) -> Failure:
    """A click error as one line: its message, reworded where click's says too little, and where to look."""
    ctx = getattr(exc, "ctx", None)
    message = _bad_value(exc) or _misplaced_option(exc) or _option_usage(exc) or exc.format_message()
    message = message.rstrip(".")
    if message[:1].isupper() and message[1:2].islower():
        message = message[0].lower() + message[1:]
    hint = f" (see {ctx.command_path} --help)" if ctx is not None else " (see gssf --help)"
    kind = "usage" if isinstance(exc, click_errors.UsageError) else "input"
    return Failure(kind, message, exc.exit_code, hint)


def _bad_value(exc: click_errors.ClickException) -> str | None:
    """``--epochs abc`` → ``--epochs: expected an integer, got 'abc'`` (Typer's text is pydantic's)."""
    param = getattr(exc, "param", None)
    if not isinstance(exc, click_errors.BadParameter) or not isinstance(param, TyperOption):
        return None
    expected = {int: "an integer", float: "a number"}.get(without_none(param.type_descriptor.annotation))
    errors = getattr(exc.__cause__, "errors", None)
    if expected is None or not callable(errors):
        return None
    try:
        value = errors()[0]["input"]
    except (IndexError, KeyError, TypeError):
        return None
    return f"{param.opts[0]}: expected {expected}, got {value!r}"


def _misplaced_option(exc: click_errors.ClickException) -> str | None:
    """An unknown option that is a global option given after the command, or a command's option before it."""
    ctx = getattr(exc, "ctx", None)
    if not isinstance(exc, click_errors.NoSuchOption) or ctx is None:
        return None
    name = exc.option_name
    root = ctx.find_root()
    if ctx.parent is not None and name in _option_names(root.command):
        return f"{name} is a global option: put it before the command ({root.command_path} {name} {ctx.info_name} ...)"
    commands = getattr(ctx.command, "commands", {})
    if any(name in _option_names(command) for command in commands.values()):
        given = next((token for token in ctx.meta.get(_ARGS_KEY, []) if token in commands), "COMMAND")
        return f"{name} is an option of the command: put it after the command ({ctx.command_path} {given} {name})"
    return None


def _option_names(command: Any) -> set[str]:
    return {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}


def _option_usage(exc: click_errors.ClickException) -> str | None:
    """``--json=true`` (click: "does not take a value") is a flag given a value; ``--epochs`` at the end of the
    line (click: "requires an argument") is an option missing its value."""
    if isinstance(exc, click_errors.BadOptionUsage):
        if "does not take a value" in exc.message:
            return _flag_message(exc.option_name)
        if "requires an argument" in exc.message:
            return f"{exc.option_name} needs a value"
    return None


def with_default(help_text: str, shown: str | None) -> str:
    """Help text with its default, styled like Typer's own ``[default: ...]``."""
    return help_text if shown is None else f"{help_text} [dim]\\[default: {shown}][/dim]"


@dataclass(frozen=True)
class Failure:
    """One error as the user sees it: ``kind`` (usage, input, check_failed, interrupted, internal), the one-line
    ``message``, the exit code, and a ``hint`` for people only (where to look)."""

    kind: str
    message: str
    exit_code: int
    hint: str = ""


_LABELS = {
    "usage": "error: ",
    "input": "error: ",
    "check_failed": "check failed: ",
    "disk_full": "disk full: ",
    "tracking_server": "tracking server: ",
    "internal": "internal error: ",
}


def report(failure: Failure, as_json: bool) -> int:
    """Print ``failure`` as one line on stderr and, with ``--json``, as one JSON object on stdout (the stream a
    script parses); return its exit code."""
    line = one_line(failure.message)
    print(f"gssf: {_LABELS.get(failure.kind, '')}{line}{failure.hint}", file=sys.stderr)
    if as_json:
        print(json.dumps({"error": line, "kind": failure.kind, "exit_code": failure.exit_code}))
    return failure.exit_code


def one_line(message: str) -> str:
    return " ".join(str(message).split("\n")[0].split())


def internal_failure(exc: BaseException) -> Failure:
    return Failure("internal", f"{type(exc).__name__}: {exc}", 1, " (re-run with --debug for the traceback)")


# ---------------------------------------------------------------------------------------------------------
# Flags generated from the config dataclasses


@dataclass(frozen=True)
class Flag:
    """One config field on the command line: its Typer annotation, how its value becomes a config value, and its
    spelling (``--mlp/--no-mlp``)."""

    field: str
    annotation: Any
    to_config: Callable[[Any], Any]
    decls: str

    def spelled(self, value: Any) -> str:
        """The flag as given: the side of an on/off flag that ``value`` says."""
        sides = self.decls.split("/")
        return sides[1] if value is False and len(sides) > 1 else sides[0]


# Metavars that say more than the type, by spelling (a run reads RUN, as in --resume RUN).
_FLAG_METAVARS = {
    "--param": "NAME[=SPEC]",
    "--base": "KEY=VALUE",
    "--run": "RUN",
    "--head": "RUN",
    "--encoder-run": "RUN",
    "--name": "LABEL=RUNS",
}


def config_flags(cls: type) -> dict[str, Flag]:
    """The flags of every field of config ``cls`` except the ``file_only`` ones, keyed by field name."""
    hints = typing.get_type_hints(cls)
    return {
        field.name: _flag(field, hints[field.name])
        for field in dataclasses.fields(cls)
        if not field.metadata.get("file_only")
    }


def _flag(field: dataclasses.Field[Any], hint: Any) -> Flag:
    """A field's flag. Choices (``Literal``) are plain strings so that the config's own check reports them; the
    help shows them as the metavar ``[a|b|c]``. Scalars read as click's INTEGER, FLOAT, TEXT, PATH."""
    name = field.name.replace("_", "-")
    declared = field.metadata.get("flag")
    decls = declared or f"--{name}"
    to_config: Callable[[Any], Any] = _unchanged
    metavar: str | None = None
    hint = without_none(hint)
    if hint is bool:
        decls = declared or f"--{name}/--no-{name}"
        cli_type: Any = bool
    elif get_origin(hint) is Literal:
        cli_type = str
        metavar = "[" + "|".join(map(str, get_args(hint))) + "]"
    elif hint in (int, float, str, Path):
        cli_type = hint
    elif hint == tuple[int, ...]:
        cli_type = str
        metavar = "INT,INT,..."
        to_config = functools.partial(parse_int_list, option=decls)
    elif hint == tuple[str, ...]:
        cli_type = list[str]
        metavar = "TEXT"
        to_config = _repeated
    else:
        raise TypeError(f"{field.name}: no command-line form for {hint!r}; add one here or declare it file_only")
    if hint is not bool:
        metavar = _FLAG_METAVARS.get(decls, metavar)
    option = typer.Option(decls, metavar=metavar, help=_help(field, decls))
    return Flag(field.name, Annotated[cli_type | None, option], to_config, decls)


def without_none(hint: Any) -> Any:
    """``T | None`` → ``T``: on the command line None already means "not given"."""
    if get_origin(hint) in (typing.Union, types.UnionType):
        options = [option for option in get_args(hint) if option is not type(None)]
        if len(options) == 1:
            return options[0]
    return hint


def _unchanged(value: Any) -> Any:
    return value


def _repeated(values: list[str]) -> tuple[str, ...] | None:
    """A repeatable option given zero times counts as not given."""
    return tuple(values) or None


def _help(field: dataclasses.Field[Any], decls: str) -> str:
    """The field's help and its default (the flag's own default is None), or ``[required]`` for a field without
    one (given by the flag or in the ``--config`` file). A help that introduces the choices (``Metric head:``)
    ends with a full stop instead: the metavar lists them."""
    help_text: str = field.metadata["help"]
    if help_text.endswith(":"):
        help_text = help_text[:-1] + "."
    if field.default is dataclasses.MISSING:
        return f"{help_text} {_REQUIRED}"
    return with_default(help_text, shown_default(field.default, decls))


_REQUIRED = "[dim red]\\[required][/dim red]"
"""Typer's mark of a required parameter, for a config field that has no default: its flag cannot be required (the
value may come from the ``--config`` file)."""


def shown_default(default: Any, decls: str) -> str | None:
    """A default as it would be typed: ``1,5,10`` for a list, the active side's name for an on/off flag."""
    if default is dataclasses.MISSING or default is None or default == ():
        return None
    if isinstance(default, bool):
        sides = decls.split("/")
        if len(sides) == 1:
            return None
        return sides[0 if default else 1].lstrip("-")
    if isinstance(default, tuple):
        return ",".join(map(str, default))
    return str(default)


@dataclass(frozen=True)
class Settings:
    """The generated flags of one command as given (None: not given), keyed by config field."""

    given: dict[str, Any]
    flags: dict[str, Flag]

    def values(self) -> dict[str, Any]:
        """The given flags as config values (``--k 1,5`` → ``(1, 5)``); raises UserInputError, so call it guarded."""
        return {
            name: None if value is None else self.flags[name].to_config(value) for name, value in self.given.items()
        }

    def given_flags(self) -> list[str]:
        """The flags given on the command line, as spelled (``--epochs``, ``--no-mlp``)."""
        return [self.flags[name].spelled(value) for name, value in self.given.items() if value not in (None, [], ())]


def guarded(ctx: typer.Context, work: Callable[[], T]) -> T:
    """Run ``work`` turning known failures into one line on stderr (and a JSON object on stdout with
    ``--json``) and the contract's exit codes; ``--debug`` lets them through with their traceback."""
    debug = bool(getattr(ctx.obj, "debug", False))
    try:
        return work()
    except UserInputError as exc:
        if debug:
            raise
        failure = Failure("input", str(exc), 2)
    except DiskFullError as exc:
        if debug:
            raise
        then = "" if "continue it with" in str(exc) else "; free space there, then run the command again"
        failure = Failure("disk_full", f"{exc}{then}", 1)
    except TrackingServerLostError as exc:
        if debug:
            raise
        failure = Failure("tracking_server", str(exc), 1)
    except CheckFailedError as exc:
        if debug:
            raise
        failure = Failure("check_failed", str(exc), 1)
    except KeyboardInterrupt as interrupt:
        failure = Failure(
            "interrupted", str(interrupt) if isinstance(interrupt, RunInterrupted) else "interrupted", 130
        )
    except ModuleNotFoundError as exc:
        if debug:
            raise
        failure = (
            Failure("input", f"{ctx.info_name} needs {exc.name}, which this install lacks: {install_hint('all')}", 2)
            if (exc.name or "").split(".")[0] in FULL_INSTALL_ONLY
            else internal_failure(exc)
        )
    except Exception as exc:
        if debug:
            raise
        failure = (
            _disk_full_failure(exc, getattr(ctx.obj, "tracking_uri", None))
            or _lost_server_failure(exc)
            or internal_failure(exc)
        )
    raise typer.Exit(report(failure, bool(ctx.params.get("json_output"))))


def _disk_full_failure(exc: BaseException, tracking_uri: str | None) -> Failure | None:
    """A full filesystem met where no library write named it (:func:`gssf_cli.core.files.writing`): SQLite's
    store above all, which rolls the failed transaction back, so the store stays as it was."""
    from gssf_cli.core.files import disk_full_line, is_disk_full
    from gssf_cli.tracking.store import resolve_tracking_uri, sqlite_path

    if not is_disk_full(exc):
        return None
    store = sqlite_path(resolve_tracking_uri(tracking_uri))
    chain = list(error_chain(exc))
    found = next((e for e in chain if isinstance(e, OSError) and e.filename), None)
    if store is not None and any("database or disk is full" in str(e).lower() for e in chain):
        line = disk_full_line(store, "the tracking store kept what it held before (SQLite rolled the write back)")
    elif isinstance(found, OSError):
        line = disk_full_line(Path(str(found.filename)), first_line(found))
    else:
        line = f"no space left on a filesystem gssf writes to: {first_line(exc)}"
    return Failure("disk_full", f"{line}; free space there, then run the command again", 1)


def _lost_server_failure(exc: BaseException) -> Failure | None:
    """The tracking server stopped answering where no stage said what to continue (:func:`lost_server`)."""
    from gssf_cli.tracking.store import lost_server

    if (lost := lost_server(exc)) is None:
        return None
    return Failure("tracking_server", f"{lost[0]} stopped answering ({lost[1]}); run the command again once it does", 1)


def install_hint(extra: str) -> str:
    """The pip command that adds ``extra`` to this very install. gssf is installed from a checkout (it is not on a
    package index), and pip records where from (``direct_url.json``): the hint names that folder, with ``-e`` for
    an editable install."""
    import importlib.metadata
    import urllib.parse

    # The installed one records it; a checkout's own gssf.egg-info, found first from inside it, does not.
    recorded = [d.read_text("direct_url.json") for d in importlib.metadata.distributions(name="gssf")]
    source = json.loads(next((text for text in recorded if text), "{}"))
    url = str(source.get("url", ""))
    if not url.startswith("file://"):
        return f'pip install -e ".[{extra}]" in your gssf checkout'
    editable = "-e " if source.get("dir_info", {}).get("editable") else ""
    return f'pip install {editable}"{urllib.parse.unquote(url.removeprefix("file://"))}[{extra}]"'
