"""The CLI surface (gssf_cli.cli.app): version, help, lazy imports, global options, resume. The flags generated from
the configs and the one-line usage errors are gssf_cli.cli.options, tested in test_options.py."""

from __future__ import annotations

import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import Result

from gssf_cli import __version__
from gssf_cli.core.errors import UserInputError

HEAVY = ("torch", "mlflow", "ray", "onnx", "onnxruntime", "sklearn", "matplotlib", "numpy")


def test_version(gssf: Callable[..., Result]) -> None:
    result = gssf("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"gssf {__version__}"


def test_help_lists_only_working_commands(gssf: Callable[..., Result]) -> None:
    result = gssf("--help")
    assert result.exit_code == 0
    for option in ("--tracking-uri", "--experiment", "--debug", "--version", "prepare", "train", "evaluate"):
        assert option in result.stdout


def test_help_imports_no_heavy_module() -> None:
    """``gssf --help`` and each command's help stay fast: no torch, mlflow, ray, onnx, numpy."""
    code = (
        "import sys\n"
        "from gssf_cli.cli.app import app\n"
        "for args in (['--help'], ['prepare', '--help'], ['train', '--help'], ['evaluate', '--help'], ['tune', '--help']):\n"
        "    try:\n"
        "        app(args)\n"
        "    except SystemExit:\n"
        "        pass\n"
        f"print('HEAVY:' + ' '.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "Commands" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "HEAVY:"


def test_python_dash_m_entry_point() -> None:
    out = subprocess.run([sys.executable, "-m", "gssf_cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"gssf {__version__}"


@pytest.mark.parametrize(
    ("args", "toml", "runs_dir"),
    [([], "", "runs"), (["--runs-dir", "mine"], 'runs_dir = "file"', "mine"), ([], 'runs_dir = "file"', "file")],
)
def test_resume_reads_the_saved_config_from_the_runs_dir_in_effect(
    gssf: Callable[..., Result], monkeypatch: pytest.MonkeyPatch, args: list[str], toml: str, runs_dir: str
) -> None:
    run = types.SimpleNamespace(info=types.SimpleNamespace(run_id="r1"))
    tracker = types.SimpleNamespace(get_run=lambda ref, stage: run)
    monkeypatch.setattr("gssf_cli.cli.app.GlobalOptions.tracker", lambda self: tracker)
    calls = []

    def started_config(given: Any, run_id: str, folder: Path) -> dict[str, Any]:
        assert given is tracker
        calls.append((run_id, folder))
        raise UserInputError("stopped before training")

    monkeypatch.setattr("gssf_cli.stages.train.started_config", started_config)
    Path("t.toml").write_text(toml)
    result = gssf("train", "--resume", "latest", "--config", "t.toml", *args)
    assert result.exit_code == 2 and "stopped before training" in result.stderr
    assert calls == [("r1", Path(runs_dir))]
