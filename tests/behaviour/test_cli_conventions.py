"""Command-line conventions: honest help (readable metavars, every default, pipeline order), usage errors in one
line with exit 2, ``--json`` errors as one JSON object on stdout, and the wiring of progress and ``tune --resume``.

Everything here stops before any real work: stages are replaced by stubs, so no dataset, run or Ray is needed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import Result

from gssf_cli.cli import console, tables
from gssf_cli.cli.options import shown_default
from gssf_cli.core.errors import CheckFailedError, UserInputError
from gssf_cli.stages.steps import CONFIGS
from tests.unit.cli.test_options import help_rows

Gssf = Callable[..., Result]
COMMANDS = ("prepare", "train", "evaluate", "tune", "export", "run")
TYPER_TYPES = re.compile(r"<(bool|str|int|float|path|list|tuple)\b")


# ---------------------------------------------------------------------------------------------------------
# Help


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_has_readable_metavars_and_every_default(gssf: Gssf, command: str | None) -> None:
    result = gssf(*([command] if command else []), "--help")
    assert result.exit_code == 0, result.stderr
    assert not TYPER_TYPES.search(result.stdout), TYPER_TYPES.findall(result.stdout)
    rows = help_rows(result.stdout)
    for flag in ("--help", "--json", "--debug", "--version", "--force", "--dry-run", "--onnx"):
        if flag in rows:  # a flag takes no value: no metavar between its name and its help
            token = rows[flag].split()[1]
            assert not token.isupper() and not token.startswith(("<", "[")), rows[flag]
    if command in CONFIGS:
        for field in dataclasses.fields(CONFIGS[command]):
            if field.metadata.get("file_only"):
                continue
            name = field.name.replace("_", "-")
            decls = field.metadata.get("flag") or (f"--{name}/--no-{name}" if field.type == "bool" else f"--{name}")
            shown = shown_default(field.default, decls)
            row = rows[decls.split("/")[0]]
            assert (f"[default: {shown}]" in row) if shown is not None else ("[default" not in row), row


def test_help_metavars(gssf: Gssf) -> None:
    def rows(command: str) -> dict[str, str]:
        return help_rows(gssf(command, "--help").stdout)

    train, evaluate, tune, top = rows("train"), rows("evaluate"), rows("tune"), help_rows(gssf("--help").stdout)
    assert train["--epochs"].startswith("--epochs INTEGER ")
    assert train["--lr"].startswith("--lr FLOAT ")
    assert train["--data"].startswith("--data PATH ")
    assert train["--val-split"].startswith("--val-split TEXT ")
    assert train["--metric"].startswith("--metric [cosine|diag|bdiag|dense|gssf] Metric head. [default: gssf]")
    assert train["--mlp"].startswith("--mlp / --no-mlp 2-layer")
    assert train["--help"].startswith("-h, --help Show this message")
    assert train["--resume"].startswith("--resume RUN ")
    assert evaluate["--k"].startswith("--k INT,INT,... ")
    assert evaluate["--output"].startswith("--output PATH ")
    assert tune["--param"].startswith("--param NAME[=SPEC] ")
    assert tune["--base"].startswith("--base KEY=VALUE ")
    assert tune["--resume"].startswith("--resume RUN ")
    assert (
        top["--tracking-uri"].startswith("--tracking-uri URI ")
        and "[default: $MLFLOW_TRACKING_URI" in top["--tracking-uri"]
    )
    assert "[default: $MLFLOW_EXPERIMENT_NAME, else gssf" in top["--experiment"]
    assert rows("export")["--register"].startswith("--register TEXT ")
    run = gssf("run", "--help").stdout
    assert "Usage: gssf run [OPTIONS] PIPELINE.toml" in run and "{pipeline}" not in run
    assert help_rows(run)["PIPELINE.toml"].startswith("PIPELINE.toml Pipeline file")
    assert help_rows(run)["PIPELINE.toml"].endswith("[required]")
    assert train["--data"].startswith("--data PATH ") and train["--data"].endswith("[required]")


def test_commands_are_listed_in_pipeline_order(gssf: Gssf) -> None:
    listed = [name for name in help_rows(gssf("--help").stdout) if name in COMMANDS]
    assert listed == list(COMMANDS)


# ---------------------------------------------------------------------------------------------------------
# Usage errors: one line on stderr, exit 2, nothing written

USAGE_ERRORS: dict[str, tuple[list[str], str]] = {
    "unknown option": (["train", "--no-such-flag"], "no such option: --no-such-flag (see gssf train --help)"),
    "missing value": (["train", "--epochs"], "--epochs needs a value (see gssf train --help)"),
    "bad int": (["train", "--epochs", "abc"], "--epochs: expected an integer, got 'abc' (see gssf train --help)"),
    "bad float": (["evaluate", "--memory-budget-mb", "1.5"], "--memory-budget-mb: expected an integer, got '1.5'"),
    "bad number": (["export", "--atol", "tiny"], "--atol: expected a number, got 'tiny' (see gssf export --help)"),
    "extra argument": (["run", "a.toml", "b.toml"], "unexpected extra argument: b.toml (see gssf run --help)"),
    "global flag given a value": (["--debug", "true", "prepare"], "--debug is a flag; pass it without a value"),
    "flag given a value": (["train", "--mlp", "false"], "--mlp is a flag; pass it without a value"),
    "flag given =value": (["prepare", "--json=true"], "--json is a flag; pass it without a value"),
    "flag before an argument": (["run", "--force", "yes", "p.toml"], "--force is a flag; pass it without a value"),
    "no such command": (["trian"], "no such command 'trian'. Did you mean 'train'? (see gssf --help)"),
    "missing argument": (["run"], "missing argument 'PIPELINE.toml' (see gssf run --help)"),
    "global option after the command": (["train", "--debug"], "--debug is a global option: put it before"),
    "command option before the command": (["--json", "train"], "--json is an option of the command"),
}


@pytest.mark.parametrize("case", sorted(USAGE_ERRORS))
def test_usage_error_is_one_line_exit_2_and_writes_nothing(gssf: Gssf, workdir: Path, case: str) -> None:
    args, expected = USAGE_ERRORS[case]
    result = gssf(*args)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gssf: error: "), result.stderr
    assert expected in lines[0], lines[0]
    assert "Traceback" not in result.stderr and "╭" not in result.stderr
    assert list(workdir.iterdir()) == []
    if "--json" not in args:
        assert result.stdout == ""


def test_json_usage_error_is_one_json_object_on_stdout(gssf: Gssf, workdir: Path) -> None:
    result = gssf("train", "--epochs", "abc", "--json")
    assert result.exit_code == 2
    assert json.loads(result.stdout) == {
        "error": "--epochs: expected an integer, got 'abc'",
        "kind": "usage",
        "exit_code": 2,
    }
    assert len(result.stderr.splitlines()) == 1
    assert list(workdir.iterdir()) == []


def test_json_input_error_is_one_json_object_on_stdout(gssf: Gssf, workdir: Path) -> None:
    result = gssf("evaluate", "--run", "latest", "--k", "1,five", "--json")
    assert result.exit_code == 2
    assert json.loads(result.stdout) == {
        "error": "--k: expected comma-separated integers such as 1,5,10, got '1,five'",
        "kind": "input",
        "exit_code": 2,
    }
    assert result.stderr.splitlines() == [f"gssf: error: {json.loads(result.stdout)['error']}"]
    assert list(workdir.iterdir()) == []


@pytest.fixture
def fails_with(monkeypatch: pytest.MonkeyPatch) -> Callable[[BaseException], None]:
    """Make every stage command raise ``exc`` where it resolves its config."""

    def arrange(exc: BaseException) -> None:
        def resolve(*args: Any) -> None:
            raise exc

        monkeypatch.setattr("gssf_cli.cli.app.resolve", resolve)

    return arrange


@pytest.mark.parametrize(
    ("exc", "kind", "code", "line"),
    [
        (UserInputError("bad\nsecond line"), "input", 2, "gssf: error: bad"),
        (CheckFailedError("gate"), "check_failed", 1, "gssf: check failed: gate"),
        (KeyboardInterrupt(), "interrupted", 130, "gssf: interrupted"),
        (RuntimeError("boom"), "internal", 1, "gssf: internal error: RuntimeError: boom (re-run with --debug"),
    ],
)
@pytest.mark.parametrize("as_json", [False, True])
def test_errors_keep_their_exit_codes_and_are_json_with_json(
    gssf: Gssf, fails_with: Callable[[BaseException], None], exc: BaseException, kind: str, code: int, line: str,
    as_json: bool,
) -> None:  # fmt: skip
    fails_with(exc)
    result = gssf("prepare", "--dataset", "digits", "--out", "d", *(["--json"] if as_json else []))
    assert result.exit_code == code
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(line), result.stderr
    if as_json:
        error = json.loads(result.stdout)
        assert error["kind"] == kind and error["exit_code"] == code and "\n" not in error["error"]
    else:
        assert result.stdout == ""


def test_no_arguments_prints_the_help(gssf: Gssf) -> None:
    result = gssf()
    assert result.exit_code == 2 and "Commands" in result.stdout and result.stderr == ""


def test_debug_lets_an_error_through(gssf: Gssf, fails_with: Callable[[BaseException], None]) -> None:
    fails_with(RuntimeError("boom"))
    result = gssf("--debug", "prepare", "--dataset", "digits", "--out", "d")
    assert isinstance(result.exception, RuntimeError)


def test_console_script_usage_error_and_json(tmp_path: Path) -> None:
    """Through the installed ``gssf`` script: one line on stderr, exit 2, JSON on stdout with ``--json``."""
    script = Path(sys.executable).parent / "gssf"
    env = {**os.environ, "COLUMNS": "120", "NO_COLOR": "1"}
    plain = subprocess.run([script, "--debug", "true", "train"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert plain.returncode == 2 and plain.stdout == ""
    assert plain.stderr.splitlines() == [
        "gssf: error: --debug is a flag; pass it without a value (see gssf --help)"
    ]  # fmt: skip
    bad = subprocess.run(
        [script, "train", "--lr", "x", "--json"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert json.loads(bad.stdout) == {"error": "--lr: expected a number, got 'x'", "kind": "usage", "exit_code": 2}
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------
# Wiring: progress, tune --resume, export's parity failure


class _Result:
    def __init__(self, **payload: Any) -> None:
        self.payload = payload
        self.passed = payload.get("passed", True)
        self.path = payload.get("path", "")

    def to_json(self) -> dict[str, Any]:
        return dict(self.payload)


@pytest.fixture
def stub(monkeypatch: pytest.MonkeyPatch) -> Callable[..., list[tuple[Any, ...]]]:
    """Replace stage ``name`` by a module whose functions record their calls and return a result; no tracker."""
    monkeypatch.setattr("gssf_cli.cli.app.GlobalOptions.tracker", lambda self: "TRACKER")

    def install(name: str, result: _Result | None = None, **extra: Any) -> list[tuple[Any, ...]]:
        calls: list[tuple[Any, ...]] = []

        def record(fn: str) -> Callable[..., Any]:
            def call(*args: Any, **kwargs: Any) -> Any:
                calls.append((fn, args, kwargs))
                return result or _Result()

            return call

        module = types.SimpleNamespace(run=record("run"), resume=record("resume"), **extra)
        import gssf_cli.stages

        monkeypatch.setitem(sys.modules, f"gssf_cli.stages.{name}", module)
        monkeypatch.setattr(gssf_cli.stages, name, module, raising=False)
        return calls

    return install


class _Progress:
    def __init__(self, plain: bool = False) -> None:
        self.plain = plain


@pytest.mark.parametrize("as_json", [False, True])
def test_training_progress_is_plain_beside_json(
    gssf: Gssf, stub: Callable[..., list[tuple[Any, ...]]], monkeypatch: pytest.MonkeyPatch, as_json: bool
) -> None:
    monkeypatch.setattr(console, "TrainingProgress", _Progress)
    printed: list[bool] = []
    monkeypatch.setattr(tables, "print_training", lambda result, json_output: printed.append(json_output))
    calls = stub("train")
    result = gssf("train", "--data", "d", *(["--json"] if as_json else []))
    assert result.exit_code == 0, result.stderr
    (_, _, kwargs), = calls  # fmt: skip
    assert kwargs["progress"].plain is as_json and printed == [as_json]

    pipeline_calls = stub("pipeline", load_pipeline=lambda path: types.SimpleNamespace(name="p"))
    monkeypatch.setattr(tables, "print_pipeline", lambda result, json_output: None)
    result = gssf("run", "p.toml", *(["--json"] if as_json else []))
    assert result.exit_code == 0, result.stderr
    (_, _, kwargs), = pipeline_calls  # fmt: skip
    assert kwargs["progress"].plain is as_json


def test_tune_always_reports_progress(gssf: Gssf, stub: Callable[..., list[tuple[Any, ...]]], monkeypatch: Any) -> None:
    monkeypatch.setattr(tables, "print_tune", lambda result, json_output: None)
    calls = stub("tune")
    assert gssf("tune", "--param", "lr=0.1,0.2", "--json").exit_code == 0
    assert calls[0][0] == "run" and calls[0][2] == {"progress": True}


def test_tune_resume(gssf: Gssf, stub: Callable[..., list[tuple[Any, ...]]], monkeypatch: pytest.MonkeyPatch) -> None:
    printed: list[dict[str, Any]] = []
    monkeypatch.setattr(tables, "print_tune", lambda result, json_output: printed.append(result))
    calls = stub("tune", _Result(run_id="t1"))
    result = gssf("tune", "--resume", "latest", "--json")
    assert result.exit_code == 0, result.stderr
    assert calls == [("resume", ("latest", "TRACKER"), {"progress": True})] and printed == [{"run_id": "t1"}]

    calls.clear()
    result = gssf("tune", "--resume", "latest", "--epochs", "3", "--param", "lr=1,2", "--values", "4")
    assert result.exit_code == 2 and calls == []
    (line,) = result.stderr.splitlines()
    assert line.startswith("gssf: error: --resume continues the tune with its own saved settings: drop ")
    assert all(flag in line for flag in ("--epochs", "--param", "--values"))


@pytest.mark.parametrize("as_json", [False, True])
def test_export_parity_failure(
    gssf: Gssf, stub: Callable[..., list[tuple[Any, ...]]], monkeypatch: pytest.MonkeyPatch, as_json: bool
) -> None:
    if not as_json:
        monkeypatch.setattr(tables, "print_export", lambda result, json_output: None)
    stub("export", _Result(passed=False, path="exports/r.failed", parity={"passed": False}))
    result = gssf("export", "--onnx", *(["--json"] if as_json else []))
    assert result.exit_code == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("gssf: check failed: ONNX Runtime outputs are outside the parity tolerance")
    assert ("see the table" in line) is not as_json
    if as_json:  # one JSON document: the result, with the parity report, saying what failed
        payload = json.loads(result.stdout)
        assert payload["parity"] == {"passed": False} and payload["kind"] == "check_failed"
        assert payload["exit_code"] == 1 and "see the table" not in payload["error"]
