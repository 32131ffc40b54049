"""gssf_cli.cli.options, the command-line machinery every command shares: click errors as exit 2, one flag per
config field (or file_only), help rows that show the config defaults, and flags that arrive as config values
(absent ones as None)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import typer.main
from typer.testing import Result

from gssf_cli.cli.app import app
from gssf_cli.core.errors import UserInputError
from gssf_cli.core.stage_configs import EvaluateConfig, ExportConfig, PrepareConfig, TrainConfig, TuneConfig


def test_usage_error_exits_2(gssf: Callable[..., Result]) -> None:
    assert gssf("prepare", "--no-such-flag").exit_code == 2
    assert gssf("no-such-command").exit_code == 2


STAGE_CONFIGS: dict[str, type] = {
    "prepare": PrepareConfig,
    "evaluate": EvaluateConfig,
    "train": TrainConfig,
    "tune": TuneConfig,
    "export": ExportConfig,
}


@pytest.mark.parametrize("command", sorted(STAGE_CONFIGS))
def test_every_config_field_has_a_flag_or_is_file_only(command: str) -> None:
    """Each setting is reachable from the command line under its documented spelling, or says why not."""
    group = typer.main.get_command(app)
    assert isinstance(group, typer.core.TyperGroup)
    params = {param.name: param for param in group.commands[command].params}
    for field in dataclasses.fields(STAGE_CONFIGS[command]):
        if field.metadata.get("file_only"):
            assert field.name not in params, f"{command}: {field.name} is file_only but has a flag"
            continue
        assert field.name in params, f"{command}: no flag for {field.name}"
        spelled = field.metadata.get("flag") or f"--{field.name.replace('_', '-')}"
        opts = {*params[field.name].opts, *params[field.name].secondary_opts}
        assert set(spelled.split("/")) <= opts, (command, field.name, opts)


def test_help_shows_the_config_defaults(gssf: Callable[..., Result]) -> None:
    def row_of(command: str, flag: str) -> str:
        result = gssf(command, "--help")
        assert result.exit_code == 0
        return help_rows(result.stdout)[flag]

    assert "[default: 1024]" in row_of("train", "--embed-dim")
    assert "[default: no-mlp]" in row_of("train", "--mlp")
    assert "[default: 1,5,10]" in row_of("evaluate", "--k")
    assert "[default" not in row_of("train", "--data")


def help_rows(text: str) -> dict[str, str]:
    """Each row of the help's panels, its wrapped lines joined, keyed by each of its names (``-h`` and ``--help``
    for ``-h, --help``; ``--mlp`` for ``--mlp / --no-mlp``); a row starts at the panel's edge, its continuation
    lines in the help column."""
    rows: dict[str, str] = {}
    current: list[str] = []
    for line in text.splitlines():
        body = line[1:].rstrip("│ ")
        cells = body.split()
        if not line.startswith("│") or not cells:
            current = []
        elif len(body) - len(body.lstrip()) <= 6:
            names = [cells[0].rstrip(",")]
            if cells[0].endswith(",") and len(cells) > 1:
                names.append(cells[1])
            current = names
            for name in names:
                rows[name] = " ".join(cells)
        else:
            for name in current:
                rows[name] += " " + " ".join(cells)
    return rows


@pytest.fixture
def resolved(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Stops every stage command at config resolution and records what it would resolve."""
    seen: dict[str, Any] = {}

    def fake_resolve(cls: type, section: str, file_values: dict[str, Any], cli_values: dict[str, Any]) -> None:
        seen.update(section=section, file=file_values, cli=cli_values)
        raise UserInputError("stopped before the stage")

    monkeypatch.setattr("gssf_cli.cli.app.resolve", fake_resolve)
    return seen


def test_flags_arrive_as_config_values_and_absent_ones_as_none(
    gssf: Callable[..., Result], resolved: dict[str, Any]
) -> None:
    gssf("evaluate", "--embeddings", "e.npz", "--k", "1,5", "--no-plots", "--memory-budget-mb", "9", "--metric", "x")
    assert resolved["cli"] == {
        "embeddings": Path("e.npz"), "run": None, "data": None, "protocol": None, "split": None, "ks": (1, 5),
        "metric": "x", "memory_budget_mb": 9, "full_map": None, "plots": False, "output": None, "head": None,
        "shortlist": None,
    }  # fmt: skip
    gssf("tune", "--param", "lr", "--values", "1,2", "--base", "a=1", "--base", "b=2", "--config", "t.toml")
    assert resolved["cli"]["params"] == ("lr=1,2",)
    assert resolved["cli"]["base"] == ("a=1", "b=2")
    assert resolved["cli"]["base_config"] == Path("t.toml")
    Path("p.toml").write_text("seed = 3\n")
    gssf("prepare", "--config", "p.toml")
    assert resolved["file"] == {"seed": 3}
    assert set(resolved["cli"].values()) == {None}
