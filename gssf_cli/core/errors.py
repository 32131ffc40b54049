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
