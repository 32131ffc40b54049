"""CLI cold start and ``gssf prepare`` wall times.

Cold start: ``gssf --help`` as a fresh process (target <= 0.3 s on the reference machine), side by side
with a bare ``python -c pass`` and with ``python -c "import torch"`` (what the start would cost if the CLI
imported torch eagerly). Prepare: the default synthetic dataset and digits, each a fresh process, with the
tracking store in a temporary folder. A bad ``gssf tune`` parameter: how long until the one-line error (it is
checked before Ray is imported; the tests check that it fails with exit 2 and never imports Ray, this measures
how fast).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report


def _gssf_exe() -> list[str]:
    exe = shutil.which("gssf") or str(Path(sys.executable).with_name("gssf"))
    return [exe] if Path(exe).exists() else [sys.executable, "-m", "gssf_cli"]


def _time(cmd: list[str], repeats: int, cwd: Path | None = None, exit_code: int = 0) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        done = subprocess.run(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if done.returncode != exit_code:
            raise SystemExit(f"{' '.join(cmd)} exited {done.returncode}, expected {exit_code}")
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    repeats = 3 if args.quick else 15
    rows = []
    help_times = _time([*_gssf_exe(), "--help"], repeats)
    bare = _time([sys.executable, "-c", "pass"], repeats)
    torch_import = _time([sys.executable, "-c", "import torch"], max(3, repeats // 3))
    rows.append({"what": "gssf --help", "median_s": statistics.median(help_times), "min_s": min(help_times)})
    rows.append({"what": "python -c pass", "median_s": statistics.median(bare), "min_s": min(bare)})
    rows.append({"what": "python -c 'import torch'", "median_s": statistics.median(torch_import),
                 "min_s": min(torch_import)})  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in (
            ("synthetic (defaults)", ["--dataset", "synthetic"]),
            ("digits", ["--dataset", "digits"]),
        ):
            out = f"data/{extra[1]}"
            times = _time([*_gssf_exe(), "prepare", *extra, "--out", out, "--force"], 1 if args.quick else 3, Path(tmp))
            rows.append({"what": f"gssf prepare {name}", "median_s": statistics.median(times), "min_s": min(times)})
        bad_tune = [
            *_gssf_exe(),
            "tune",
            "--data",
            "data/synthetic",
            "--param",
            "block_size=7",
            "--base",
            "metric=bdiag",
        ]
        times = _time(bad_tune, 1 if args.quick else 3, Path(tmp), exit_code=2)
        rows.append({"what": "gssf tune with a bad --param (exit 2)", "median_s": statistics.median(times),
                     "min_s": min(times)})  # fmt: skip
    over_bare = statistics.median(help_times) / statistics.median(bare)
    notes = [
        f"gssf --help median {statistics.median(help_times):.3f} s (target <= 0.3 s); "
        f"{over_bare:.1f}x a bare interpreter start; prepare times include MLflow start-up and logging."
    ]
    report("cli", rows, notes)


if __name__ == "__main__":
    main()
