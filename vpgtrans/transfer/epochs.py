"""Training read in epochs, the paper's way (arXiv 2305.01278 Table 3): per-epoch curves and the speed-up formula.

Table 3's speed-up = epochs TFS (a VPG trained from scratch) needs to reach its best ÷ epochs VPGTrans needs to
reach that value, the warm-up counted as VPGTrans's epoch 1; "-" (None here) when VPGTrans never does. Used by
`vpgtrans demo` and by benchmarks/transfer_efficiency.py --protocol paper / --diagnose.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from . import report as rep


def steps_per_epoch(train_file: str | Path, fraction: float, seed: int, batch_size: int) -> tuple[int, int]:
    """(training examples one epoch passes over, optimiser steps per epoch) for a seeded `fraction` of the file."""
    from ..data.dataset import fraction_subset

    with open(train_file) as f:
        n = sum(1 for line in f if line.strip())
    used = len(fraction_subset(range(n), fraction, seed)) if fraction < 1 else n
    return used, max(1, used // batch_size)


def epoch_curve(run_dirs: Sequence[Path], per_epoch: int, batch_size: int | None = None) -> list[dict[str, Any]]:
    """One point per evaluation: epoch, step, samples, wall time, every logged metric.

    The epoch is steps ÷ `per_epoch`, or with `batch_size` samples ÷ (`per_epoch` x `batch_size`): stages trained
    with different batches (a warm-up with its own) then share one axis."""
    out = []
    for row in rep.joined_rows(list(run_dirs)):
        m = row.get("metrics") or {}
        if "val_loss" in m or "cider" in m:
            epoch = row["samples"] / (per_epoch * batch_size) if batch_size else row["step"] / per_epoch
            out.append({"epoch": round(epoch, 3), "step": row["step"],
                        "samples": row["samples"], "wall_time": row["wall_time"],
                        **{k: round(float(v), 5) for k, v in m.items() if isinstance(v, (int, float))}})
    return out


def first_surpassing(curve: Sequence[dict[str, Any]], metric: str, target: float, higher: bool) -> dict | None:
    """The first point at least as good as `target` (a tie counts, as report.first_reaching)."""
    for p in curve:
        if metric in p and (p[metric] >= target if higher else p[metric] <= target):
            return p
    return None


def best_point(curve: Sequence[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """The first point holding the curve's best value of `metric` (None when it was never logged)."""
    pts = [p for p in curve if metric in p]
    if not pts:
        return None
    value = (min if rep.lower_is_better(metric) else max)(p[metric] for p in pts)
    return next(p for p in pts if p[metric] == value)


def table3_speedups(tfs_curve: Sequence[dict[str, Any]], ours: Sequence[dict[str, Any]],
                    metrics: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per metric: TFS's best and its epoch, the epoch (and samples) VPGTrans first reached it, both ratios."""
    out = {}
    for m in metrics:
        tfs_at = best_point(tfs_curve, m)
        if tfs_at is None:
            continue
        hit = first_surpassing(ours, m, tfs_at[m], not rep.lower_is_better(m))
        out[m] = {"tfs_best": tfs_at[m], "tfs_epoch": tfs_at["epoch"], "tfs_samples": tfs_at["samples"],
                  "vpgtrans_epoch": hit["epoch"] if hit else None, "vpgtrans_samples": hit["samples"] if hit else None,
                  "speedup_epochs": round(tfs_at["epoch"] / hit["epoch"], 3) if hit and hit["epoch"] else None,
                  "speedup_samples": round(tfs_at["samples"] / hit["samples"], 3) if hit and hit["samples"] else None}
    return out
