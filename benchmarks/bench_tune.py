"""What Ray Tune costs ``gssf tune``: Ray's start-up, and the wall time of K trials against running them without Ray.

Three ways to run the same K trainings (a block-size grid, 1 thread each), side by side in one run:

- serial: one after another in this process (the sum of the trainings' own times);
- plain processes: P worker processes at once (``concurrent.futures``, spawn), no Ray — the best a scheduler
  can do on this machine, worker start-up and imports included;
- ``gssf tune``: ``gssf_cli.stages.tune.run`` as the command runs it — local Ray started and stopped, FIFO,
  P trials at once, every trial logged to a SQLite MLflow store by the driver.

Ratios: the tune's wall time (Ray start-up excluded) against the plain processes (target <= 1.25x), against
the sum of Ray's own trial times / P (the issue's definition), and against serial / P (which also counts how
far this machine is from P-fold parallel speed-up — two busy cores do not give twice the throughput on every
machine). Ray start-up is measured in fresh processes (import + ``ray.init`` + ``ray.shutdown``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

BASE = ["embed_dim=128", "word_dim=32", "batch_size=64", "lr=0.002", "metric=bdiag"]

RAY_START = """
import json, logging, shutil, tempfile, time
started = time.perf_counter()
import ray
from ray import tune
imported = time.perf_counter()
temp = tempfile.mkdtemp(prefix="gssf-ray-")
ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, log_to_driver=False, logging_level=logging.ERROR)
ready = time.perf_counter()
ray.shutdown()
stopped = time.perf_counter()
shutil.rmtree(temp, ignore_errors=True)
print(json.dumps({"import_s": imported - started, "init_s": ready - imported, "shutdown_s": stopped - ready}))
"""


def ray_start(repeats: int) -> list[dict[str, float]]:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", RAY_START], capture_output=True, text=True, check=True, env=env)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return runs


def train_one(data: str, epochs: int, block_size: int) -> float:
    """One trial's training, as a tune trial runs it (1 thread, no tracker); returns its seconds."""
    import torch

    from gssf_cli.core.config import resolve
    from gssf_cli.core.stage_configs import TrainConfig
    from gssf_cli.stages import train
    from gssf_cli.training.tune_plan import parse_overrides

    torch.set_num_threads(1)
    values = {**parse_overrides(BASE), "data": data, "epochs": epochs, "threads": 1, "block_size": block_size}
    started = time.perf_counter()
    train.run(resolve(TrainConfig, "train", values), tracker=None)
    return time.perf_counter() - started


def tune_overhead(quick: bool, parallel: int) -> dict[str, Any]:
    """Run the three variants in a scratch working directory (dataset, MLflow store, Ray results), then remove it."""
    home = Path.cwd()
    work = Path(tempfile.mkdtemp(prefix="gssf-bench-tune-"))
    os.chdir(work)
    try:
        return _measure(quick, parallel, work)
    finally:
        os.chdir(home)
        shutil.rmtree(work, ignore_errors=True)


def _measure(quick: bool, parallel: int, work: Path) -> dict[str, Any]:
    from gssf_cli.core.stage_configs import PrepareConfig, TuneConfig
    from gssf_cli.stages import prepare
    from gssf_cli.stages import tune as tune_stage
    from gssf_cli.tracking.adapter import Tracker

    sizes = [1, 2, 4, 8] if quick else [1, 2, 4, 8, 16, 32, 64, 128]
    train_images, epochs = (400, 2) if quick else (2000, 4)
    data = work / "data" / "syn"
    prepare.run(PrepareConfig(dataset="synthetic", out=data, train_images=train_images, dev_images=100, test_images=20))

    serial = [train_one(str(data), epochs, size) for size in sizes]

    started = time.perf_counter()
    env_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    with ProcessPoolExecutor(max_workers=parallel, mp_context=get_context("spawn")) as pool:
        list(pool.map(train_one, [str(data)] * len(sizes), [epochs] * len(sizes), sizes))
    plain_wall = time.perf_counter() - started
    if env_threads is None:
        os.environ.pop("OMP_NUM_THREADS")
    else:
        os.environ["OMP_NUM_THREADS"] = env_threads

    config = TuneConfig(
        params=(f"block_size={','.join(map(str, sizes))}",),
        data=data,
        base=tuple(BASE),
        epochs=epochs,
        scheduler="fifo",
        cpus_per_trial=1,
        max_concurrent=parallel,
    )
    started = time.perf_counter()
    result = tune_stage.run(config, Tracker(), progress=False)
    wall = time.perf_counter() - started
    tune_excl = wall - result.ray_start_seconds
    return {
        "trials": len(sizes),
        "parallel": parallel,
        "epochs": epochs,
        "serial_s": sum(serial),
        "plain_wall_s": plain_wall,
        "tune_wall_s": wall,
        "ray_start_s": result.ray_start_seconds,
        "ray_trial_s": result.trial_seconds,
        "ratio_vs_plain": tune_excl / plain_wall,
        "ratio_vs_plain_incl_start": wall / plain_wall,
        "ratio_vs_ray_trial_times": tune_excl / (result.trial_seconds / parallel),
        "ratio_vs_serial_over_p": tune_excl / (sum(serial) / parallel),
        "machine_parallel_speedup": sum(serial) / plain_wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="4 short trials and 2 Ray start-ups")
    args = parser.parse_args()
    parallel = min(2, os.cpu_count() or 1)
    starts = ray_start(2 if args.quick else 3)
    o = tune_overhead(args.quick, parallel)
    label = f"{o['trials']} trials x {o['epochs']} epochs"
    rows = [
        {"measure": "import ray + ray.tune (fresh process)", "value": _median(starts, "import_s"), "unit": "s"},
        {"measure": "ray.init, local, 2 CPUs", "value": _median(starts, "init_s"), "unit": "s"},
        {"measure": "ray.shutdown", "value": _median(starts, "shutdown_s"), "unit": "s"},
        {"measure": f"serial, in process ({label})", "value": o["serial_s"], "unit": "s"},
        {"measure": f"plain processes, {o['parallel']} at once, no Ray", "value": o["plain_wall_s"], "unit": "s"},
        {"measure": f"gssf tune, {o['parallel']} at once (all in)", "value": o["tune_wall_s"], "unit": "s"},
        {"measure": "  of which Ray start-up", "value": o["ray_start_s"], "unit": "s"},
        {"measure": "  sum of Ray's trial times", "value": o["ray_trial_s"], "unit": "s"},
        {"measure": "tune (excl. Ray start) / plain processes", "value": o["ratio_vs_plain"], "unit": "x"},
        {"measure": "tune (incl. Ray start) / plain processes", "value": o["ratio_vs_plain_incl_start"], "unit": "x"},
        {"measure": "tune (excl. start) / (Ray trial times / P)", "value": o["ratio_vs_ray_trial_times"], "unit": "x"},
        {"measure": "tune (excl. start) / (serial / P)", "value": o["ratio_vs_serial_over_p"], "unit": "x"},
        {"measure": "machine: serial / plain processes", "value": o["machine_parallel_speedup"], "unit": "x"},
    ]
    notes = [
        f"Ray start-up: median of {len(starts)} fresh processes. Target: tune (excl. Ray start) <= 1.25x the "
        "plain processes, and <= 1.25x the sum of Ray's trial times / P.",
        "Fixed costs inside the tune's wall time: trial processes starting and importing torch (once per "
        "worker: actors are reused), Ray's scheduling, the driver's MLflow logging of every trial, ray.shutdown"
        + (
            " — --quick trials last ~1-2 s, so its ratios show these fixed costs, not the steady state."
            if args.quick
            else "."
        ),
    ]
    report("tune" + ("_quick" if args.quick else ""), rows, notes)


def _median(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


if __name__ == "__main__":
    main()
