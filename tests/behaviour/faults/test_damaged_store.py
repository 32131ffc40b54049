"""A damaged tracking store — not a SQLite file, truncated, or written by a newer MLflow — gets one line naming it
and what to do, and its bytes are left exactly as they were."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import Result

from tests.conftest import tiny_synthetic_args

Gssf = Callable[..., Result]


def _damage(store: Path, how: str) -> None:
    good = store.read_bytes()
    if how == "not sqlite":
        store.write_text("not a database at all\n" * 100)
    elif how == "truncated":
        store.write_bytes(good[: len(good) // 3])
    else:
        with sqlite3.connect(store) as db:
            db.execute("UPDATE alembic_version SET version_num = 'ffff0000aaaa'")


@pytest.mark.parametrize(
    ("how", "said"),
    [
        ("not sqlite", "cannot be read as a SQLite database (file is not a database): restore a backup"),
        ("truncated", "cannot be read as a SQLite database"),
        ("newer schema", "has schema revision ffff0000aaaa, which the installed MLflow does not know: a newer MLflow"),
    ],
)
def test_a_damaged_store_is_named_and_left_untouched(gssf: Gssf, workdir: Path, how: str, said: str) -> None:
    assert gssf(*tiny_synthetic_args("data/syn")).exit_code == 0
    store = workdir / "mlflow.db"
    _damage(store, how)
    before = store.read_bytes()
    result = gssf("train", "--data", "data/syn", "--epochs", "1")
    assert result.exit_code == 2
    [line] = result.stderr.strip().splitlines()
    assert f"tracking store {store}" in line and said in line, line
    assert store.read_bytes() == before
    assert not (workdir / "runs").exists()
