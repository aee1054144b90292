"""How many torch threads a command uses: fast on a busy small machine, overridable, and stated in the plan.

Default: one thread per physical core (hyper-threads only contend for the same units), and a single thread
when the machine is already loaded (1-minute load average at or above the core count): spinning OpenMP
workers that wait for busy cores make each step several times slower. `OMP_NUM_THREADS` or `--threads N`
win over the default.
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
    if cores > 1 and load >= cores:
        return 1, f"load {load:.1f} on {cores} cores: one thread is faster on a busy machine; --threads N to change"
    return cores, f"{cores} physical cores, load {load:.1f}; --threads N or OMP_NUM_THREADS to change"


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
