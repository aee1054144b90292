"""How many torch threads a command uses, and the CPU numerics it runs with: the same figures everywhere.

Default: one thread, whatever the machine and its load. Measured on the tiny world (issue 32): the world
build (one thread since 2026-11-29) gives the same weights under OMP_NUM_THREADS 1 and 2, but training at 2
threads gives other losses than at 1 (floating-point sums in another order), and the old load-aware default
chose 1 or 2 threads by the load of the moment — so the demo printed different figures on a busy machine.
One thread is also what a busy machine wants: 2 threads on 2 cores beside another CPU-bound job wait for a
core at every parallel region. `--threads N` asks for more (faster on an idle machine; figures then differ
in their last digits from a one-thread run).

The instruction set changes the figures too: the same tiny world built with torch's AVX2 kernels differs from
its AVX-512 build in every weight file (converter cosines in the 4th digit). `pin_cpu_numerics` therefore
selects AVX2 kernels (torch, oneDNN) and MKL's AVX2 reproducibility branch on every x86-64 CPU that has AVX2,
before torch loads, and makes OpenMP threads sleep instead of spin while they wait.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

# Defaults only (a value the user set wins). Read once when torch loads, hence set before that.
NUMERIC_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",  # torch's vectorised CPU kernels (sum, softmax, layer norm, ...)
    "MKL_CBWR": "AVX2",             # MKL's conditional numerical reproducibility: one code path on every AVX2 CPU
    "ONEDNN_MAX_CPU_ISA": "AVX2",   # oneDNN (convolutions: the ViT's patch embedding)
}
# Waiting OpenMP threads sleep instead of spinning: when another job takes a core mid-run, a spinning
# thread burns the core its partner needs (issue 32: 32 steps/s fell to 3 s/step at 2 threads).
WAIT_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
THREADS_HELP = ("Torch threads (default 1: the same figures on every machine and under any load; more is faster "
                "on an idle machine, with figures that differ in the last digits).")


def has_avx2() -> bool:
    """True when /proc/cpuinfo lists AVX2 (x86-64 Linux); False elsewhere or when unknown."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return "avx2" in line.split()
    except OSError:
        pass
    return False


def pin_cpu_numerics() -> bool:
    """Set NUMERIC_ENV (AVX2 CPUs only) and WAIT_ENV as defaults before torch loads; False (nothing set) after."""
    if "torch" in sys.modules:
        # Too late for this process, and worker processes it spawns would inherit the setting: the world's LMs
        # trained in workers would then differ from the same LMs trained here.
        return False
    # ATEN_CPU_CAPABILITY=avx2 is obeyed without a hardware check: on a CPU without AVX2 it would crash.
    wanted = {**(NUMERIC_ENV if has_avx2() else {}), **WAIT_ENV}
    for key, value in wanted.items():
        os.environ.setdefault(key, value)
    return True


def cpu_kernels() -> str:
    """The instruction set torch's CPU kernels use in this process (e.g. 'AVX2'), or 'unknown'."""
    import torch

    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return "unknown"


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
    """(threads, why): --threads when given, else one thread (OMP_NUM_THREADS is not read: figures would vary)."""
    if requested:
        return requested, "--threads" + ("; figures differ in the last digits from the one-thread default"
                                         if requested > 1 else "")
    why = "the default: the same figures on every machine and under any load; --threads N for more"
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env and env != "1":
        why += f"; OMP_NUM_THREADS={env} is not used"
    return 1, why


def apply_threads(requested: int | None = None) -> str:
    """Set torch's intra-op threads; the plan line saying how many, why, and which CPU kernels run."""
    import torch

    n, why = choose_threads(requested)
    torch.set_num_threads(n)
    return f"threads {n} ({why}); CPU kernels {cpu_kernels()}"


def announce_before(line: str, echo: Callable[[str], None]) -> Callable[[str], None]:
    """An echo that prints `line` before the first thing the command prints (nothing if it fails first)."""
    pending = [line]

    def wrapped(text: str) -> None:
        while pending:
            echo(pending.pop())
        echo(text)

    return wrapped
