"""The tracking adapter: the only module that imports mlflow.

Why a thin adapter: stages log through :class:`StageRun` and never see mlflow, so the tracking model
(docs/architecture.md) lives in one place — where runs go, how they nest, what every run carries (resolved config,
dataset, git commit, gssf version) — and the tune driver can log many child runs from one process.

The store itself (which one, probed and locked before first use) is :mod:`gssf_cli.tracking.store`.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import getpass
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # gssf shows its own progress; with tqdm
# installed, MLflow's bars would land on stderr around gssf's one-line errors and JSON output

# MLflow logs every database error with its traceback (a full disk's "database or disk is full" too); gssf reports
# each in one line, and --debug shows the traceback.
logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
logging.getLogger("alembic").setLevel(logging.WARNING)

import mlflow  # noqa: E402
from mlflow.entities import Run  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from gssf_cli import __version__  # noqa: E402
from gssf_cli.core.config import dump_toml  # noqa: E402
from gssf_cli.core.errors import RunInterrupted, UserInputError, first_line  # noqa: E402
from gssf_cli.core.files import writer_alive, writer_id  # noqa: E402
from gssf_cli.tracking.store import FIX_URI, check_store, resolve_tracking_uri, sqlite_path, store_lock  # noqa: E402
from gssf_cli.tracking.tags import (  # noqa: E402
    CHAMPION_ALIAS,
    CLASSIC_ML,
    EXPERIMENT_KIND_TAG,
    FINAL_RUN_TAG,
    PARENT_TAG,
    PIPELINE_STAGE,
    SEEDS_STAGE,
)

DEFAULT_EXPERIMENT = "gssf"
STAGE_TAG = "gssf.stage"
MAX_PARAM_LENGTH = 6000
_END_ATTEMPTS = 3
SHORT_ID_LENGTH = 6
MIN_ID_PREFIX = 8
"""The shortest run-id prefix ``--run`` / ``--resume`` accept (the tables print 12 characters)."""


def git_commit(cwd: Path | None = None) -> str | None:
    """The HEAD commit of the repository containing ``cwd``, or None outside a repository."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd or Path.cwd(),
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def flatten_params(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config values as flat ``a.b`` string params, as MLflow stores them."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, f"{name}."))
        else:
            text = json.dumps(value) if isinstance(value, (list, tuple, bool)) else str(value)
            flat[name] = text[:MAX_PARAM_LENGTH]
    return flat


WRITER_TAG = "gssf.writer"
"""On every run gssf opens (or reopens): the process that writes it, as host, boot and process id
(:func:`gssf_cli.core.files.writer_id`). A RUNNING run whose writer is gone was killed: the next command that opens
a run in the store marks it so (:meth:`Tracker.end_dead_runs`)."""
DEAD_REASON_TAG = "gssf.ended_by"


def run_tags(stage: str, parent_run_id: str | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """What every gssf run carries: its stage, the gssf version, the git commit, and its parent if any."""
    tags = {
        STAGE_TAG: stage,
        "mlflow.user": current_user(),
        "gssf.version": __version__,
        "mlflow.source.name": f"gssf {stage}",
        "mlflow.source.type": "LOCAL",
        WRITER_TAG: writer_id(),
    }
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    if parent_run_id:
        tags[PARENT_TAG] = parent_run_id
    tags.update(extra or {})
    return tags


def current_user() -> str:
    """Who ran it, as MLflow's fluent API records it ("Created by" in the UI)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def unique_run_name(base: str, run_id: str) -> str:
    """``base`` plus the run id's first characters: two runs never share a name, and a name leads to its id."""
    return f"{base}-{run_id[:SHORT_ID_LENGTH]}"


CACHE_DIR_ENV = "GSSF_CACHE_DIR"
"""Where gssf keeps its per-machine cache (the store schema template); default ``$XDG_CACHE_HOME/gssf`` or
``~/.cache/gssf``."""


def cache_dir() -> Path:
    chosen = os.environ.get(CACHE_DIR_ENV)
    if chosen:
        return Path(chosen)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gssf"


def schema_template() -> Path | None:
    """An empty SQLite file holding MLflow's whole schema, at this MLflow version's newest revision, and no rows:
    made once per machine and MLflow version (``mlflow-VERSION-schema.db`` in :func:`cache_dir`); ``None`` when it
    cannot be made there (then MLflow creates each store itself, as it always can).

    Why: MLflow creates a fresh SQLite store by running its whole chain of schema migrations, about a second of
    CPU for every new folder's first command (and every test's). The template is what that chain produces, made
    by MLflow's own ``_initialize_tables``; a store seeded from it is then opened by MLflow as an existing one:
    it verifies the revision and creates experiment 0 with this store's artifact location.
    """
    template = cache_dir() / f"mlflow-{mlflow.__version__}-schema.db"
    if template.is_file():
        return template
    from mlflow.store.db import utils as db_utils

    initialize = getattr(db_utils, "_initialize_tables", None)
    if initialize is None:
        return None
    staging = template.with_name(f".{template.name}.{os.getpid()}.tmp")
    try:
        template.parent.mkdir(parents=True, exist_ok=True)
        engine = db_utils.create_sqlalchemy_engine_with_retry(f"sqlite:///{staging}")
        try:
            initialize(engine)
        finally:
            engine.dispose()
        os.replace(staging, template)
    except Exception:  # a cache that cannot be made only costs the migration time it would save
        with contextlib.suppress(OSError):
            staging.unlink()
        return None
    return template


def seed_sqlite_store(path: Path) -> None:
    """Create the SQLite store ``path`` (absent or empty) as a copy of :func:`schema_template`, atomically; when
    that cannot be done, leave ``path`` to MLflow, which creates it the long way (and reports a full disk or a
    read-only folder in its own error, handled as before). Called under the store's lock."""
    template = schema_template()
    if template is None:
        return
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        shutil.copyfile(template, staging)
        os.replace(staging, path)
    except OSError:
        with contextlib.suppress(OSError):
            staging.unlink()


class Tracker:
    """A connection to one tracking store and one experiment."""

    def __init__(self, tracking_uri: str | None = None, experiment: str | None = None) -> None:
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.experiment_name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        self.experiment_chosen = experiment is not None or "MLFLOW_EXPERIMENT_NAME" in os.environ
        check_store(self.tracking_uri)
        self._experiment_id: str | None = None
        self._swept = False
        if self.store_exists():
            self.client  # noqa: B018 -- a store that exists is opened (and checked) now; a new one at first use

    @functools.cached_property
    def client(self) -> MlflowClient:
        """The store's client. A SQLite store that does not exist yet is created at first use, so a command refused
        before it logs anything leaves no store (no ``mlflow.db``, no lock) behind."""
        try:
            with store_lock(self.tracking_uri):
                path = sqlite_path(self.tracking_uri)
                if path is not None and not (path.is_file() and path.stat().st_size > 0):
                    seed_sqlite_store(path)
                # mlflow builds the store eagerly here: engine, schema creation or migration, experiment 0.
                return MlflowClient(tracking_uri=self.tracking_uri)
        except MlflowException as exc:
            raise UserInputError(
                f"cannot use tracking store {self.tracking_uri}: {first_line(exc)}; check {FIX_URI}"
            ) from None

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            self._experiment_id = self._get_or_create_experiment()
        return self._experiment_id

    def _get_or_create_experiment(self) -> str:
        client = self.client  # made (under the store lock) before this takes the lock: the lock is not re-entrant
        try:
            with store_lock(self.tracking_uri):
                found = self._existing_experiment()
                if found is not None:
                    return found
                try:
                    return str(client.create_experiment(self.experiment_name, tags={EXPERIMENT_KIND_TAG: CLASSIC_ML}))
                except MlflowException:
                    # Another process (on a server, where the lock does not reach) created it first.
                    found = self._existing_experiment()
                    if found is None:
                        raise
                    return found
        except MlflowException as exc:
            raise UserInputError(
                f"cannot use tracking store {self.tracking_uri}: {first_line(exc)}; check {FIX_URI}"
            ) from None

    def _existing_experiment(self) -> str | None:
        found = self.client.get_experiment_by_name(self.experiment_name)
        if found is None:
            return None
        if found.lifecycle_stage == "deleted":
            raise UserInputError(
                f"experiment {self.experiment_name!r} is deleted in {self.tracking_uri}: "
                "restore it or pass another --experiment"
            )
        if EXPERIMENT_KIND_TAG not in found.tags:
            self.client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, CLASSIC_ML)
        return str(found.experiment_id)

    @contextlib.contextmanager
    def start_run(
        self,
        stage: str,
        *,
        run_name: str | None = None,
        parent_run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
        resume_run_id: str | None = None,
    ) -> Iterator[StageRun]:
        """Open a run for ``stage`` (or reopen ``resume_run_id``); it ends FINISHED, FAILED on an
        exception or when the stage called :meth:`StageRun.mark_failed`, or KILLED on Ctrl-C."""
        self.end_dead_runs()
        if resume_run_id is not None:
            check_resumable(self.get_run(resume_run_id))
            self.client.update_run(resume_run_id, status="RUNNING")
            self.client.set_tag(resume_run_id, WRITER_TAG, writer_id())
            yield from self._close_on_exit(StageRun(self.client, resume_run_id), stage)
            return
        handle = self.open_run(stage, run_name=run_name, parent_run_id=parent_run_id, tags=tags)
        yield from self._close_on_exit(handle, stage)

    def open_run(
        self,
        stage: str,
        *,
        run_name: str | None = None,
        parent_run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
        start_time_ms: int | None = None,
    ) -> StageRun:
        """Create a RUNNING run named ``<run_name or stage>-<short id>``; the caller ends it with :meth:`end_run`
        (a tune's trial runs live across callbacks, so no context manager can hold them)."""
        self.end_dead_runs()
        all_tags = run_tags(stage, parent_run_id, tags)
        base = run_name or stage
        run = self.client.create_run(self.experiment_id, start_time=start_time_ms, tags=all_tags, run_name=base)
        run_id = run.info.run_id
        self.client.update_run(run_id, name=unique_run_name(base, run_id))
        return StageRun(self.client, run_id)

    def rename_run(self, run_id: str, base: str) -> str:
        """Name a run ``<base>-<short id>`` as :meth:`open_run` does, once its caller knows more than the stage
        that opened it did (which of a pipeline's evaluations it is); returns the name."""
        name = unique_run_name(base, run_id)
        self.client.update_run(run_id, name=name)
        return name

    def end_run(self, run_id: str, status: str = "FINISHED", end_time_ms: int | None = None) -> None:
        """End a run opened by :meth:`open_run` as FINISHED, FAILED or KILLED."""
        self.client.set_terminated(run_id, status=status, end_time=end_time_ms)

    def reopen_run(self, run_id: str) -> StageRun:
        """Mark an ended run RUNNING again (a resumed tune's unfinished trials) and return a handle to it."""
        self.client.update_run(run_id, status="RUNNING")
        self.client.set_tag(run_id, WRITER_TAG, writer_id())
        return StageRun(self.client, run_id)

    def end_dead_runs(self) -> list[str]:
        """Mark KILLED every RUNNING run of the store whose writer (:data:`WRITER_TAG`) is gone — a driver,
        pipeline or trial killed so hard that it could not end its run — and return their ids. Runs of writers on
        other hosts are never judged dead; runs without the tag (not gssf's, or older) are left alone. Done once
        per tracker, before it opens a run."""
        if self._swept:
            return []
        self._swept = True
        ended = []
        for run in self.client.search_runs(self._experiment_ids(), "attributes.status = 'RUNNING'", max_results=1000):
            writer = run.data.tags.get(WRITER_TAG)
            if writer is not None and writer_alive(writer) is False:
                self.client.set_tag(run.info.run_id, DEAD_REASON_TAG, "its process was gone when a later command ran")
                self.client.set_terminated(run.info.run_id, status="KILLED")
                ended.append(run.info.run_id)
        return ended

    def _close_on_exit(self, handle: StageRun, stage: str) -> Iterator[StageRun]:
        try:
            yield handle
        except KeyboardInterrupt as interrupt:
            self._end(handle.run_id, "KILLED", interrupt)
            if isinstance(interrupt, RunInterrupted):  # a nested run's: the innermost run is the one to continue
                raise
            raise RunInterrupted(handle.run_id, stage) from interrupt
        except BaseException as error:
            self._end(handle.run_id, "FAILED", error)
            raise
        self.client.set_terminated(handle.run_id, status="FAILED" if handle.failed else "FINISHED")

    def _end(self, run_id: str, status: str, cause: BaseException) -> None:
        """End a run after an interruption or error without masking it. Ctrl-C or SIGTERM may have landed inside
        one of the store's own transactions and left its session unusable — or holding SQLite's write lock, so
        that the first try fails with "database is locked" (seen under load). Then the frames of the
        interrupted call are cleared (``cause``'s traceback kept its session, and so the lock, alive), the
        store's connections are released (:meth:`_release_store`) and the status is written through a fresh
        client, a few times; if that still fails, the run stays RUNNING (``--resume`` ends it)."""
        try:
            self.client.set_terminated(run_id, status=status)
            return
        except Exception:
            traceback.clear_frames(cause.__traceback__)
            self._release_store()
        for attempt in range(_END_ATTEMPTS):
            try:
                MlflowClient(tracking_uri=self.tracking_uri).set_terminated(run_id, status=status)
                return
            except Exception:
                time.sleep(0.2 * (attempt + 1))

    def _release_store(self) -> None:
        """Let go of what an interrupted transaction holds: a SQLite write lock stays with its connection (every
        other connection then gets "database is locked"), so finalise the sessions the interrupt abandoned and
        close the engine's connections — an open transaction rolls back as its connection closes."""
        engine = getattr(self.client._tracking_client.store, "engine", None)
        if engine is None:
            return
        gc.collect()
        with contextlib.suppress(Exception):
            engine.dispose()

    def get_run(self, run_ref: str, stage: str | None = None) -> Run:
        """A run by what gssf prints of it — its id, a unique prefix of at least :data:`MIN_ID_PREFIX` characters,
        or its name — or the newest run (of ``stage`` if given) for ``latest``.

        ``latest`` looks in the chosen experiment (``--experiment`` / ``MLFLOW_EXPERIMENT_NAME``); with none
        chosen, in every experiment of the store — ``gssf run`` logs to the pipeline's own experiment, and the
        commands a user types next should find its runs.
        """
        if run_ref != "latest":
            return self._run_by_reference(run_ref)
        found = None
        if self.store_exists():
            found = self._newest(stage, [self.experiment_id] if self.experiment_chosen else self._experiment_ids())
        if found is not None:
            return found
        what = f"{stage} run" if stage else "run"
        elsewhere = (
            self._newest(stage, self._experiment_ids()) if self.experiment_chosen and self.store_exists() else None
        )
        if elsewhere is not None:
            name = self.client.get_experiment(elsewhere.info.experiment_id).name
            raise UserInputError(
                f"no {what} in experiment {self.experiment_name!r}; the newest is in experiment {name!r}: "
                f"pass --experiment {name} (or the run id {elsewhere.info.run_id})"
            )
        where = f"experiment {self.experiment_name!r}" if self.experiment_chosen else "any experiment"
        raise UserInputError(f"no {what} in {where} at {self.tracking_uri}: run one first or pass a run id")

    def _run_by_reference(self, run_ref: str) -> Run:
        """The one run whose id is ``run_ref``, starts with it (at least :data:`MIN_ID_PREFIX` characters), or
        whose name it is; an ambiguous reference lists its matches."""
        if not self.store_exists():
            return self._unknown(run_ref)
        with contextlib.suppress(MlflowException):
            return self.client.get_run(run_ref)
        quoted = run_ref.replace("'", "")
        clauses = [f"attributes.run_name = '{quoted}'"]
        if len(run_ref) >= MIN_ID_PREFIX and all(c in "0123456789abcdef" for c in run_ref):
            clauses.append(f"attributes.run_id LIKE '{run_ref}%'")
        found: dict[str, Run] = {}
        for clause in clauses:
            for run in self.client.search_runs(self._experiment_ids(), filter_string=clause, max_results=50):
                found[run.info.run_id] = run
        if len(found) == 1:
            return next(iter(found.values()))
        if found:
            listed = ", ".join(f"{r.info.run_id} ({r.info.run_name})" for r in list(found.values())[:5])
            raise UserInputError(
                f"run {run_ref!r} is ambiguous at {self.tracking_uri}: it matches {listed}; pass more of the id"
            )
        return self._unknown(run_ref)

    def _unknown(self, run_ref: str) -> NoReturn:
        raise UserInputError(
            f"unknown run {run_ref!r} at {self.tracking_uri}: pass a run id (or its first {MIN_ID_PREFIX}+ characters), "
            "a run name, or 'latest'"
        )

    def store_exists(self) -> bool:
        """Whether the store holds anything yet: a local SQLite file that does not exist holds no run, and looking
        for one there must not create it (a refused command leaves nothing behind)."""
        path = sqlite_path(self.tracking_uri)
        return path is None or path.exists()

    def get_train_run(self, run_ref: str) -> Run:
        """The train run ``run_ref`` names (as :meth:`get_run` finds it); a pipeline run stands for its final train
        run (``gssf.final_run``), a seeds run for its last train run, and the switch is said in one line on stderr."""
        return self._final_train_run(self.get_run(run_ref, stage="train"))

    def _final_train_run(self, run: Run) -> Run:
        stage = run.data.tags.get(STAGE_TAG)
        final_id = run.data.tags.get(FINAL_RUN_TAG) if stage == PIPELINE_STAGE else None
        if stage == SEEDS_STAGE:
            children = self.client.search_runs(
                [run.info.experiment_id],
                filter_string=f"tags.`{PARENT_TAG}` = '{run.info.run_id}' and tags.`{STAGE_TAG}` = 'train'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
            final_id = children[0].info.run_id if children else None
        if final_id is None:
            return run
        final = self.client.get_run(final_id)
        print(
            f"gssf: run {run.info.run_id} is a {stage} run: using its final train run {final_id} ({final.info.run_name})",
            file=sys.stderr,
        )
        return final

    def _experiment_ids(self) -> list[str]:
        return [e.experiment_id for e in self.client.search_experiments()]

    def _newest(self, stage: str | None, experiment_ids: list[str]) -> Run | None:
        if not experiment_ids:
            return None
        runs = self.client.search_runs(
            experiment_ids,
            filter_string=f"tags.`{STAGE_TAG}` = '{stage}'" if stage else "",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return runs[0] if runs else None

    def follow(self, run: Run) -> None:
        """Log the next runs into ``run``'s experiment unless the user chose one: an evaluation or export of a
        pipeline's model lands beside it."""
        if not self.experiment_chosen:
            self._experiment_id = str(run.info.experiment_id)
            self.experiment_name = self.client.get_experiment(self._experiment_id).name

    def stored_run(self, run_id: str) -> Run | None:
        """Run ``run_id`` as the store holds it, or None when it has no such run (or it is deleted)."""
        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return None
        return None if run.info.lifecycle_stage == "deleted" else run

    def run_status(self, run_id: str) -> str | None:
        """A run's status (FINISHED, FAILED, ...), or None when the store has no such run (or it is deleted)."""
        run = self.stored_run(run_id)
        return None if run is None else str(run.info.status)

    def metric_steps(self, run_id: str, key: str) -> list[int]:
        """The steps at which ``key`` was logged on a run, in order (e.g. the epochs a resumed run already has)."""
        return sorted(int(m.step) for m in self.client.get_metric_history(run_id, key))

    def run_handle(self, run_id: str) -> StageRun:
        """Log to an existing run (e.g. test metrics onto the train run they describe)."""
        return StageRun(self.client, run_id)

    def child_runs(self, parent_run_id: str) -> list[Run]:
        return list(
            self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                order_by=["attributes.start_time ASC"],
            )
        )

    def record_run(
        self,
        stage: str,
        *,
        run_name: str,
        status: str,
        parent_run_id: str | None = None,
        params: Mapping[str, Any] | None = None,
        history: Sequence[tuple[int, int, Mapping[str, float]]] = (),
        tags: Mapping[str, str] | None = None,
        start_time_ms: int | None = None,
        end_time_ms: int | None = None,
    ) -> str:
        """Log a run that happened elsewhere — a Ray trial — as one finished run, and return its id.

        Why: trial processes never write to the store (many writers corrupt or lock a SQLite file); the tune
        driver replays each trial's results here. ``history`` holds ``(step, timestamp_ms, metrics)`` rows so
        the run's metric charts show the trial's own epochs and times; ``status`` is FINISHED, FAILED or
        KILLED; the start and end times are the trial's.
        """
        handle = self.open_run(
            stage, run_name=run_name, parent_run_id=parent_run_id, tags=tags, start_time_ms=start_time_ms
        )
        try:
            if params:
                handle.log_params(params)
            metrics = [
                mlflow.entities.Metric(key, float(value), timestamp, step)
                for step, timestamp, values in history
                for key, value in values.items()
                if isinstance(value, (int, float)) and not isinstance(value, bool)
            ]
            for start in range(0, len(metrics), 500):
                self.client.log_batch(handle.run_id, metrics=metrics[start : start + 500])
        except BaseException:
            self.client.set_terminated(handle.run_id, status="FAILED")
            raise
        self.client.set_terminated(handle.run_id, status=status, end_time=end_time_ms)
        return handle.run_id


class StageRun:
    """An open run: what a stage may log. Thin wrappers so stages never touch mlflow directly."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client = client
        self.run_id = run_id
        self.failed = False

    def mark_failed(self) -> None:
        """End this run FAILED when its block exits normally: the stage ran but failed its own check (what it
        logged stays on the run, so people can see why)."""
        self.failed = True

    def log_params(self, params: Mapping[str, Any], prefix: str = "") -> None:
        flat = flatten_params(params, prefix)
        items = list(flat.items())
        for start in range(0, len(items), 100):
            batch = [mlflow.entities.Param(k, v) for k, v in items[start : start + 100]]
            self.client.log_batch(self.run_id, params=batch)

    def logged_metrics(self) -> set[str]:
        """The keys of the metrics this run has logged so far."""
        return set(self.client.get_run(self.run_id).data.metrics)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        import time

        now = int(time.time() * 1000)
        batch = [
            mlflow.entities.Metric(k, float(v), now, step or 0)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        for start in range(0, len(batch), 500):
            self.client.log_batch(self.run_id, metrics=batch[start : start + 500])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[mlflow.entities.RunTag(k, str(v)) for k, v in tags.items()])

    def log_config(self, section: str, values: Mapping[str, Any]) -> None:
        """The resolved config: as params (``section.key``) and as a TOML artifact."""
        self.log_params(values, prefix=f"{section}.")
        self.log_text(dump_toml({section: values}), f"config/{section}.toml")

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, obj, artifact_file)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, folder: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file)

    def log_dataset(
        self, name: str, folder: Path, digest: str, context: str, tags: Mapping[str, str] | None = None
    ) -> None:
        """Record the dataset folder as a run input (visible in the UI's Datasets column)."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(str(folder.resolve()))
        dataset = MetaDataset(source, name=name, digest=digest[:36])  # type: ignore[abstract]
        input_tags = [InputTag("mlflow.data.context", context)]
        input_tags += [InputTag(k, v) for k, v in (tags or {}).items()]
        # MLflow inserts a dataset row if no equal one exists, in two statements: two runs of one dataset started
        # at once on a fresh SQLite store both insert it, and the second fails its unique key. One at a time.
        with store_lock(self.client._tracking_client.tracking_uri):
            self.client.log_inputs(self.run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), input_tags)])
        self.set_tags({"gssf.dataset.name": name, "gssf.dataset.manifest_sha256": digest})

    def log_served_model(
        self, name: str, folder: Path, loader: str, requirements: Sequence[str], tags: Mapping[str, str] | None = None
    ) -> str:
        """Log ``folder`` as an MLflow model loadable with ``mlflow.pyfunc.load_model``; return its model id.

        Models-from-code: the model is :mod:`gssf_cli.tracking.pyfunc_model`, which builds ``loader``
        (``module:Class``, whose ``load(folder)`` reads safetensors/ONNX and JSON) from the artifact folder —
        no pickle is written and none is read back. ``requirements`` are pinned (MLflow would otherwise spend
        seconds inferring them). The model is loaded once here for its signature (inputs and outputs with the
        shapes it was trained on, checked by the model itself: :func:`pyfunc_model.signature`), so a folder that
        does not load is refused before anything is logged.
        """
        from gssf_cli.tracking import pyfunc_model

        declared = pyfunc_model.signature(pyfunc_model.load(loader, folder).io_schema())
        mlflow.set_tracking_uri(self.client._tracking_client.tracking_uri)
        # Created here, in the run's own experiment: mlflow would put it in the active (default) one.
        experiment_id = self.client.get_run(self.run_id).info.experiment_id
        # A resumed run whose last logging a kill cut short: its ready model stands; a half-logged one goes.
        for earlier in self.client.search_logged_models(
            [experiment_id], filter_string=f"source_run_id = '{self.run_id}' AND name = '{name}'"
        ):
            if str(earlier.status) == "READY":
                return str(earlier.model_id)
            self.client.delete_logged_model(earlier.model_id)
        logged = self.client.create_logged_model(experiment_id, name, source_run_id=self.run_id, tags=dict(tags or {}))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mlflow.models.Model.log(
                artifact_path=None,
                name=name,
                flavor=mlflow.pyfunc,
                run_id=self.run_id,
                model_id=logged.model_id,
                python_model=pyfunc_model.__file__,
                model_config={pyfunc_model.LOADER_KEY: loader},
                artifacts={pyfunc_model.ARTIFACT: str(folder)},
                pip_requirements=list(requirements),
                signature=declared,
            )
        return str(logged.model_id)

    def register_champion(
        self, registered_name: str, model_id: str, description: str, tags: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """A new version of ``registered_name`` in the Model Registry for logged model ``model_id`` (linked to
        this run), described and tagged (who made it: the registry records no user on a local store), and given
        the alias ``champion`` (moved there from an older version, so ``models:/NAME@champion`` names the newest);
        returns ``{"name", "version", "alias"}``, as a stage reports it."""
        mlflow.set_tracking_uri(self.client._tracking_client.tracking_uri)
        all_tags = {"mlflow.user": current_user(), **(tags or {})}
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):  # mlflow prints its own lines
            warnings.simplefilter("ignore")
            version = mlflow.register_model(
                f"models:/{model_id}", registered_name, await_registration_for=0, tags=all_tags
            )
        self.client.update_model_version(registered_name, version.version, description=description)
        self.client.set_registered_model_alias(registered_name, CHAMPION_ALIAS, version.version)
        self.set_tags({"gssf.registered_model": f"{registered_name}/{version.version}"})
        return {"name": registered_name, "version": int(version.version), "alias": CHAMPION_ALIAS}

    def download_artifacts(self, path: str, dst: Path) -> Path:
        return Path(self.client.download_artifacts(self.run_id, path, str(dst)))


def check_resumable(run: Run) -> None:
    """A run ``--resume`` may continue: not one that FINISHED (resuming it would log a second model into it)."""
    if run.info.status == "FINISHED":
        raise UserInputError(
            f"run {run.info.run_id} ({run.info.run_name}) FINISHED: there is nothing to resume; "
            "evaluate or export it, or train a new run"
        )
