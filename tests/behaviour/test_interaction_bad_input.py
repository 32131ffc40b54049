"""Bad input around the interaction-based family (``--interaction``, its SCAN settings, ``--shortlist``, and what an
interaction run cannot do) exits 2 with one readable line and leaves nothing behind: no file, no folder, no
MLflow run — as :mod:`tests.behaviour.test_bad_input` checks for every other command.

Cases that need a dataset or a trained run copy a template built once per module: a tiny synthetic dataset, the
digits dataset (label-based), a one-epoch ``scan-t2i`` run and a one-epoch embedding run in a SQLite store.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner, Result

from gssf_cli.cli.app import app
from tests.conftest import tiny_synthetic_args

Gssf = Callable[..., Result]
DATA, DIGITS = "data/syn", "data/digits"
SMALL = ["--epochs", "1", "--embed-dim", "16", "--block-size", "4", "--word-dim", "8", "--batch-size", "16",
         "--device", "cpu", "--threads", "1"]  # fmt: skip
TRAIN = ["train", "--data", DATA, *SMALL]
ENV = {"COLUMNS": "120", "NO_COLOR": "1"}


@dataclass(frozen=True)
class Template:
    """A working directory to copy: ``data/syn``, ``data/digits``, the store, and the runs' folders."""

    folder: Path
    interaction_run: str
    interaction_name: str
    embedding_run: str
    embedding_name: str


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Template]:
    folder = tmp_path_factory.mktemp("interaction-bad-input-template")
    runner = CliRunner()
    threads = torch.get_num_threads()

    def ok(*args: str) -> dict[str, str]:
        result = runner.invoke(app, [*args, "--json"], env=ENV)
        assert result.exit_code == 0, (result.stdout, result.stderr)
        return json.loads(result.stdout)

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
            patch.delenv(name, raising=False)
        ok(*tiny_synthetic_args(DATA))
        ok("prepare", "--dataset", "digits", "--out", DIGITS)
        scan = ok(*TRAIN, "--interaction", "scan-t2i")["run_id"]
        embedding = ok(*TRAIN)["run_id"]
        from gssf_cli.tracking.adapter import Tracker

        client = Tracker().client
        names = {run_id: client.get_run(run_id).info.run_name for run_id in (scan, embedding)}
    torch.set_num_threads(threads)
    yield Template(folder, scan, names[scan], embedding, names[embedding])


Setup = Callable[[Path, Template], list[str]]


def _train_with(*extra: str, data: str = DATA) -> Setup:
    return lambda w, t: ["train", "--data", data, *SMALL, *extra]


def _evaluate_with(*extra: str, run: str = "interaction") -> Setup:
    def setup(w: Path, t: Template) -> list[str]:
        return ["evaluate", "--run", getattr(t, f"{run}_run"), *extra]

    return setup


def _head_of_interaction_run(w: Path, t: Template) -> list[str]:
    rng = np.random.default_rng(0)
    images = rng.normal(size=(10, 16)).astype(np.float32)
    np.savez(w / "e.npz", images=images, texts=np.repeat(images, 5, axis=0))
    return ["evaluate", "--embeddings", "e.npz", "--head", t.interaction_run]


CASES: dict[str, tuple[Setup, str]] = {
    "train: --pooling with an interaction": (
        _train_with("--interaction", "scan-t2i", "--pooling", "attention"),
        "--pooling attention pools the towers' tokens into embeddings, and --interaction scan-t2i scores the tokens "
        "themselves: drop --pooling",
    ),
    "train: --gssf-at with maxsim": (
        _train_with("--interaction", "maxsim", "--gssf-at", "attention"),
        "--gssf-at applies to SCAN (--interaction scan-t2i or scan-i2t), and --interaction maxsim scores every "
        "token pair with the metric: drop --gssf-at",
    ),
    "train: --aggregate without an interaction": (
        _train_with("--interaction", "none", "--aggregate", "mean"),
        "--aggregate applies to SCAN (--interaction scan-t2i or scan-i2t), and --interaction none has no tokens: "
        "drop --aggregate",
    ),
    "train: scan on a label-based dataset": (
        _train_with("--interaction", "scan-t2i", data=DIGITS),
        f"--interaction scan-t2i aligns image regions with caption words, and {DIGITS} is label-based",
    ),
    "train: scan with identity encoders": (
        _train_with("--interaction", "scan-t2i", "--encoder", "identity"),
        "--interaction scan-t2i scores the towers' token outputs, and --encoder identity keeps no tokens",
    ),
    "evaluate: shortlist 0": (_evaluate_with("--shortlist", "0"), "evaluate.shortlist: must be at least 1"),
    "evaluate: shortlist of an embedding run": (
        _evaluate_with("--shortlist", "5", run="embedding"),
        "--shortlist re-scores with an interaction, and run {embedding_name} scores pooled embeddings "
        "(--interaction none), exactly already: drop --shortlist",
    ),
    "evaluate: --head of an interaction run": (
        _head_of_interaction_run,
        "--head scores embeddings with a run's metric head, and run {interaction_name} scores token sets "
        "(--interaction scan-t2i): evaluate it with --run",
    ),
}


def _snapshot(folder: Path) -> set[str]:
    """Every path below ``folder`` except the tracking store (``mlflow.db*``, ``mlruns``)."""
    return {
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if not p.name.startswith("mlflow.db") and p.relative_to(folder).parts[0] != "mlruns"
    }


def _runs_in_store(folder: Path) -> int:
    with contextlib.closing(sqlite3.connect(folder / "mlflow.db")) as db:
        count: int = db.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    return count


@pytest.mark.parametrize(
    ("case", "as_json"), [(case, index % 2 == 1) for index, case in enumerate(sorted(CASES))]
)  # each case once, half of them with --json
def test_bad_input_exits_2_with_one_line_and_no_leftovers(
    gssf: Gssf, workdir: Path, template: Template, case: str, as_json: bool
) -> None:
    setup, expected = CASES[case]
    shutil.copytree(template.folder, workdir, dirs_exist_ok=True)
    args = setup(workdir, template)
    expected = expected.format(**template.__dict__)
    before, runs_before = _snapshot(workdir), _runs_in_store(workdir)
    assert runs_before >= 4, "the template's prepare and train runs"
    result = gssf(*args, *(["--json"] if as_json else []))
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gssf: error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    if as_json:
        error = json.loads(result.stdout)
        assert error["kind"] == "input" and error["exit_code"] == 2 and expected in error["error"]
    else:
        assert result.stdout == ""
    assert _snapshot(workdir) - before == set(), "nothing new in the working directory"
    assert _runs_in_store(workdir) == runs_before, "no new MLflow run"
