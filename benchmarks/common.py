"""Shared helpers for benchmarks: a machine label and a uniform way to print and save results.

Benchmarks are measurements, never pass/fail tests: each script prints its figures (ratios measured side
by side in one run, plus absolute figures labelled with the machine) and writes them as JSON next to the
script under ``benchmarks/results/`` so that a later run can be compared.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SPIN = "while True: pass"


def machine_label() -> str:
    """One line naming what the absolute figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB, "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}"
    )


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB.

    Reads VmHWM: ``ru_maxrss`` survives fork + exec on Linux, so a child of a large parent would report the
    parent's peak.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def resident_mib() -> dict[str, float]:
    """This process's resident memory now, in MiB: ``anon`` (its own allocations: an index in RAM), ``file``
    (file pages mapped and touched: libraries, and memory-mapped data the kernel may drop and re-read) and
    ``peak`` (VmHWM, both together at their highest). Empty where ``/proc/self/status`` is unreadable."""
    fields = {"RssAnon:": "anon", "RssFile:": "file", "VmHWM:": "peak"}
    found: dict[str, float] = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                name, *rest = line.split()
                if name in fields:
                    found[fields[name]] = int(rest[0]) / 1024
    except OSError:
        pass
    return found


@contextmanager
def competing_load(processes: int) -> Iterator[None]:
    """``processes`` busy-loop interpreters (one per core), stopped by pid on exit.

    Why: a shared machine is the normal case (CI runners, a colleague's job), so benchmarks measure "quiet" and
    "loaded" the same way: this load, started by the benchmark itself, beside the measured process.
    """
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(processes)]
    try:
        time.sleep(0.5)
        yield
    finally:
        for proc in spinners:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def report(name: str, rows: list[dict[str, Any]], notes: list[str] | None = None) -> None:
    """Print ``rows`` as a table headed by the machine label and save them to ``results/NAME.json``."""
    from rich.console import Console
    from rich.table import Table

    label = machine_label()
    table = Table(title=f"{name} — {label}")
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*(_fmt(row.get(c, "")) for c in columns))
    console = Console(width=max(120, len(label) + 20))
    console.print(table)
    for note in notes or []:
        console.print(note)
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"{name}.json"
    out.write_text(json.dumps({"machine": label, "rows": rows, "notes": notes or []}, indent=2) + "\n")
    print(f"saved {out}", file=sys.stderr)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
