"""Training curves: a run's `log.jsonl` (or several runs, overlaid) rendered to a PNG.

One panel for the loss, one for the learning rate, and one per metric found in the rows (the
trainer's nested `metrics` dict and any other numeric field such as `grad_norm`); series that never
change are left out. Every directory the tool writes is accepted: a training run, a transfer (its
stages joined on one step axis with the warm-up shaded, scratch beside it, the speed-up threshold
drawn), the demo, and benchmark work folders (every run found inside). matplotlib is the optional
`plot` extra.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Sequence

from .errors import ConfigError, DataError

LOG_FILE = "log.jsonl"
PNG_FILE = "curves.png"
X_AXES = ("step", "samples", "wall_time", "epoch")
# Row fields that are positions along the run, not curves.
_NOT_CURVES = {"step", "samples", "wall_time", "epoch", "loss", "lr", "stage"}  # "stage": joined transfer logs


def read_rows(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of `<run_dir>/log.jsonl` (or of the file itself), skipping a half-written last line."""
    path = Path(run_dir)
    path = path / LOG_FILE if path.is_dir() else path
    if not path.exists():
        raise DataError(f"no training log at {path}", "pass a run directory written by `vpgtrans train`/`transfer`")
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _number(value: Any) -> float | None:
    # The run log writes NaN/inf as strings; those points are left out of the curves.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def curves(rows: Sequence[dict[str, Any]], x: str = "step") -> dict[str, tuple[list[float], list[float]]]:
    """name → (xs, ys) for loss, lr and every numeric metric, in the order they first appear."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for row in rows:
        xv = _number(row.get(x))
        if xv is None:
            continue
        flat = {k: v for k, v in row.items() if k != "metrics"}
        if isinstance(row.get("metrics"), dict):
            flat.update(row["metrics"])
        for key, value in flat.items():
            yv = _number(value)
            if yv is None or (key in _NOT_CURVES and key not in ("loss", "lr")):
                continue
            xs, ys = out.setdefault(key, ([], []))
            xs.append(xv)
            ys.append(yv)
    order = [k for k in ("loss", "lr") if k in out] + [k for k in out if k not in ("loss", "lr")]
    return {k: out[k] for k in order}


# Axis labels of well-known series; anything else is labelled with its own name.
Y_LABELS = {"loss": "training loss", "lr": "learning rate", "val_loss": "validation loss", "cider": "CIDEr (0-10)",
            "grad_norm": "gradient norm", "vqa_accuracy": "VQA accuracy", "attribute_accuracy": "attribute accuracy"}
X_LABELS = {"step": "optimiser steps (all stages)", "samples": "training samples", "wall_time": "wall time (s)",
            "epoch": "epoch"}
MAX_SERIES = 12


@dataclass
class Series:
    """One line set to draw: rows of a log, where its warm-up ends, and a threshold to draw (speed-up)."""

    label: str
    rows: list[dict[str, Any]]
    warmup_rows: int = 0  # the first N rows are the projector warm-up of a transfer
    threshold: dict[str, Any] = field(default_factory=dict)  # {"metric": ..., "value": ...}


def _threshold(run: Path) -> dict[str, Any]:
    """The scratch-best line a transfer's speed-up is read at (from its report.json), if any."""
    try:
        sp = json.loads((run / "report.json").read_text()).get("speedup") or {}
    except (OSError, ValueError):
        return {}
    return {"metric": sp["metric"], "value": sp["scratch_best"]} if "scratch_best" in sp else {}


def joined_rows(stage_dirs: Sequence[Path]) -> list[dict[str, Any]]:
    """Log rows of consecutive stages as one run: later stages continue the step/sample/time axes."""
    rows: list[dict[str, Any]] = []
    off = {"step": 0, "samples": 0, "wall_time": 0.0}
    for i, d in enumerate(stage_dirs):
        stage = read_rows(d) if (Path(d) / LOG_FILE).exists() else []  # a stage that never ran adds nothing
        for row in stage:
            rows.append({**row, "step": row["step"] + off["step"], "samples": row["samples"] + off["samples"],
                         "wall_time": round(row["wall_time"] + off["wall_time"], 3), "stage": i + 1})
        if stage:
            off = {k: rows[-1][k] for k in off}
    return rows


# A transfer's stage folders, warm-up first; runs made before the stages were named used stage1/ and stage2/.
TRANSFER_STAGES = (("warmup", "finetune"), ("stage1", "stage2"))


def _transfer_stages(run: Path) -> list[Path]:
    for names in TRANSFER_STAGES:
        found = [run / s for s in names if (run / s / LOG_FILE).exists()]
        if found:
            return found
    return []


def _transfer_series(run: Path, label: str) -> list[Series]:
    stages = _transfer_stages(run)
    warm = len(read_rows(stages[0])) if stages and stages[0].name in ("warmup", "stage1") else 0
    out = [Series(f"{label} VPGTrans".strip(), joined_rows(stages), warm, _threshold(run))]
    if (run / "scratch" / LOG_FILE).exists():
        out.append(Series(f"{label} scratch".strip(), read_rows(run / "scratch")))
    return out


def expand(path: str | Path, label: str | None = None) -> list[Series]:
    """The series a path holds: a log file, a run dir, a transfer dir, a demo dir, or a folder of runs."""
    path = Path(path)
    name = label if label is not None else (path.name or str(path))
    if path.is_file() or (path / LOG_FILE).exists():
        rows = read_rows(path)
        warm = sum(1 for r in rows if r.get("stage") == 1)  # a joined transfer log tags its stages
        return [Series(name, rows, warm if warm < len(rows) else 0)]
    if _transfer_stages(path):
        return _transfer_series(path, label or "")
    if not path.is_dir():
        raise DataError(f"no training log at {path}", "pass a run directory written by `vpgtrans train`/`transfer`")
    found: list[Series] = []
    for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if sub.name in ("checkpoints", "model", "curves", "tb", "converter"):
            continue
        try:
            found += expand(sub, f"{name}/{sub.name}" if label else sub.name)
        except DataError:
            continue
    if not found:
        raise DataError(f"no training log under {path}",
                        "pass a run directory written by `vpgtrans train`/`transfer`/`demo` (or its log.jsonl)")
    return found[:MAX_SERIES]


def _constant(values: Sequence[float]) -> bool:
    return len(values) > 1 and max(values) - min(values) <= 1e-9 * max(1.0, abs(max(values)))


def _matplotlib() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("plotting needs matplotlib, which is not installed",
                          "pip install vpgtrans[plot]") from None
    return Figure


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path | None = None, *, x: str = "step",
              labels: Sequence[str] | None = None, title: str | None = None,
              threshold: dict[str, Any] | None = None) -> Path:
    """Render one or more runs' logs into one PNG (default `<first run>/curves.png`); returns its path."""
    if x not in X_AXES:
        raise ConfigError(f"unknown x axis '{x}'", f"use one of {', '.join(X_AXES)}")
    if not run_dirs:
        raise ConfigError("no run directory given", "pass at least one run directory")
    if labels and len(labels) != len(run_dirs):
        raise ConfigError(f"{len(labels)} labels for {len(run_dirs)} runs", "give one label per run")
    series = [s for i, d in enumerate(run_dirs) for s in expand(d, labels[i] if labels else None)]
    fig = render(series, x, title=title, threshold=threshold, where=str(run_dirs[0]))
    first = Path(run_dirs[0])
    target = Path(out) if out is not None else (first if first.is_dir() else first.parent) / PNG_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(target), format="png")
    return target


def render(series: Sequence[Series], x: str = "step", *, title: str | None = None,
           threshold: dict[str, Any] | None = None, where: str = "the run") -> Any:
    """The matplotlib Figure of `series`: one labelled panel per varying curve, warm-ups shaded, threshold dashed."""
    Figure = _matplotlib()
    runs = [(s, curves(s.rows, x)) for s in series]
    names: list[str] = []
    for _, run in runs:
        names += [n for n in run if n not in names]
    if not names:
        raise DataError(f"the log of {where} has no numeric values along '{x}'",
                        "train for at least one logged step (log_every) first")
    # A series that never changes (a reference ceiling, a constant LR) is a flat line: it says nothing.
    varying = [n for n in names if not _constant([y for _, run in runs if n in run for y in run[n][1]])]
    names = varying or names[:1]
    lines = [t for t in [threshold or {}] + [s.threshold for s in series] if t.get("metric") in names]
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows), dpi=100, layout="constrained")
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        for s, run in runs:
            if name not in run:
                continue
            xs, ys = run[name]
            (line,) = ax.plot(xs, ys, label=s.label, marker="." if len(xs) <= 15 else None)
            warm = [v for v in (_number(r.get(x)) for r in s.rows[:s.warmup_rows]) if v is not None]
            if warm:
                ax.axvspan(0, max(warm), color=line.get_color(), alpha=0.12,
                           label=f"{s.label} warm-up" if i == 0 else None)
        for t in lines[:1]:
            if t["metric"] == name:
                ax.axhline(t["value"], color="0.3", linestyle="--", linewidth=1,
                           label=f"speed-up threshold {t['value']:.4g}")
        ys_all = [y for _, run in runs if name in run for y in run[name][1]]
        if name in ("loss", "lr") and ys_all and min(ys_all) > 0 and max(ys_all) / min(ys_all) > 50:
            ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel(X_LABELS[x] if any(s.warmup_rows for s in series) or x != "step" else "optimiser steps")
        ax.set_ylabel(Y_LABELS.get(name, name.replace("_", " ")))
        ax.grid(True, alpha=0.3)
        if len(runs) > 1 or any(s.warmup_rows for s in series) or any(t["metric"] == name for t in lines[:1]):
            ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return fig
