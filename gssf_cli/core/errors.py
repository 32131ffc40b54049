"""The one exception type users see as a clean, one-line error (exit code 2).

Library code raises :class:`UserInputError` for anything the user can fix (a wrong path, a malformed file,
an invalid setting). The CLI prints its message on one line and exits 2; any other exception is a bug and
shows a traceback only with ``--debug``.
"""

from __future__ import annotations

from collections.abc import Iterator


class UserInputError(ValueError):
    """Bad usage or bad input: the message names the problem and, where possible, the fix."""


class DivergedError(UserInputError):
    """Training diverged (a NaN or Inf loss, or a model whose embeddings are): the settings, not the data, are at
    fault, so it is a one-line error (exit 2) that names the epoch and the setting to lower. ``detail``: what was
    found, for a caller that knows the epoch to say it again."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail or message


class CheckFailedError(RuntimeError):
    """The work ran but failed its own check (e.g. a parity gate): exit code 1."""


class WorkerLostError(CheckFailedError):
    """A data-parallel training lost a worker (its process or node died, or stopped answering health checks): not
    a bug, and not the user's input. One line (exit 1) that says so and, once the run is known, how to continue it
    from its last checkpoint."""


class DiskFullError(CheckFailedError):
    """A write found its filesystem full: neither a bug nor the user's input, and nothing already written is lost
    (every write goes to a temporary name first). One line (exit 1) that names the filesystem and what to run
    once space is freed."""


class TrackingServerLostError(CheckFailedError):
    """The tracking server stopped answering (MLflow gave up on a request within its HTTP settings): exit 1, one
    line that names the server and, for a training, how to continue the run once it answers."""


RESUME_COMMANDS = {"train": "gssf train --resume {run_id}", "tune": "gssf tune --resume {run_id}"}
"""The command that continues an interrupted run of each stage that can continue one."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM ended a tracked run (KILLED): which run, and the command that continues it, so the one line
    a person sees tells them how to get back."""

    def __init__(self, run_id: str, stage: str) -> None:
        super().__init__(run_id)
        self.run_id = run_id
        self.resume = RESUME_COMMANDS[stage].format(run_id=run_id) if stage in RESUME_COMMANDS else None

    def __str__(self) -> str:
        then = f"; continue it with: {self.resume}" if self.resume else ""
        return f"interrupted: run {self.run_id} ended KILLED{then}"


def error_chain(error: BaseException) -> Iterator[BaseException]:
    """``error`` and each error it was raised from or during (``__cause__``, else ``__context__``), once each: where
    a library's wrapper (MLflow, SQLAlchemy, Ray) hides the error that says what happened."""
    seen: set[int] = set()
    found: BaseException | None = error
    while found is not None and id(found) not in seen:
        seen.add(id(found))
        yield found
        found = found.__cause__ or found.__context__


def first_line(error: BaseException | str) -> str:
    """The first non-blank line of an error (or of a text), for one-line messages; an exception whose message is
    empty is named by its type, so a message is never blank."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if lines:
        return lines[0]
    return "" if isinstance(error, str) else type(error).__name__
