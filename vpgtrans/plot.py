"""Training curves: a run's `log.jsonl` (or several runs, overlaid) rendered to a PNG.

One panel for the loss, one for the learning rate, and one per metric found in the rows (the
trainer's nested `metrics` dict and any other numeric field such as `grad_norm`). matplotlib is
the optional `plot` extra.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
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


def _matplotlib() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("plotting needs matplotlib, which is not installed",
                          "pip install vpgtrans[plot]") from None
    return Figure


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path | None = None, *, x: str = "step",
              labels: Sequence[str] | None = None, title: str | None = None) -> Path:
    """Render one or more runs' logs into one PNG (default `<first run>/curves.png`); returns its path."""
    if x not in X_AXES:
        raise ConfigError(f"unknown x axis '{x}'", f"use one of {', '.join(X_AXES)}")
    if not run_dirs:
        raise ConfigError("no run directory given", "pass at least one run directory")
    Figure = _matplotlib()
    labels = list(labels) if labels else [Path(d).name or str(d) for d in run_dirs]
    if len(labels) != len(run_dirs):
        raise ConfigError(f"{len(labels)} labels for {len(run_dirs)} runs", "give one label per run")
    runs = [(label, curves(read_rows(d), x)) for label, d in zip(labels, run_dirs)]
    names: list[str] = []
    for _, run in runs:
        names += [n for n in run if n not in names]
    if not names:
        raise DataError(f"the log of {run_dirs[0]} has no numeric values along '{x}'",
                        "train for at least one logged step (log_every) first")
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows), dpi=100, layout="constrained")
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        for label, run in runs:
            if name in run:
                xs, ys = run[name]
                ax.plot(xs, ys, label=label, marker="." if len(xs) <= 15 else None)
        ys_all = [y for _, run in runs if name in run for y in run[name][1]]
        if name in ("loss", "lr") and ys_all and min(ys_all) > 0 and max(ys_all) / min(ys_all) > 50:
            ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel(x.replace("_", " ") + (" (s)" if x == "wall_time" else ""))
        ax.grid(True, alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    first = Path(run_dirs[0])
    target = Path(out) if out is not None else (first if first.is_dir() else first.parent) / PNG_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(target), format="png")
    return target
