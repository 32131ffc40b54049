"""What Ray Tune costs ``gssf tune``: Ray's start-up, and the wall time of K trials against the ideal.

Ideal = the same K trainings run one after another in this process (1 thread each, as a trial has with
``--cpus-per-trial 1``), divided by the parallelism P (trials at once). The tune is ``gssf_cli.stages.tune.run``
as the command runs it — local Ray started and stopped, FIFO, P trials at once, every trial logged to a
SQLite MLflow store by the driver. Ratios are measured side by side in one run (target: tune wall time, Ray
start-up excluded, <= 1.25x the ideal); Ray start-up is measured in fresh processes (import + ``ray.init``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

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


def tune_overhead(quick: bool, parallel: int) -> dict[str, float]:
    import torch

    from gssf_cli.config import PrepareConfig, TrainConfig, TuneConfig, resolve
    from gssf_cli.stages import prepare
    from gssf_cli.stages import train as train_stage
    from gssf_cli.stages import tune as tune_stage
    from gssf_cli.tracking import Tracker
    from gssf_cli.tuning import parse_overrides

    sizes = [1, 2, 4, 8] if quick else [1, 2, 4, 8, 16, 32, 64, 128]
    train_images, epochs = (400, 2) if quick else (2000, 4)
    base = ["embed_dim=128", "word_dim=32", "batch_size=64", "lr=0.002", "metric=bdiag"]
    work = Path(tempfile.mkdtemp(prefix="gssf-bench-tune-"))
    os.chdir(work)
    data = work / "data" / "syn"
    prepare.run(PrepareConfig(dataset="synthetic", out=data, train_images=train_images, dev_images=100, test_images=20))
    torch.set_num_threads(1)
    serial = []
    for size in sizes:
        values = {**parse_overrides(base), "data": data, "epochs": epochs, "threads": 1, "block_size": size}
        config = resolve(TrainConfig, "train", values)
        started = time.perf_counter()
        train_stage.run(config, tracker=None, progress=False)
        serial.append(time.perf_counter() - started)
    config = TuneConfig(
        params=(f"block_size={','.join(map(str, sizes))}",),
        data=data,
        base=tuple(base),
        epochs=epochs,
        scheduler="fifo",
        cpus_per_trial=1,
        max_concurrent=parallel,
    )
    started = time.perf_counter()
    result = tune_stage.run(config, Tracker(), progress=False)
    wall = time.perf_counter() - started
    ideal = sum(serial) / parallel
    return {
        "trials": len(sizes),
        "parallel": parallel,
        "epochs": epochs,
        "serial_train_s": sum(serial),
        "ideal_s": ideal,
        "tune_wall_s": wall,
        "ray_start_s": result.ray_start_seconds,
        "ray_trial_s": result.trial_seconds,
        "ratio_excl_start": (wall - result.ray_start_seconds) / ideal,
        "ratio_incl_start": wall / ideal,
        "ratio_vs_ray_trial_times": (wall - result.ray_start_seconds) / (result.trial_seconds / parallel),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="4 short trials and 2 Ray start-ups")
    args = parser.parse_args()
    parallel = min(2, os.cpu_count() or 1)
    starts = ray_start(2 if args.quick else 3)
    o = tune_overhead(args.quick, parallel)
    label = f"{o['trials']} trials x {o['epochs']} epochs, {o['parallel']} at once"
    rows = [
        {"measure": "import ray + ray.tune (fresh process)", "value": _median(starts, "import_s"), "unit": "s"},
        {"measure": "ray.init, local, 2 CPUs", "value": _median(starts, "init_s"), "unit": "s"},
        {"measure": "ray.shutdown", "value": _median(starts, "shutdown_s"), "unit": "s"},
        {"measure": f"serial training, in process ({label})", "value": o["serial_train_s"], "unit": "s"},
        {"measure": "ideal = serial / parallelism", "value": o["ideal_s"], "unit": "s"},
        {"measure": "gssf tune wall time (Ray start, trials, MLflow, stop)", "value": o["tune_wall_s"], "unit": "s"},
        {"measure": "  of which Ray start-up", "value": o["ray_start_s"], "unit": "s"},
        {"measure": "sum of Ray's trial times (incl. imports in trials)", "value": o["ray_trial_s"], "unit": "s"},
        {"measure": "ratio: tune wall excl. Ray start / ideal", "value": o["ratio_excl_start"], "unit": "x"},
        {"measure": "ratio: tune wall incl. Ray start / ideal", "value": o["ratio_incl_start"], "unit": "x"},
        {
            "measure": "ratio: tune wall excl. start / (Ray trial times / P)",
            "value": o["ratio_vs_ray_trial_times"],
            "unit": "x",
        },
    ]
    notes = [
        f"Ray start-up: median of {len(starts)} fresh processes. Target: tune wall excl. Ray start <= 1.25x ideal.",
        "The tune's wall time also holds each trial process starting and importing torch (once per worker: "
        "actors are reused), Ray's scheduling, the driver's MLflow logging of every trial, and ray.shutdown: "
        "fixed costs that only long trials amortise"
        + (
            " (--quick trials last ~1-2 s: its ratios show the fixed costs, not the steady state)."
            if args.quick
            else "."
        ),
    ]
    report("tune" + ("_quick" if args.quick else ""), rows, notes)


def _median(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


if __name__ == "__main__":
    main()
