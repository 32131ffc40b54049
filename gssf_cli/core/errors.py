"""The one exception type users see as a clean, one-line error (exit code 2).

Library code raises :class:`UserInputError` for anything the user can fix (a wrong path, a malformed file,
an invalid setting). The CLI prints its message on one line and exits 2; any other exception is a bug and
shows a traceback only with ``--debug``.
"""

from __future__ import annotations


class UserInputError(ValueError):
    """Bad usage or bad input: the message names the problem and, where possible, the fix."""


class CheckFailedError(RuntimeError):
    """The work ran but failed its own check (e.g. a parity gate): exit code 1."""


def first_line(error: BaseException | str) -> str:
    """The first non-blank line of an error (or of a text), for one-line messages; an exception whose message is
    empty is named by its type, so a message is never blank."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if lines:
        return lines[0]
    return "" if isinstance(error, str) else type(error).__name__
