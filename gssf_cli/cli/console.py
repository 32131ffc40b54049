"""The terminal: the two consoles (stdout for results, stderr for news), progress bars and the line per epoch
that stays, and `--json` output. The tables each command prints live in :mod:`gssf_cli.cli.tables`."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from rich.console import Console

if TYPE_CHECKING:
    from gssf_cli.training.loop import EpochSummary


class _ConsoleNow:
    """A rich Console made at each use. Why: a Console built once at import keeps the width ``COLUMNS`` had then,
    so a table printed later (another command in the same process, a test runner that sets ``COLUMNS``) wraps at
    a stale width; made now, it reads the width and the stream of the moment."""

    def __init__(self, stderr: bool) -> None:
        self.stderr = stderr

    def console(self) -> Console:
        """The Console of the moment itself, for work that needs one throughout (measuring, then printing)."""
        return Console(stderr=self.stderr)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.console(), name)


stdout = _ConsoleNow(stderr=False)
stderr = _ConsoleNow(stderr=True)


class TrainingProgress:
    """Training as a person watches it, on stderr: while an epoch trains, a bar (batches, loss, samples/s); while
    it validates, a bar of the validation's steps (encode the split, score it); when it ends, one line that stays
    (the bars are transient, so the lines pile up above the next epoch's bar)::

        epoch  3/20  loss 0.4123  val rsum 312.40 (best)  lr 5e-4  12.3 s

    Epochs are numbered from 1; ``(best)`` marks the epoch that is now the best (its weights are in ``best/``);
    the seconds are the epoch's wall time (training, validation, checkpoint). ``plain``: the lines alone, with no
    bar and no colour or cursor codes, written straight to stderr (for ``--json``, whose stdout is the JSON, and
    for logs). ``console``: where the bars and lines go instead of stderr. Satisfies
    :class:`gssf_cli.training.loop.Progress`."""

    def __init__(self, plain: bool = False, console: Console | None = None) -> None:
        self.plain = plain
        self.console = console if console is not None else Console(stderr=True)

    def _console(self) -> Console:
        return self.console

    def _bars(self) -> bool:
        """Bars only where they can be redrawn in place: in a terminal (a log file would get blank lines)."""
        return not self.plain and self._console().is_terminal

    @contextlib.contextmanager
    def epoch(self, label: str, batches: int) -> Iterator[Callable[[float, float], None]]:
        if not self._bars():
            yield lambda loss, rate: None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = (
            TextColumn(label),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  {task.fields[rate]:.0f} samples/s"),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=self._console(), transient=True) as bar:
            task = bar.add_task("train", total=batches, loss=0.0, rate=0.0)
            yield lambda loss, rate: bar.update(task, advance=1, loss=loss, rate=rate)

    @contextlib.contextmanager
    def validation(self, label: str, steps: int) -> Iterator[Callable[[str], None]]:
        if not self._bars():
            yield lambda what: None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[what]}"))
        with Progress(*columns, TimeElapsedColumn(), console=self._console(), transient=True) as bar:
            task = bar.add_task("validate", total=steps, what="")
            started = 0

            def step(what: str) -> None:
                nonlocal started
                bar.update(task, completed=started, what=what)
                started += 1

            yield step

    def epoch_done(self, summary: EpochSummary) -> None:
        line = epoch_line(summary)
        if self.plain:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
        else:
            self._console().print(line, highlight=False, markup=False, soft_wrap=True)


def epoch_line(summary: EpochSummary) -> str:
    """``epoch  3/20  loss 0.4123  val rsum 312.40 (best)  lr 5e-4  12.3 s``: the line kept for each epoch
    (without a validation split the loss picks the best epoch, and ``(best)`` follows the loss)."""
    metrics, name = summary.metrics, summary.validation_metric
    best = " (best)" if summary.improved else ""
    parts = [f"epoch {summary.epoch:>{len(str(summary.epochs))}}/{summary.epochs}", f"loss {metrics['loss']:.4f}"]
    if f"val_{name}" in metrics:
        parts.append(f"val {name} {_metric_value(name, metrics[f'val_{name}'])}{best}")
    else:
        parts[-1] += best
    if "lr" in metrics:
        parts.append(f"lr {_short_number(metrics['lr'])}")
    parts.append(f"{summary.seconds:.1f} s")
    return "  ".join(parts)


def _metric_value(name: str, value: float) -> str:
    """Fractions (MAP@R, P@1) with 4 decimals, percentages and sums of them (rSum) with 2."""
    from gssf_cli.core import metrics

    return f"{value:.4f}" if metrics.get(name).unit == "fraction" else f"{value:.2f}"


def _short_number(value: float) -> str:
    """A learning rate as people write it: ``5e-4``, ``2.5e-3``, ``0``."""
    if value == 0:
        return "0"
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def print_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")


@contextlib.contextmanager
def rows_progress(label: str, source: Any, plain: bool) -> Iterator[Callable[[int], None]]:
    """A bar of rows done on stderr while a gallery is embedded (its total read from the ``.npy`` header, without
    loading it); nothing where it cannot be redrawn (``--json``, a log file)."""
    console = Console(stderr=True)
    total = _rows_in(source)
    if plain or not console.is_terminal or total is None:
        yield lambda done: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("{task.speed} rows/s"))
    with Progress(*columns, TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda done: bar.advance(task, done)


def _rows_in(source: Any) -> int | None:
    import numpy as np

    try:
        return int(np.load(source, mmap_mode="r", allow_pickle=False).shape[0])
    except Exception:
        return None


def note(line: str) -> None:
    """One line of news on stderr (``--json`` keeps stdout clean)."""
    stderr.print(f"gssf: {line}", highlight=False, markup=False)
