"""A stop request that cannot be lost.

Ctrl-C and SIGTERM raise ``KeyboardInterrupt`` wherever Python happens to be, and one raised inside a finalizer
(an object's ``__del__``, SQLAlchemy's state cleanup) is printed as "Exception ignored" and dropped: the command
then ran to its end and exited 0, its run FINISHED instead of KILLED (seen under load in CI). So the CLI's signal
handler also records the request here, and long loops (training, between batches) ask for it.
"""

from __future__ import annotations

_requested = False


def request() -> None:
    """Record that the process was asked to stop (a signal handler calls this before it raises)."""
    global _requested
    _requested = True


def raise_if_requested() -> None:
    """Raise ``KeyboardInterrupt`` if a stop was requested: the interrupt a finalizer swallowed, raised again."""
    if _requested:
        raise KeyboardInterrupt
