"""What gssf runs on Ray, and how it starts or joins Ray: the cluster package (:mod:`gssf_cli.cluster.tune_trials`,
:mod:`gssf_cli.cluster.train_workers`) is the only importer of Ray; this module holds the session and the address
checks both use.

A local Ray uses all CPUs, no dashboard, no usage stats, and a session folder in a short temporary directory
removed afterwards (Unix socket paths must stay under ~107 characters); results go under ``--storage``.

Joining a cluster (``--address``): ``HOST:6379`` (the driver runs here, as a Ray node's peer) or
``ray://HOST:10001`` (Ray Client, installed with gssf's ``all`` extra; the head node must be started with
``--ray-client-server-port``). An address where nothing listens fails
in seconds (exit 2) instead of ``ray.init``'s minutes of retries. What the user must set up:

- Ray 2.60 clusters use token authentication: set ``RAY_AUTH_MODE=token`` here, with the cluster's token in
  ``~/.ray/auth_token`` (where ``ray start`` writes it), in ``RAY_AUTH_TOKEN``, or in a file named by
  ``RAY_AUTH_TOKEN_PATH``. Without it ``ray.init`` is refused ("InvalidAuthToken") and gssf exits 2. A cluster
  started with ``RAY_AUTH_MODE=disabled`` (trusted networks only) needs nothing.
- The same Python, Ray and gssf (``pip install gssf``) on every node; ``--data`` (and any teacher file) at the
  same absolute path on every node; for ``gssf train --workers``, also the working folder and ``--runs-dir``
  (the primary worker writes the checkpoints there).
- ``--storage`` that every node and this machine can reach: a shared folder (NFS) or a URI such as
  ``s3://bucket/gssf`` (with the cloud credentials in the nodes' environment); trial checkpoints go there.
- MLflow needs no access from the cluster: only this process logs. Under Ray Client, Tune's callbacks would
  run on the head node, so none are installed there: the trials are logged from their results after ``fit()``
  (no live runs, no progress lines).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from gssf_cli.core.errors import UserInputError, first_line

RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AIR_NEW_OUTPUT": "0"}
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
"""A local Ray on loopback only. Ray has no authentication by default and, as a cluster node, advertises the
machine's external IP and binds its GCS, raylet and worker gRPC servers to every interface. With this switch
(read when ``ray`` is imported, and inherited by every Ray process) Ray treats the machine as a single node:
its node address is 127.0.0.1 and every server binds loopback. Only ``--address`` joins a cluster."""
MAX_TEMP_DIR = 40
"""Ray's Unix socket paths add ~65 characters to its temporary folder; AF_UNIX allows 107 in all."""


def _loopback_only() -> None:
    """See :data:`LOOPBACK_ENV`; also applied to an already imported Ray (read at call time there)."""
    os.environ.update(LOOPBACK_ENV)
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False  # type: ignore[attr-defined]


WRITER_FILE = ".gssf-writer"
"""Inside each temporary folder gssf makes for Ray (``gssf-ray-*``, ``gssf-train-*``): the writer that made it
(:func:`gssf_cli.core.files.writer_id`), so that a later command can tell a killed driver's folder from a live one."""
TEMP_PREFIXES = ("gssf-ray-", "gssf-train-")


def ray_temp_folder(prefix: str) -> str:
    """A new temporary folder for Ray (``prefix`` one of :data:`TEMP_PREFIXES`), marked with its writer, after
    sweeping away those of killed drivers (:func:`sweep_dead_temp_folders`)."""
    from gssf_cli.core.files import writer_id

    root = short_temp_root()
    sweep_dead_temp_folders(root)
    folder = tempfile.mkdtemp(prefix=prefix, dir=root)
    Path(folder, WRITER_FILE).write_text(writer_id())
    return folder


def sweep_dead_temp_folders(root: str) -> list[str]:
    """Remove the Ray folders under ``root`` whose writer is gone (a driver killed with SIGKILL cannot clean up),
    and stop the processes still running from them (Ray's agents outlive a killed driver: their command lines
    name the session folder). Folders of live writers, of other hosts, or without a writer file are left."""
    from gssf_cli.core.files import writer_alive, writer_id

    removed, mine = [], writer_id()
    for prefix in TEMP_PREFIXES:
        for folder in Path(root).glob(f"{prefix}*"):
            try:
                writer = (folder / WRITER_FILE).read_text().strip()
            except OSError:
                continue
            if writer != mine and writer_alive(writer) is False:
                _stop_processes_of(str(folder))
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(str(folder))
    return removed


def _stop_processes_of(folder: str) -> None:
    """SIGKILL this user's processes whose command line names ``folder`` (Linux ``/proc``; elsewhere nothing)."""
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if entry.stat().st_uid != os.getuid() or int(entry.name) == os.getpid():
                continue
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
        if folder in command:
            with contextlib.suppress(OSError):
                os.kill(int(entry.name), signal.SIGKILL)


def short_temp_root() -> str:
    """Where Ray's session folder goes: the temporary folder if its path is short enough for Ray's sockets,
    else ``/tmp`` (a long ``TMPDIR`` made ``gssf tune`` fail with "AF_UNIX path too long")."""
    root = tempfile.gettempdir()
    if len(root) <= MAX_TEMP_DIR - len("/gssf-ray-XXXXXXXX"):
        return root
    for fallback in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(fallback) and os.access(fallback, os.W_OK | os.X_OK):
            return fallback
    raise UserInputError(
        f"TMPDIR {root} is too long for Ray's socket paths (over {MAX_TEMP_DIR} characters) and /tmp is not "
        "writable: set TMPDIR to a short folder"
    )


def check_reachable(address: str, timeout: float = 3.0) -> None:
    """Fail in seconds when nothing listens at ``--address``: ``ray.init`` would retry for minutes."""
    if address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UserInputError(f"--address {address}: expected HOST:PORT (e.g. 10.0.0.5:6379) or ray://HOST:10001")
    if not 0 < int(port) < 65536:
        raise UserInputError(f"--address {address}: {port} is not a port number (1-65535)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise UserInputError(
            f"--address {address}: no Ray cluster answers there ({exc.strerror or exc}); "
            "start one with `ray start --head` or fix the address"
        ) from None
    if not _speaks_grpc(f"{host}:{port}", timeout):
        raise UserInputError(
            f"--address {address}: something listens there, but not Ray (no gRPC answer in {timeout:g} s); "
            "give the head node's GCS port (6379 by default) or its Ray Client port (ray://HOST:10001)"
        )
    if not address.startswith("ray://") and _token_refused(f"{host}:{port}", timeout):
        sent = "its token" if os.environ.get("RAY_AUTH_MODE") == "token" else "no token (RAY_AUTH_MODE is not token)"
        raise UserInputError(
            f"--address {address}: the Ray cluster refused {sent}; set RAY_AUTH_MODE=token and the cluster's token "
            "in RAY_AUTH_TOKEN, a file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token"
        )


def _token_refused(target: str, timeout: float) -> bool:
    """Whether the GCS at ``target`` refuses this process's token (or its lack of one): one call of its cheapest
    RPC with the metadata ``ray.init`` would send. Why: ``ray.init`` retries a refused token for about 30 s
    before it gives up. Ray's token loader and stubs are not public API; where they moved, Ray's own refusal
    (slower) still comes."""
    import grpc

    os.environ.update(RAY_ENV)  # before Ray is imported
    try:
        from ray._raylet import AuthenticationTokenLoader  # type: ignore[attr-defined]
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
    except ImportError:
        return False
    loader = AuthenticationTokenLoader.instance()
    metadata = tuple(loader.get_token_for_http_header().items()) if loader.has_token() else ()
    channel = grpc.insecure_channel(target)
    try:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        request = gcs_service_pb2.GetClusterIdRequest()  # type: ignore[attr-defined]
        stub.GetClusterId(request, timeout=timeout, metadata=metadata)
    except grpc.RpcError as exc:
        return bool(exc.code() == grpc.StatusCode.UNAUTHENTICATED)
    finally:
        channel.close()
    return False


def _speaks_grpc(target: str, timeout: float) -> bool:
    """Whether ``target`` completes a gRPC (HTTP/2) handshake, as Ray's GCS and Ray Client servers do: ``ray.init``
    against anything else (a web server, a proxy) retries for minutes instead of failing."""
    import grpc

    channel = grpc.insecure_channel(target)
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
        return True
    except grpc.FutureTimeoutError:
        return False
    finally:
        channel.close()


def storage_path(storage: str) -> str:
    """Ray wants an absolute path or a URI; a relative folder is taken from the working directory."""
    if "://" in storage:
        return storage
    try:
        path = Path(storage).expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".gssf-write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise UserInputError(
            f"tune.storage {storage}: Ray cannot keep its results there ({first_line(exc)}); name a writable folder"
        ) from None
    return str(path)


def experiment_path(storage: str, name: str) -> str:
    """Where Tune keeps experiment ``name`` under ``storage`` (a folder or a URI): what ``Tuner.restore`` reads."""
    return f"{storage.rstrip('/')}/{name}"


def callbacks_run_here(address: str | None) -> bool:
    """Whether Tune's callbacks run in this process. Under Ray Client (``ray://``) Tune's controller, and so
    every callback, runs on the cluster's head node, which cannot reach this process's tracking store."""
    return not (address or "").startswith("ray://")


def check_restorable(path: str, address: str | None, what: str) -> None:
    """Before a resumed tune opens its run: ``path`` still holds the Tune experiment (``tuner.pkl``)."""
    ray_environment(address)
    from ray.tune import Tuner

    try:
        found = Tuner.can_restore(path)
    except (OSError, ValueError) as exc:
        raise UserInputError(f"{what}: cannot read its Ray results at {path}: {first_line(exc)}") from None
    if not found:
        raise UserInputError(
            f"{what}: its Ray results folder {path} is gone (or holds no Tune experiment), so it cannot be resumed; "
            "start a new `gssf tune`"
        )


def ray_environment(address: str | None) -> None:
    """Ray's settings for gssf (no usage stats, the old console output), and loopback only unless joining a
    cluster; before Ray is imported, as some are read then."""
    os.environ.update(RAY_ENV)
    if not address:
        _loopback_only()


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[list[float]]:
    """Use a running Ray (this process's, or a cluster's with ``--address``) or start a local one and stop
    it afterwards, removing its session folder."""
    import ray

    elapsed = [0.0]
    if ray.is_initialized():
        yield elapsed
        return
    temp_dir: str | None = None
    started = time.perf_counter()
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        if address:
            ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
        else:
            temp_dir = ray_temp_folder("gssf-ray-")
            ray.init(
                num_cpus=os.cpu_count() or 1,
                include_dashboard=False,
                _temp_dir=temp_dir,
                log_to_driver=False,
                logging_level=logging.ERROR,
            )
    except (ConnectionError, TimeoutError, RuntimeError, ValueError, ray.exceptions.AuthenticationError) as exc:
        _abandon(temp_dir)
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        hint = " (is it running? does it need RAY_AUTH_MODE=token and its token?)" if address else ""
        raise UserInputError(f"cannot start or join {where}{hint}: {first_line(exc)}") from None
    except SystemExit as exc:
        # SIGTERM while ray.init runs reaches Ray's own handler (sys.exit(15)): gssf ends it as an interrupt.
        _abandon(temp_dir)
        if exc.code == 128 + signal.SIGTERM or exc.code == signal.SIGTERM:
            raise KeyboardInterrupt from None
        raise
    except BaseException:
        _abandon(temp_dir)
        raise
    if threading.current_thread() is threading.main_thread() and callable(sigterm):
        signal.signal(signal.SIGTERM, sigterm)  # ray.init installs sys.exit(15); gssf ends its runs KILLED instead
    elapsed[0] = time.perf_counter() - started
    try:
        yield elapsed
    finally:
        ray.shutdown()
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)


def _abandon(temp_dir: str | None) -> None:
    """After a failed or interrupted ``ray.init``: stop what it started and remove the session folder."""
    import ray

    with contextlib.suppress(Exception):
        ray.shutdown()
    if temp_dir:
        shutil.rmtree(temp_dir, ignore_errors=True)


@contextlib.contextmanager
def quiet_ray_logs(name: str = "ray.tune") -> Iterator[None]:
    """Ray logs every trial (or worker) error with a full traceback; gssf reports each error in one line."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def error_line(error: BaseException) -> str:
    """The trial's own exception (Ray wraps it), as one line."""
    cause = getattr(error, "cause", None) or error
    text = first_line(cause) or type(cause).__name__
    return text if isinstance(cause, UserInputError) else f"{type(cause).__name__}: {text}"
