"""Progress bars that suit where they are written: a tqdm bar on a terminal, plain lines in a log file.

A tqdm bar redirected to a file is one carriage-return update every tenth of a second (issue 32: ~1,900 of
them in one demo log, unreadable with `less` or `grep`). Off a terminal the same calls write one whole line
per `every_percent` of the total or per `every_seconds`, whichever comes first, and one at the end.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

EVERY_PERCENT = 10
EVERY_SECONDS = 30.0


def progress_bar(total: int, desc: str, unit: str = "it", *, disable: bool = False, initial: int = 0,
                 leave: bool = True, stream: TextIO | None = None) -> Any:
    """A tqdm bar when `stream` (default stderr) is a terminal or a notebook; a `LineBar` otherwise."""
    from tqdm.auto import tqdm

    stream = stream if stream is not None else sys.stderr
    if disable or _interactive(stream):
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=disable, leave=leave,
                    dynamic_ncols=True, file=stream)
    return LineBar(total, desc, unit, initial=initial, stream=stream)


def _interactive(stream: TextIO) -> bool:
    try:
        if stream.isatty():
            return True
    except (AttributeError, ValueError):  # a closed or file-less stream
        return False
    return "ipykernel" in sys.modules  # a notebook cell: tqdm.auto draws a widget there


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes}m{seconds:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


class LineBar:
    """The part of tqdm's interface the project uses, printing whole lines (for logs, CI, pipes)."""

    def __init__(self, total: int, desc: str, unit: str = "it", *, initial: int = 0, stream: TextIO | None = None,
                 every_percent: float = EVERY_PERCENT, every_seconds: float = EVERY_SECONDS,
                 clock: Any = time.monotonic) -> None:
        self.total, self.desc, self.unit, self.n = max(0, int(total)), desc, unit, int(initial)
        self.stream = stream if stream is not None else sys.stderr
        self.every_percent, self.every_seconds, self.clock = every_percent, every_seconds, clock
        self.postfix: dict[str, Any] = {}
        self._start = self._last_time = clock()
        self._start_n = self.n
        self._last_step = self._bucket(self.n)
        self._printed_n: int | None = None
        self._closed = False

    def _bucket(self, n: int) -> int:
        """Which `every_percent` slice of the total `n` lies in."""
        return int(n * 100 / (self.total * self.every_percent)) if self.total else 0

    def update(self, n: int = 1) -> None:
        """Advance by `n`; print a line when a new slice of the total is reached or `every_seconds` passed."""
        self.n += n
        now = self.clock()
        bucket = self._bucket(self.n)
        if bucket > self._last_step or now - self._last_time >= self.every_seconds:
            self._last_step = bucket
            self._emit(now)

    def set_postfix(self, refresh: bool = True, **values: Any) -> None:
        """Values shown at the end of the next line (tqdm's signature; `refresh` has nothing to redraw)."""
        self.postfix = values

    def write(self, text: str) -> None:
        """Print a line of its own (as tqdm.write: to stdout)."""
        print(text, flush=True)

    def close(self) -> None:
        """Print the final line unless the last line already showed this count."""
        if not self._closed:
            self._closed = True
            if self._printed_n != self.n and self.n != self._start_n:
                self._emit(self.clock())

    def line(self, now: float | None = None) -> str:
        """The line that describes the progress at time `now`."""
        now = self.clock() if now is None else now
        elapsed = now - self._start
        done = self.n - self._start_n
        parts = [f"{self.desc}: {self.n}/{self.total} {self.unit}" if self.total else f"{self.desc}: {self.n} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        if done > 0 and elapsed > 0:
            rate = done / elapsed
            parts.append(f"{rate:.3g} {self.unit}/s" if rate >= 1 else f"{1 / rate:.3g} s/{self.unit}")
        parts.append(f"{_duration(elapsed)} elapsed")
        if self.total and done > 0 and self.n < self.total:
            parts.append(f"ETA {_duration(elapsed / done * (self.total - self.n))}")
        parts += [f"{k} {v}" for k, v in self.postfix.items()]
        return ", ".join(parts)

    def _emit(self, now: float) -> None:
        self._last_time = now
        self._printed_n = self.n
        print(self.line(now), file=self.stream, flush=True)

    def __enter__(self) -> LineBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
