"""How many torch threads a command uses: fast on a busy small machine, overridable, and stated in the plan.

Default: one thread per physical core (hyper-threads only contend for the same units), and a single thread
when the machine is already loaded — as many other processes running right now as there are cores, or a
1-minute load average at or above the core count while any other process runs: spinning OpenMP workers that
wait for busy cores make each step several times slower. The load average lags a minute behind the machine
(a job that has just started, or one that has just ended), hence the look at the run queue.
`OMP_NUM_THREADS` or `--threads N` win over the default.
"""

from __future__ import annotations

import os
from typing import Callable


def physical_cores() -> int:
    """Physical cores this process may run on (/proc/cpuinfo core ids; else the logical CPU count)."""
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        cores, phys = set(), None
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "physical id":
                    phys = value.strip()
                elif key == "core id":
                    cores.add((phys, value.strip()))
        if cores:
            return max(1, min(logical, len(cores)))
    except OSError:
        pass
    return max(1, logical)


def running_others(samples: int = 5, interval: float = 0.02) -> int:
    """Processes running or runnable now besides this one (median of a few reads of /proc/stat; 0 if unknown)."""
    import statistics
    import time

    seen = []
    for i in range(samples):
        try:
            with open("/proc/stat", encoding="ascii") as f:
                line = next((x for x in f if x.startswith("procs_running")), "")
            seen.append(max(0, int(line.split()[1]) - 1))
        except (OSError, ValueError, IndexError):
            return 0
        if i + 1 < samples:
            time.sleep(interval)
    return int(statistics.median(seen))


def choose_threads(requested: int | None = None) -> tuple[int, str]:
    """(threads, why) from --threads, then OMP_NUM_THREADS, then the load-aware default."""
    if requested:
        return requested, "--threads"
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    cores = physical_cores()
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        load = 0.0
    others = running_others() if cores > 1 else 0
    if cores > 1 and others >= cores:
        return 1, (f"{others} other processes running on {cores} cores: one thread is faster on a busy machine; "
                   "--threads N to change")
    # A high load average with nothing else running now is this command's own previous phase (e.g. the world
    # build's worker processes a moment ago): the machine is idle again.
    if cores > 1 and load >= cores and others > 0:
        return 1, (f"load {load:.1f} on {cores} cores, {others} other process(es) running: one thread is faster "
                   "on a busy machine; --threads N to change")
    return cores, (f"{cores} physical cores, load {load:.1f}, {others} other process(es) running; --threads N or "
                   "OMP_NUM_THREADS to change")


def apply_threads(requested: int | None = None) -> str:
    """Set torch's intra-op threads; the plan line saying how many and why."""
    import torch

    n, why = choose_threads(requested)
    torch.set_num_threads(n)
    return f"threads {n} ({why})"


def announce_before(line: str, echo: Callable[[str], None]) -> Callable[[str], None]:
    """An echo that prints `line` before the first thing the command prints (nothing if it fails first)."""
    pending = [line]

    def wrapped(text: str) -> None:
        while pending:
            echo(pending.pop())
        echo(text)

    return wrapped
