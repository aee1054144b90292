"""The run log: one JSON line per logged step (and TensorBoard scalars when tensorboard is installed)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..checkpoint import atomic_write_text


def _clean(value: Any) -> Any:
    # JSON has no NaN/inf; write them as strings so the line stays parseable.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a log.jsonl (a half-written last line from a killed run is ignored)."""
    rows = []
    path = Path(path)
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class RunLog:
    """Appends rows to `<out>/log.jsonl`; mirrors numeric fields to TensorBoard under `<out>/tb` if available."""

    def __init__(self, out_dir: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.path = Path(out_dir) / "log.jsonl"
        self.enabled = enabled
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(out_dir) / "tb"))
            except ImportError:  # tensorboard is an optional extra
                self._tb = None

    def truncate_after(self, step: int) -> None:
        """Drop rows past `step` (a resumed run redoes them)."""
        if not self.enabled or not self.path.exists():
            return
        rows = [r for r in read_log(self.path) if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))

    def write(self, row: dict[str, Any]) -> None:
        """Append one row (flushed immediately: the log survives a kill)."""
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(_clean(row)) + "\n")
        if self._tb is not None and "step" in row:
            flat = {**{k: v for k, v in row.items() if k != "metrics"}, **row.get("metrics", {})}
            for key, value in flat.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(key, value, row["step"])

    def close(self) -> None:
        """Flush TensorBoard."""
        if self._tb is not None:
            self._tb.close()
