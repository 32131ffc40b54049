"""Developer tasks. `nox` runs the default sessions (tests, lint, typecheck, e2e), as CI does."""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["lint", "typecheck", "tests", "e2e"]
nox.options.default_venv_backend = "venv"

PYTHON = "3.11"
QUIET_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
    "PYTHONHASHSEED": "0",
}


def _install(session: nox.Session) -> None:
    session.install("-e", ".[dev]")


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Unit and integration tests (real MLflow stores; no mocks of the tracked systems)."""
    _install(session)
    session.run("pytest", "-m", "not e2e", *session.posargs, env=QUIET_ENV)


@nox.session(python=PYTHON)
def e2e(session: nox.Session) -> None:
    """The installed `gssf` command end to end on tiny data, as a user runs it."""
    _install(session)
    session.run("pytest", "-m", "e2e", *session.posargs, env=QUIET_ENV)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff check and format check."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy over the package."""
    _install(session)
    session.run("mypy")


@nox.session(python=PYTHON)
def experiments(session: nox.Session) -> None:
    """Train the GSSF family on the built-in datasets and write the results table into README.md."""
    _install(session)
    session.run("python", "experiments/run_experiments.py", *session.posargs, env=QUIET_ENV)


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmarks: ratios measured side by side, absolute figures labelled with the machine."""
    _install(session)
    env = {**QUIET_ENV, "PYTHONPATH": os.path.join(os.getcwd(), "benchmarks")}
    for script in sorted(os.listdir("benchmarks")):
        if script.startswith("bench_") and script.endswith(".py"):
            session.run("python", os.path.join("benchmarks", script), *session.posargs, env=env)
