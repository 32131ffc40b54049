"""How many CPU cores are free for this process's threads: the default thread count of a pool that waits at barriers.

Why: an OpenMP team (torch's GEMMs, faiss) makes every parallel region wait for its slowest thread. When another
process holds a core, the team's thread on it is descheduled for a whole time slice at a time, and a region of a
few microseconds costs milliseconds. Measured with the quickstart's training (D = 64, 4 epochs, 2 cores; in
docs/commands.md): 7.5 s quiet with 1 or 2 threads; beside one busy process per core 10 s with 1 thread and
12–174 s with 2 (one first epoch took 26 s instead of 1.6 s); beside one busy process, 7.5 s and up to 97 s.
A team no larger than the idle cores never waits for a core that someone else holds.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

SAMPLES = 5
"""Readings of the run queue, :data:`SAMPLE_SECONDS` apart: their median ignores a brief burst or lull."""
SAMPLE_SECONDS = 0.005


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, where the system says; else every core)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def runnable_threads(stat: Path = Path("/proc/stat")) -> int | None:
    """Threads running or ready to run on the whole machine now, the caller included (``procs_running`` of
    ``/proc/stat``); None where the system does not say."""
    try:
        for line in stat.read_text().splitlines():
            if line.startswith("procs_running "):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def free_cores(samples: int = SAMPLES) -> int:
    """The usable cores less the threads of other processes that are running now (the median of ``samples``
    readings, the calling thread not counted); at least 1. Where the system does not say, every usable core."""
    cores = usable_cores()
    readings = []
    for index in range(samples):
        if index:
            time.sleep(SAMPLE_SECONDS)
        running = runnable_threads()
        if running is None:
            return cores
        readings.append(running)
    others = max(0, round(statistics.median(readings)) - 1)
    return max(1, min(cores, cores - others))
