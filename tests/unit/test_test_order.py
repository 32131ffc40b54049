"""The longest test files that ``nox`` hands out first (``tests/conftest.py``) are still there."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import LONGEST_FILES

ROOT = Path(__file__).resolve().parents[2]


def test_the_longest_files_exist_and_are_named_once() -> None:
    assert [name for name in LONGEST_FILES if not (ROOT / name).is_file()] == []
    assert len(set(LONGEST_FILES)) == len(LONGEST_FILES)
