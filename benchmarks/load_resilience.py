"""Load resilience: a training stage whose machine gets busy halfway through (issue 32 item 2).

    python benchmarks/load_resilience.py                      # tiny world (built here), 200 steps, 3 arms
    python benchmarks/load_resilience.py --world-size full    # the default world at $VPGTRANS_HOME

Each arm (torch threads : OpenMP wait policy) trains the same BLIP-2 stage-2 stage (`vpgtrans train --recipe
blip2_stage2_world`, no evaluation until the end) twice: alone, then with one CPU-bound process started when
the stage reaches half its steps. It prints both training times (the log's wall time at the last step:
process start-up and the final evaluation excluded), their ratio and the second halves alone, next to the
load average and the number of other running processes just before each run — on a shared machine "alone"
is only as alone as the others allow, so compare rows measured at similar load.

Arms: `1:PASSIVE` (vpgtrans's default now: one thread; OpenMP threads sleep while waiting), `2:PASSIVE`,
`2:default` (before the fix: two threads, libgomp's own spin-then-sleep policy), `2:ACTIVE` (always spin).
Every arm runs with the same CPU kernels (vpgtrans.threads.NUMERIC_ENV on an AVX2 CPU); torch is imported
before vpgtrans in the child, so the arm's OMP_WAIT_POLICY is the one OpenMP reads.
Writes benchmarks/results/load_resilience.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import machine_info, write_json  # noqa: E402

from vpgtrans.threads import NUMERIC_ENV, WAIT_ENV, has_avx2, running_others  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CHILD = "import sys, torch; from vpgtrans.cli import main; main(sys.argv[1:], prog_name='vpgtrans')"
SPIN = "while True: pass"


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _rows(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    rows = []
    for line in log.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # the line being written right now
            break
    return [r for r in rows if "step" in r and "wall_time" in r]


def run_stage(home: Path, out: Path, steps: int, threads: int, policy: str, load: bool,
              timeout: float) -> dict[str, Any]:
    """One training stage in a child process; with `load`, a CPU-bound process from half its steps on."""
    env = {**os.environ, "VPGTRANS_HOME": str(home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           **(NUMERIC_ENV if has_avx2() else {})}
    env.pop("OMP_WAIT_POLICY", None)
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    cmd = [sys.executable, "-c", CHILD, "train", "--recipe", "blip2_stage2_world", "--out", str(out), "--force",
           "--no-progress", "--threads", str(threads), f"train.max_steps={steps}", "train.eval_every=1000000",
           "train.save_every=1000000", f"train.warmup_steps={max(1, steps // 12)}"]
    before = {"loadavg_1min": _loadavg(), "running_others": running_others()}
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    spinner, spin_at = None, None
    started = time.monotonic()
    try:
        while child.poll() is None:
            if time.monotonic() - started > timeout:
                raise SystemExit(f"error: the {threads}:{policy} stage ran past {timeout:.0f}s — raise --timeout "
                                 "or lower --steps")
            if load and spinner is None:
                rows = _rows(out / "log.jsonl")
                if rows and rows[-1]["step"] >= steps // 2:
                    spinner = subprocess.Popen([sys.executable, "-c", SPIN])
                    spin_at = rows[-1]
            time.sleep(0.05)
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
        if child.poll() is None:
            child.kill()
    output = child.stdout.read() if child.stdout else ""
    if child.returncode != 0:
        tail = output.strip().splitlines()[-1:] or ["(no output)"]
        raise SystemExit(f"error: the {threads}:{policy} stage failed: {tail[0]}")
    rows = _rows(out / "log.jsonl")
    total = rows[-1]["wall_time"]
    half = next(r for r in rows if r["step"] >= steps // 2)
    mark = spin_at or half
    return {"threads": threads, "wait_policy": policy, "extra_process": load, "steps": rows[-1]["step"],
            "train_s": round(total, 2), "second_half_s": round(total - mark["wall_time"], 2),
            "extra_process_from_step": spin_at["step"] if spin_at else None, "before": before,
            "after": {"loadavg_1min": _loadavg()}}


def ensure_world(size: str, home: Path, log: Any) -> Path:
    """The world under `home` (a tiny one is built there when absent; the full one must exist)."""
    world = home / "world"
    if (world / "world.json").exists():
        return world
    if size == "full":
        raise SystemExit(f"error: no world at {world} — run `vpgtrans world build` first, or use --world-size tiny")
    from vpgtrans.world import WorldConfig, build_world

    log(f"building a tiny world at {world}")
    return build_world(world, progress=lambda _: None, config=WorldConfig.preset("tiny"))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every arm alone and loaded; print the table and write the JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world-size", choices=["tiny", "full"], default="tiny")
    p.add_argument("--home", type=Path, default=None,
                   help="VPGTRANS_HOME holding the world (default: $VPGTRANS_HOME for full, a temp dir for tiny)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--arms", default="1:PASSIVE,2:PASSIVE,2:default",
                   help="comma-separated threads:policy, policy PASSIVE, ACTIVE or default (unset)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds one stage may take")
    p.add_argument("--out", type=Path, default=RESULTS / "load_resilience.json")
    args = p.parse_args(argv)
    # A kill runs the `finally` blocks too: no spinner or stage is left behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    arms = []
    for arm in args.arms.split(","):
        threads, _, policy = arm.partition(":")
        if not threads.isdigit() or int(threads) < 1 or policy not in ("PASSIVE", "ACTIVE", "default"):
            raise SystemExit(f"error: arm '{arm}' is not threads:policy — e.g. 2:PASSIVE (policy PASSIVE, ACTIVE "
                             "or default)")
        arms.append((int(threads), policy))
    if args.home is None and args.world_size == "full":
        args.home = Path(os.environ.get("VPGTRANS_HOME", Path.home() / ".cache" / "vpgtrans"))
    with tempfile.TemporaryDirectory(prefix="load-resilience-") as tmp:
        home = args.home or Path(tmp) / "home"
        ensure_world(args.world_size, home, print)
        results = []
        print("threads policy     alone s  loaded s  ratio  2nd half alone/loaded s   load before (alone/loaded)")
        for threads, policy in arms:
            # A folder per run: the poller must never read the previous run's log.
            alone = run_stage(home, Path(tmp) / f"{threads}-{policy}-alone", args.steps, threads, policy, False,
                              args.timeout)
            loaded = run_stage(home, Path(tmp) / f"{threads}-{policy}-loaded", args.steps, threads, policy, True,
                               args.timeout)
            ratio = round(loaded["train_s"] / alone["train_s"], 2)
            results.append({"arm": f"{threads}:{policy}", "alone": alone, "loaded": loaded, "ratio": ratio,
                            "second_half_ratio": round(loaded["second_half_s"] / alone["second_half_s"], 2)})
            print(f"{threads:>7} {policy:<9} {alone['train_s']:>8.1f} {loaded['train_s']:>9.1f} {ratio:>5.2f}x"
                  f"  {alone['second_half_s']:>9.1f} / {loaded['second_half_s']:<9.1f}"
                  f"   {alone['before']['loadavg_1min']} / {loaded['before']['loadavg_1min']}", flush=True)
    data = {"machine": machine_info(), "world_size": args.world_size, "steps": args.steps,
            "numeric_env": NUMERIC_ENV if has_avx2() else {}, "fixed_wait_env": WAIT_ENV, "arms": results}
    write_json(args.out, data)
    print(f"written: {args.out}")
    return data


if __name__ == "__main__":
    main()
