"""Progress of long loops, readable in a terminal and clean in logs (no Lightning here).

On a terminal (the stream is a TTY) a tqdm bar; otherwise plain lines, one when another 10% is done (at most one
every ``min_seconds``) or ``every_seconds`` have passed, and one at the end: no carriage returns in CI logs.
Callers pass ``enabled=False`` on every rank but the first.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, TypeVar

from lightning_mka.signals import set_phase

T = TypeVar("T")


def is_terminal(stream: IO | None = None) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


class Progress:
    """Counts done units of ``total`` (None: unknown) under a description.

    Args:
        total: units to do (None or inf: unknown, lines by time only).
        desc: what is being done, e.g. ``calibration pass (30 layers)``.
        enabled: False renders nothing (other ranks, disabled progress bars).
        stream: where to write (default: stderr).
        unit: what a unit is, e.g. ``batch``.
        every_fraction, every_seconds, min_seconds: when plain lines are written (see the module docstring).
    """

    def __init__(
        self,
        total: int | float | None,
        desc: str,
        enabled: bool = True,
        stream: IO | None = None,
        unit: str = "batch",
        every_fraction: float = 0.1,
        every_seconds: float = 30.0,
        min_seconds: float = 5.0,
    ) -> None:
        self.total = None if total is None or (isinstance(total, float) and math.isinf(total)) else int(total)
        self.desc = desc
        set_phase(desc)  # what a stop signal interrupts
        self.enabled = enabled
        self.stream = sys.stderr if stream is None else stream
        self.unit = unit
        self.every_fraction = every_fraction
        self.every_seconds = every_seconds
        self.min_seconds = min_seconds
        self.done = 0
        self.info = ""
        self._start = self._last_line = time.perf_counter()
        self._next_fraction = every_fraction
        self._closed = False
        self._bar = None
        if enabled and is_terminal(self.stream):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc=desc, file=self.stream, unit=unit, dynamic_ncols=True, leave=True)

    def update(self, count: int = 1, info: str | None = None) -> None:
        """``count`` more units done; ``info`` (e.g. ``loss=2.31``) is shown next to the count."""
        self.done += count
        if info is not None:
            self.info = info
        if not self.enabled:
            return
        if self._bar is not None:
            if info is not None:
                self._bar.set_postfix_str(info, refresh=False)
            self._bar.update(count)
            return
        now = time.perf_counter()
        fraction = self.done / self.total if self.total else 0.0
        due_by_fraction = self.total and fraction >= self._next_fraction - 1e-9 and now - self._last_line >= self.min_seconds
        if (due_by_fraction or now - self._last_line >= self.every_seconds) and self.done != self.total:
            self._line(now)
            self._next_fraction = (math.floor(fraction / self.every_fraction + 1e-9) + 1) * self.every_fraction

    def _line(self, now: float, end: bool = False) -> None:
        units = self.unit + ("es" if self.unit.endswith(("ch", "sh", "s", "x")) else "s")
        count = f"{self.done}/{self.total} {units}" if self.total is not None else f"{self.done} {units}"
        percent = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        state = "done in" if end else "after"
        info = f", {self.info}" if self.info else ""
        self.stream.write(f"[mka] {self.desc}: {count}{percent} {state} {now - self._start:.1f} s{info}\n")
        self.stream.flush()
        self._last_line = now

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        else:
            self._line(time.perf_counter(), end=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(iterable: Iterable[T], desc: str, total: int | None = None, enabled: bool = True, **kwargs) -> Iterator[T]:
    """Iterate ``iterable`` while showing progress (``total`` defaults to ``len(iterable)`` when it has one)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with Progress(total, desc, enabled=enabled, **kwargs) as progress:
        for item in iterable:
            yield item
            progress.update()
