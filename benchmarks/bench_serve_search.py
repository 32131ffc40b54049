"""Search served: warm queries in one process, and ``mlflow models serve`` over HTTP at 1, 8 and 32 clients.

What it builds, in a temporary folder, with the installed ``gssf``: the generated captions (the quickstart's
data), a GSSF model trained briefly and exported, a gallery of ``--count`` image embeddings (the test images'
embeddings plus noise, so that captions have matches) indexed by each ``--kinds`` with ``--register``.

What it measures, per kind:
- **start-up**: a fresh interpreter's imports and ``mlflow.pyfunc.load_model`` of the registered search model
  (reading and checking the index and the bundle once), and the server's time from launch to its first ``/ping``;
- **in process, warm**: one caption per ``predict`` call, k = 10, after a warm-up: p50 and p99 latency
  (tokenising, the text encoder on ONNX Runtime, the search, the ids) and the queries per second;
- **over HTTP on 127.0.0.1**: the server (uvicorn's default workers) driven by 1, 8 and 32 concurrent clients,
  each sending one-caption requests (a bounded count, ``REQUESTS_PER_CLIENT`` each): p50 / p99 latency per
  request and the queries per second of the whole run.

Run from the repository root:  python benchmarks/bench_serve_search.py [--quick] [--count N] [--kinds flat,hnsw]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from common import report

FULL_COUNT = 100_000
QUICK_COUNT = 10_000
CLIENTS = (1, 8, 32)
REQUESTS_PER_CLIENT = 25
WARM_QUERIES = 300
K = 10


def gssf(folder: Path, *args: str) -> str:
    done = subprocess.run([shutil.which("gssf") or "gssf", *args], cwd=folder, capture_output=True, text=True,
                          env=_env(folder))  # fmt: skip
    if done.returncode:
        raise SystemExit(f"gssf {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def _env(folder: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env | {"MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}", "MLFLOW_DISABLE_TELEMETRY": "true"}


def build_project(folder: Path, count: int, kinds: list[str]) -> list[str]:
    """Data, a trained and exported model, and one registered search model per kind; the captions to ask."""
    gssf(folder, "prepare", "--dataset", "synthetic", "--out", "data/q")
    gssf(folder, "train", "--data", "data/q", "--epochs", "3")
    gssf(folder, "export", "--onnx", "--run", "latest", "--out", "exports/q")
    from gssf_cli.deploy.bundle import BundleModel

    bundle = BundleModel.load(folder / "exports/q")
    seeds = bundle.encode_images(np.load(folder / "data/q/test_ims.npy"))
    rng = np.random.default_rng(0)
    gallery = seeds[rng.integers(len(seeds), size=count)]
    gallery = gallery + 0.3 / np.sqrt(gallery.shape[1]) * rng.standard_normal(gallery.shape).astype(np.float32)
    np.save(folder / "gallery.npy", (gallery / np.linalg.norm(gallery, axis=1, keepdims=True)).astype(np.float32))
    for kind in kinds:
        gssf(folder, "index", "--bundle", "exports/q", "--gallery", "gallery.npy", "--embedded", "--kind", kind,
             "--out", f"indexes/{kind}", "--register", f"search-{kind}")  # fmt: skip
    return (folder / "data/q/test_caps.txt").read_text().splitlines()


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = 1000 * np.asarray(seconds)
    return {"p50 ms": float(np.percentile(ms, 50)), "p99 ms": float(np.percentile(ms, 99))}


def in_process(folder: Path, kind: str, captions: list[str]) -> dict[str, Any]:
    """The warm figures, measured in a fresh interpreter (``--in-process KIND``) so that every kind's start-up
    includes the imports a new process pays."""
    args = [sys.executable, __file__, "--in-process", kind, "--folder", str(folder)]
    done = subprocess.run(args, capture_output=True, text=True, env=_env(folder))
    if done.returncode:
        raise SystemExit(f"in-process {kind} failed:\n{done.stderr[-2000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def warm_queries(folder: Path, kind: str, captions: list[str]) -> dict[str, Any]:
    started = time.perf_counter()
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model(f"models:/search-{kind}/1")
    load_seconds = time.perf_counter() - started
    for caption in captions[:20]:
        model.predict({"texts": [caption], "k": K})
    times = []
    for caption in captions[:WARM_QUERIES]:
        tick = time.perf_counter()
        model.predict({"texts": [caption], "k": K})
        times.append(time.perf_counter() - tick)
    return {"kind": kind, "where": "in process (warm)", "clients": 1, "start-up s": load_seconds,
            "queries/s": len(times) / sum(times), **percentiles(times)}  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def alive(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/ping", timeout=2) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


@contextlib.contextmanager
def served(folder: Path, uri: str) -> Iterator[tuple[str, float]]:
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
               "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    started = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen(command, cwd=folder, env=_env(folder), stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            while not alive(url):
                if server.poll() is not None or time.perf_counter() - started > 300:
                    log.seek(0)
                    raise SystemExit(f"the server did not start:\n{log.read().decode()[-2000:]}")
                time.sleep(0.2)
            yield url, time.perf_counter() - started
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)


def ask(url: str, caption: str) -> float:
    body = json.dumps({"inputs": {"texts": [caption], "k": K}}).encode()
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    tick = time.perf_counter()
    with urllib.request.urlopen(request, timeout=60) as answer:
        found = json.loads(answer.read())["predictions"]["ids"]
    if len(found) != 1 or len(found[0]) != K:
        raise SystemExit(f"a wrong answer: {found}")
    return time.perf_counter() - tick


def over_http(folder: Path, kind: str, captions: list[str]) -> list[dict[str, Any]]:
    rows = []
    with served(folder, f"models:/search-{kind}/1") as (url, startup):
        for caption in captions[:20]:
            ask(url, caption)
        for clients in CLIENTS:
            requests = clients * REQUESTS_PER_CLIENT
            chosen = [captions[i % len(captions)] for i in range(requests)]
            started = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                times = list(pool.map(lambda caption: ask(url, caption), chosen))
            wall = time.perf_counter() - started
            rows.append({"kind": kind, "where": "HTTP 127.0.0.1", "clients": clients, "start-up s": startup,
                         "queries/s": requests / wall, **percentiles(times)})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_COUNT:,} gallery rows")
    parser.add_argument("--count", type=int, default=None)
    parser.add_argument("--kinds", default="flat,hnsw")
    parser.add_argument("--in-process", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.in_process:
        captions = (args.folder / "data/q/test_caps.txt").read_text().splitlines()
        print(json.dumps(warm_queries(args.folder, args.in_process, captions)))
        return
    count = args.count or (QUICK_COUNT if args.quick else FULL_COUNT)
    kinds = args.kinds.split(",")
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as work:
        folder = Path(work)
        captions = build_project(folder, count, kinds)
        rows: list[dict[str, Any]] = []
        for kind in kinds:
            rows.append(in_process(folder, kind, captions))
            rows.extend(over_http(folder, kind, captions))
    report("serve_search", rows, [
        f"{count:,} gallery rows (the quickstart model's image embeddings, D from its export), one caption per "
        f"request, k = {K}; over HTTP: mlflow models serve (uvicorn, its default workers), {REQUESTS_PER_CLIENT} "
        "requests per client; start-up: loading and checking the model (in process) or launch to first /ping.",
    ])  # fmt: skip


if __name__ == "__main__":
    main()
