"""The user-facing error types, and the one line an error is shown as."""

from __future__ import annotations

from gssf_cli.core.errors import CheckFailedError, UserInputError, first_line


def test_first_line_of_a_multi_line_message() -> None:
    assert first_line(ValueError("\n  \n  bad value: x  \n  Traceback (most recent call last):\n")) == "bad value: x"
    assert first_line("first\nsecond") == "first"


def test_an_empty_message_is_named_by_its_type() -> None:
    assert first_line(RuntimeError()) == "RuntimeError"
    assert first_line(OSError()) == "OSError"
    assert first_line(UserInputError(" \n ")) == "UserInputError"
    assert first_line("") == "" and first_line(" \n") == "", "a text has no type to fall back on"


def test_the_error_kinds() -> None:
    assert issubclass(UserInputError, ValueError), "library code may still catch it as a ValueError"
    assert issubclass(CheckFailedError, RuntimeError) and not issubclass(CheckFailedError, UserInputError)
