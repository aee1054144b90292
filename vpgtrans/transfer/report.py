"""The speed-up report of `vpgtrans transfer --compare-scratch`: curves, time to the scratch run's best, ratio."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from ..checkpoint import atomic_write_text
from ..plot import joined_rows  # noqa: F401 - the stages' logs on one axis, part of the report's API

# Metrics where smaller is better; every other metric (cider, accuracy, ...) is better when larger.
LOWER_IS_BETTER = ("val_loss", "loss", "perplexity")
Point = dict[str, float]


def lower_is_better(metric: str) -> bool:
    """True for loss-like metrics."""
    return metric in LOWER_IS_BETTER or metric.endswith("loss")


def eval_curve(rows: Sequence[dict[str, Any]], metric: str, offset: Point | None = None) -> list[Point]:
    """(step, samples, wall_time, value) of every logged evaluation of `metric`, shifted by `offset`."""
    off = offset or {"step": 0, "samples": 0, "wall_time": 0.0}
    out = []
    for row in rows:
        value = (row.get("metrics") or {}).get(metric)
        if isinstance(value, (int, float)):
            out.append({"step": row["step"] + off["step"], "samples": row["samples"] + off["samples"],
                        "wall_time": round(row["wall_time"] + off["wall_time"], 3), "value": float(value)})
    return out


def transfer_curve(stage_dirs: Sequence[Path], metric: str, fit_seconds: float = 0.0) -> list[Point]:
    """Evaluations of a transfer's consecutive stages on one axis: warm-up steps and the converter fit count."""
    return eval_curve(joined_rows(stage_dirs), metric, {"step": 0, "samples": 0, "wall_time": fit_seconds})


def first_reaching(curve: Sequence[Point], target: float, lower: bool) -> Point | None:
    """The first point whose value is at least as good as `target`."""
    for p in curve:
        if (p["value"] <= target) if lower else (p["value"] >= target):
            return p
    return None


def plateau(curve: Sequence[Point], metric: str, tol: float = 0.01, window: float = 0.25,
            min_evals: int = 4) -> Point | None:
    """First evaluation where the best so far beats the best before the last `window` of steps by < `tol`.

    The window must hold at least `min_evals` evaluations: a slow start (a few flat early evaluations) is not
    a plateau.
    """
    lower = lower_is_better(metric)
    pick = min if lower else max
    for i, p in enumerate(curve):
        edge = (1.0 - window) * p["step"]
        before = [q["value"] for q in curve[:i + 1] if q["step"] <= edge]
        if not before or sum(q["step"] > edge for q in curve[:i + 1]) < min_evals:
            continue
        old, new = pick(before), pick(q["value"] for q in curve[:i + 1])
        gain = (old - new) if lower else (new - old)
        if gain < tol * abs(old):
            return p
    return None


def until_plateau(curve: Sequence[Point], metric: str, tol: float = 0.01, window: float = 0.25,
                  min_evals: int = 4) -> tuple[list[Point], Point | None]:
    """The curve as a run stopped by the plateau rule would have logged it, and the stopping point (None: cap)."""
    stop = plateau(curve, metric, tol, window, min_evals)
    return ([p for p in curve if p["step"] <= stop["step"]] if stop else list(curve)), stop


def speedup(vpgtrans_curve: Sequence[Point], scratch_curve: Sequence[Point], metric: str) -> dict[str, Any]:
    """Paper's ratio: steps for scratch to reach its best ÷ steps for VPGTrans to match it (warm-up included)."""
    lower = lower_is_better(metric)
    if not scratch_curve:
        return {"metric": metric, "error": "the scratch run logged no evaluation of this metric"}
    best = (min if lower else max)(p["value"] for p in scratch_curve)
    scratch_at = first_reaching(scratch_curve, best, lower)
    ours_at = first_reaching(vpgtrans_curve, best, lower)
    report: dict[str, Any] = {"metric": metric, "direction": "lower" if lower else "higher",
                              "scratch_best": best, "scratch": scratch_at, "vpgtrans": ours_at,
                              "vpgtrans_best": ((min if lower else max)(p["value"] for p in vpgtrans_curve)
                                                if vpgtrans_curve else None)}
    for key in ("step", "samples", "wall_time"):
        ratio = None
        if ours_at and ours_at[key] > 0:
            ratio = round(scratch_at[key] / ours_at[key], 3)
        report[f"speedup_{key}" if key != "step" else "speedup"] = ratio
    return report


def catch_up(vpgtrans_curve: Sequence[Point], scratch_curve: Sequence[Point], metric: str) -> list[dict[str, Any]]:
    """For every scratch evaluation: its value, and the samples VPGTrans needed to first reach it (None: never).

    The paper's ratio reads one point, scratch's best; this is the whole race, so a head start that scratch
    catches up on late is visible (and a ratio below 1 is not hidden either)."""
    lower = lower_is_better(metric)
    out = []
    for p in scratch_curve:
        hit = first_reaching(vpgtrans_curve, p["value"], lower)
        out.append({"scratch_step": p["step"], "scratch_samples": p["samples"], "value": p["value"],
                    "vpgtrans_step": hit["step"] if hit else None, "vpgtrans_samples": hit["samples"] if hit else None,
                    "ratio_samples": round(p["samples"] / hit["samples"], 2) if hit and hit["samples"] else None})
    return out


def catch_up_lines(rows: Sequence[dict[str, Any]], metric: str, limit: int = 10) -> list[str]:
    """The race as three printed rows (scratch step, its value, VPGTrans's step to reach it, warm-up counted)."""
    if not rows:
        return []
    step = max(1, -(-len(rows) // limit))
    shown = list(rows[step - 1::step])
    if shown[-1] is not rows[-1]:
        shown.append(rows[-1])
    cell = 8
    return [f"the race: when VPGTrans (warm-up included) first reached scratch's {metric} at each scratch evaluation",
            f"{'scratch step':<16}" + "".join(f"{r['scratch_step']:>{cell}}" for r in shown),
            f"{metric:<16}" + "".join(f"{r['value']:>{cell}.4f}" for r in shown),
            f"{'VPGTrans step':<16}" + "".join(f"{r['vpgtrans_step'] if r['vpgtrans_step'] is not None else '-':>{cell}}"
                                                 for r in shown),
            f"{'ratio, samples':<16}" + "".join(f"{(str(r['ratio_samples']) + 'x') if r['ratio_samples'] else '-':>{cell}}"
                                                  for r in shown)]


def table(report: dict[str, Any]) -> list[str]:
    """The speed-up as a printed table."""
    s = report
    lines = [f"speed-up to the scratch run's best {s['metric']} = {s['scratch_best']:.4g} "
             f"({s['direction']} is better)",
             f"{'run':<10}{'steps':>8}{'samples':>10}{'wall s':>10}"]
    for name in ("scratch", "vpgtrans"):
        p = s.get(name)
        lines.append(f"{name:<10}" + (f"{p['step']:>8}{p['samples']:>10}{p['wall_time']:>10.1f}" if p
                                      else f"{'never reached':>28}"))
    ratio = s.get("speedup")
    cells = [f"{s[k]:.2f}x" if s.get(k) else "-" for k in ("speedup", "speedup_samples", "speedup_wall_time")]
    lines.append(f"{'ratio':<10}{cells[0]:>8}{cells[1]:>10}{cells[2]:>10}")
    return lines


def write_json(path: Path, data: dict[str, Any]) -> None:
    """report.json, atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, default=str))
