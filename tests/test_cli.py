"""The CLI surface: version, help, lazy imports, global options."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

from typer.testing import Result

from gssf_cli import __version__

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
        "from gssf_cli.app import app\n"
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


def test_usage_error_exits_2(gssf: Callable[..., Result]) -> None:
    assert gssf("prepare", "--no-such-flag").exit_code == 2
    assert gssf("no-such-command").exit_code == 2
