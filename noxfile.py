"""Developer tasks. `nox` runs the default sessions (lint, typecheck, tests: every test, the end-to-end and cluster
ones included, in one pool of workers), as CI does.

Every session but ``bench`` uses one shared environment (``.nox/shared``): the project with its ``all,dev`` extras is
installed once (about 2 GB: torch, mlflow, ray, onnx) and reinstalled only when ``pyproject.toml`` changes,
instead of one fresh venv per session. ``bench`` gets its own (``.nox/bench``, extras ``all,dev,bench``) so
that the library it compares against (pytorch-metric-learning) never reaches the environment the tests run in. Tests run on all cores with pytest-xdist, one test file per worker (files share module-scoped fixtures
such as a trained run or a finished tune).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]

SHARED = Path(".nox") / "shared"
BENCH = Path(".nox") / "bench"
QUIET_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
    "PYTHONHASHSEED": "0",
}


def _environment(session: nox.Session, folder: Path, extras: str) -> Path:
    """``folder``'s bin folder: a venv with the project and its ``extras`` (e.g. ``"dev,bench"``) installed,
    created on first use and reinstalled when pyproject.toml or the extras changed."""
    bin_dir = folder / "bin"
    stamp = folder / ".pyproject.sha256"
    digest = hashlib.sha256(Path("pyproject.toml").read_bytes() + extras.encode()).hexdigest()
    if not (bin_dir / "python").exists():
        session.run(sys.executable, "-m", "venv", str(folder), external=True)
    if not stamp.is_file() or stamp.read_text() != digest:
        uv = shutil.which("uv")
        if uv:
            session.run(uv, "pip", "install", "--quiet", "--compile-bytecode", "--python", str(bin_dir / "python"),
                        *_pip_settings_for_uv(), "-e", f".[{extras}]", external=True)  # fmt: skip
        else:
            session.run(str(bin_dir / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        "-e", f".[{extras}]", external=True)  # fmt: skip
        stamp.write_text(digest)
    return bin_dir


PIP_TO_UV = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
             "constraint": "--constraint"}  # fmt: skip
"""The pip settings that choose which wheels install, and uv's flag for each."""


def _pip_settings_for_uv() -> list[str]:
    """pip's own configuration (files and ``PIP_*`` variables, as ``pip config list`` shows them) as uv flags, so
    that uv installs what pip would (uv reads none of pip's settings): the same indexes, local wheel folders and
    constraints, and pip's choice of the best version across all indexes. Why uv when it is there: it installs the
    environment (torch, MLflow, Ray, onnx) in about 22 s where pip takes about 90 s (``.ci/run`` installs it). It
    compiles the bytecode as pip does: where ``PYTHONDONTWRITEBYTECODE`` is set, nothing else would, and every
    process would compile torch, Ray and MLflow again (measured: imports 5.3 s instead of 2.2 s, tests twice as
    long)."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    pairs: dict[tuple[str, str], None] = {}  # ordered, each once: pip lists a setting per place it is set
    for line in listed.stdout.splitlines():
        key, _, value = line.partition("=")
        flag = PIP_TO_UV.get(key.rsplit(".", 1)[-1])
        for item in value.strip().strip("'\"").split() if flag else []:
            pairs[(flag, item)] = None
    return ["--index-strategy", "unsafe-best-match", *(part for pair in pairs for part in pair)]


def _run(
    session: nox.Session,
    tool: str,
    *args: str,
    env: dict[str, str] | None = None,
    folder: Path = SHARED,
    extras: str = "all,dev",
) -> None:
    bin_dir = _environment(session, folder, extras)
    path = f"{bin_dir.resolve()}{os.pathsep}{os.environ.get('PATH', '')}"
    session.run(str(bin_dir / tool), *args, external=True, env={**(env or {}), "PATH": path})


def _workers() -> str:
    return str(max(1, min(4, os.cpu_count() or 1)))


@nox.session(venv_backend="none")
def lint(session: nox.Session) -> None:
    """ruff check, ruff format check, and the import contracts (layers, one module per heavy dependency)."""
    _run(session, "ruff", "check", ".")
    _run(session, "ruff", "format", "--check", ".")
    _run(session, "lint-imports")


@nox.session(venv_backend="none")
def typecheck(session: nox.Session) -> None:
    """mypy over the package."""
    _run(session, "mypy")


POOL = ["--dist", "loadfile", "--no-loadscope-reorder", "--durations=15"]
"""Whole test files to each worker (files share module-scoped fixtures: a trained run, a finished tune, a cluster),
in collection order: the longest files first (``tests/conftest.py``), the short ones filling the gaps."""


@nox.session(venv_backend="none")
def tests(session: nox.Session) -> None:
    """Every test in one pool of workers: unit and integration tests (real MLflow stores; no mocks of the tracked
    systems), the installed `gssf` end to end on tiny data (the README and docs/ included), the fault tests and the
    cluster tests (see ``cluster``), which mostly wait for Ray processes to start and so fill the others' gaps. Every
    local Ray that gssf starts has a fresh temporary folder of its own, where ``ray.init`` looks for a running
    cluster, so it never joins the test cluster."""
    _run(session, "pytest", "-n", _workers(), *POOL, *session.posargs, env=QUIET_ENV)


@nox.session(venv_backend="none")
def unit(session: nox.Session) -> None:
    """The tests that run the library in this process or one `gssf` at a time (no README flow, no cluster)."""
    _run(session, "pytest", "-m", "not e2e and not cluster", "-n", _workers(), *POOL, *session.posargs, env=QUIET_ENV)


@nox.session(venv_backend="none")
def e2e(session: nox.Session) -> None:
    """The installed `gssf` command end to end on tiny data, as a user runs it, and the cluster tests."""
    _run(session, "pytest", "-m", "e2e or cluster", "-n", _workers(), *POOL, *session.posargs, env=QUIET_ENV)


@nox.session(venv_backend="none")
def faults(session: nox.Session) -> None:
    """The fault tests with their repetitions raised: ten random ``kill -9`` of a tune driver per scheduler (CI
    runs one), in this process so that each kill's line is printed, then the rest of ``tests/behaviour/faults``."""
    env = {**QUIET_ENV, "GSSF_SWEEP_KILLS": os.environ.get("GSSF_SWEEP_KILLS", "10")}
    sweeps = "tests/behaviour/faults/test_sweep_kills.py"
    _run(session, "pytest", sweeps, "-s", *session.posargs, env=env)
    _run(session, "pytest", "tests/behaviour/faults", "--deselect", sweeps, "-n", _workers(), *POOL, *session.posargs,
         env=QUIET_ENV)  # fmt: skip


@nox.session(venv_backend="none")
def cluster(session: nox.Session) -> None:
    """The cluster tests alone (``nox -s e2e`` runs them too): a real two-node Ray cluster on 127.0.0.1 (`gssf tune
    --address` across both nodes, and through `ray://`) and Ray Train workers (`gssf train --workers 2`, `gssf tune --workers-per-trial 2`). One test file per xdist worker:
    each file starts a Ray of its own (the cluster's nodes declare 1 CPU each whatever the machine has), and most
    of their time is spent waiting for Ray processes to start, so two files share the cores well."""
    _run(session, "pytest", "-m", "cluster", "-n", _workers(), *POOL, *session.posargs, env=QUIET_ENV)


@nox.session(venv_backend="none")
def experiments(session: nox.Session) -> None:
    """Train the GSSF family on the built-in datasets, then test Rebalanced VLR's claims on imbalanced copies of
    the generated captions; both tables (and the λ/τ figure) go into README.md."""
    for script in ("run_experiments.py", "run_rebalance.py"):
        _run(session, "python", f"experiments/{script}", *session.posargs, env=QUIET_ENV)


@nox.session(venv_backend="none")
def bench(session: nox.Session) -> None:
    """Benchmarks, in their own environment (with the peers they compare against): ratios measured side by
    side, absolute figures labelled with the machine."""
    env = {**QUIET_ENV, "PYTHONPATH": os.path.join(os.getcwd(), "benchmarks")}
    for script in sorted(os.listdir("benchmarks")):
        if script.startswith("bench_") and script.endswith(".py"):
            _run(session, "python", os.path.join("benchmarks", script), *session.posargs, env=env, folder=BENCH,
                 extras="all,dev,bench")  # fmt: skip
