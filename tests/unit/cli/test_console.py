"""What ``gssf train`` leaves for people: one kept line per epoch on stderr, and one epoch numbering (from 1) in
the lines, the table, the JSON and MLflow."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import Result

from gssf_cli.cli.console import TrainingProgress, epoch_line
from gssf_cli.core.config import from_dict
from gssf_cli.training.loop import EpochSummary
from tests.conftest import tiny_synthetic_args

Gssf = Callable[..., Result]
SMALL = ["--metric", "bdiag", "--block-size", "4", "--embed-dim", "16", "--word-dim", "8", "--batch-size", "16"]
EPOCH_LINE = re.compile(
    r"^epoch +(\d+)/(\d+)  loss (\d+\.\d{4})  val rsum (\d+\.\d{2})( \(best\))?  lr (\S+)  (\d+\.\d) s$"
)
ANSI = re.compile(r"\x1b\[")


@pytest.fixture
def data(gssf: Gssf, workdir: Path) -> Path:
    assert gssf(*tiny_synthetic_args()).exit_code == 0
    return workdir / "data" / "syn"


def _screen(output: str) -> list[str]:
    """What a terminal shows after ``output``: a minimal emulator of what rich writes (text, ``\\r``, ``\\n``,
    cursor up ``ESC[nA``, erase line ``ESC[2K``; colours and cursor visibility change nothing on screen)."""
    rows, row, col = [""], 0, 0
    for token in re.findall(r"\x1b\[[0-9;?]*[A-Za-z]|\r|\n|[^\x1b\r\n]+", output):
        if token == "\r":
            col = 0
        elif token == "\n":
            row, col = row + 1, 0
            rows += [""] * (row + 1 - len(rows))
        elif token.endswith("A") and token.startswith("\x1b["):
            row = max(0, row - int(token[2:-1] or 1))
        elif token == "\x1b[2K":
            rows[row] = ""
        elif not token.startswith("\x1b"):
            line = rows[row].ljust(col)
            rows[row] = line[:col] + token + line[col + len(token) :]
            col += len(token)
    return [line.rstrip() for line in rows if line.strip()]


def _epoch_lines(text: str) -> list[re.Match[str]]:
    return [m for line in text.splitlines() if (m := EPOCH_LINE.match(line.strip())) is not None]


def _best_from_lines(lines: list[re.Match[str]]) -> int:
    return [int(m.group(1)) for m in lines if m.group(5)][-1]


def test_the_epoch_line_reads_as_documented() -> None:
    summary = EpochSummary(
        3, 20, {"loss": 0.41234, "lr": 5e-4, "val_rsum": 312.404, "best_rsum": 312.404}, "rsum", True, 12.34
    )
    assert epoch_line(summary) == "epoch  3/20  loss 0.4123  val rsum 312.40 (best)  lr 5e-4  12.3 s"
    labels = EpochSummary(12, 12, {"loss": 1.5, "lr": 2.5e-5, "val_map_at_r": 0.123456}, "map_at_r", False, 0.04)
    assert epoch_line(labels) == "epoch 12/12  loss 1.5000  val map_at_r 0.1235  lr 2.5e-5  0.0 s"
    no_validation = EpochSummary(1, 2, {"loss": 0.5, "lr": 0.001}, "rsum", True, 1.0)
    assert epoch_line(no_validation) == "epoch 1/2  loss 0.5000 (best)  lr 1e-3  1.0 s"


def test_a_terminal_gets_bars_and_keeps_one_line_per_epoch(gssf: Gssf, data: Path) -> None:
    """In a terminal the bars come and go; the epoch lines are plain lines printed after them, so they stay."""
    from gssf_cli.core.stage_configs import TrainConfig
    from gssf_cli.stages import train

    screen = io.StringIO()
    terminal = Console(file=screen, force_terminal=True, width=120, color_system="standard")
    config = from_dict(TrainConfig, {"data": str(data), "epochs": 3, "embed_dim": 16, "word_dim": 8, "block_size": 4,
                                     "batch_size": 16, "metric": "bdiag"}, "train")  # fmt: skip
    result = train.run(config, progress=TrainingProgress(console=terminal))
    text = screen.getvalue()
    assert "samples/s" in text and "validate on dev" in text, "the bars were drawn"
    shown = _screen(text)
    lines = _epoch_lines("\n".join(shown))
    assert len(lines) == len(shown) == 3, f"the bars are gone, the epoch lines stay: {shown}"
    assert [int(m.group(1)) for m in lines] == [1, 2, 3]
    assert _best_from_lines(lines) == result.best_epoch


def test_plain_progress_writes_the_lines_alone_on_stderr(
    data: Path, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gssf_cli.core.stage_configs import TrainConfig
    from gssf_cli.stages import train
    from gssf_cli.tracking.adapter import Tracker

    config = from_dict(TrainConfig, {"data": str(data), "epochs": 3, "embed_dim": 16, "word_dim": 8, "block_size": 4,
                                     "batch_size": 16, "metric": "bdiag"}, "train")  # fmt: skip
    capsys.readouterr()
    result = train.run(config, Tracker(), progress=TrainingProgress(plain=True))
    out, err = capsys.readouterr()
    assert out == "", "stdout is left to the JSON"
    assert not ANSI.search(err) and "\r" not in err
    lines = _epoch_lines(err)
    assert [int(m.group(1)) for m in lines] == [1, 2, 3] and len(err.splitlines()) == 3
    assert all(m.group(2) == "3" and float(m.group(7)) >= 0 for m in lines)
    assert _best_from_lines(lines) == result.best_epoch
    assert lines[0].group(5), "the first epoch is the best so far"


def test_best_epoch_is_one_number_in_lines_table_json_and_mlflow(gssf: Gssf, data: Path) -> None:
    from gssf_cli.tracking.adapter import Tracker

    shown = gssf("train", "--data", str(data), *SMALL, "--epochs", "3")
    assert shown.exit_code == 0, shown.stderr
    lines = _epoch_lines(shown.stderr)
    assert [int(m.group(1)) for m in lines] == [1, 2, 3] and len(shown.stderr.splitlines()) == 3, shown.stderr
    table_best = int(re.search(r"best epoch (\d+) ", shown.stdout).group(1))  # type: ignore[union-attr]
    run_id = re.search(r"MLflow run (\w+)", shown.stdout).group(1)  # type: ignore[union-attr]
    assert _best_from_lines(lines) == table_best

    as_json = gssf("train", "--data", str(data), *SMALL, "--epochs", "3", "--json")
    assert as_json.exit_code == 0, as_json.stderr
    out = json.loads(as_json.stdout)
    assert out["best_epoch"] == table_best, "the same (deterministic) training, the same best epoch"
    json_lines = _epoch_lines(as_json.stderr)
    assert len(json_lines) == len(as_json.stderr.splitlines()) == 3 and not ANSI.search(as_json.stderr), "plain"
    assert _best_from_lines(json_lines) == out["best_epoch"]

    client = Tracker().client
    for run in (run_id, out["run_id"]):
        history = client.get_metric_history(run, "val_rsum")
        assert [m.step for m in history] == [1, 2, 3], "steps are epoch numbers, from 1"
        best_step = max(history, key=lambda m: (m.value, -m.step)).step
        assert client.get_run(run).data.metrics["best_epoch"] == best_step == table_best
        loss_by_step = {m.step: m.value for m in client.get_metric_history(run, "loss")}
        assert {int(m.group(1)): float(m.group(3)) for m in lines} == pytest.approx(loss_by_step, abs=5e-5)
