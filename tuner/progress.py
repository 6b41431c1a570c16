"""What a running tune shows on stderr: a live status line on a terminal, log lines otherwise.

The status: ``[done/queued]`` over the work actually queued so far (a candidate answered from the
journal counts as queued and done at once; candidates a time budget drops leave the total), the
elapsed time, an ETA at the current rate of fresh measurements over what is queued (the fast
strategy queues more as it learns, so it is the ETA of the known work), failures by status, and
per batch size the best *full* timing so far (screens are quick first looks that selection never
uses; ``tuner.select`` chooses among full timings) of the kernel shape measured last.

On a terminal the line is redrawn in place on every result and every engine tick. In a log
(nightly job, ``ray job submit``), where redrawing would spam, the status is printed as a plain
line at least every ``LOG_INTERVAL_S`` seconds while the run is busy (even when no result
arrives: a long compile or a slow candidate must not look like a hang), on every phase change
(starting workers, searching, re-timing finalists, writing files) and when the queued work is
all done.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import TextIO

from workers.records import Gemm, Level, Measurement

LOG_INTERVAL_S = 5.0


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Progress:
    """``stream``: where to write (stderr); ``live``: redraw one line (default: ``stream`` is a
    terminal); ``clock``: injectable for tests."""

    def __init__(self, stream: TextIO | None = None, live: bool | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.clock = clock
        self.total = 0
        self.done = 0
        self.fresh = 0
        self.phase_name = ""
        self.failed: Counter[str] = Counter()
        self.best: dict[str, dict[int, float]] = {}
        self._best_shape = ""
        self._started = clock()
        self._first_fresh: float | None = None
        self._last_log = self._started
        self._line_open = False

    def queued(self, count: int = 1) -> None:
        """``count`` candidates entered the run (queued for a GPU, or about to be answered from the journal)."""
        self.total += count

    def dropped(self, count: int) -> None:
        """``count`` queued candidates will not be measured (the time budget ended)."""
        self.total = max(self.done, self.total - count)

    def record(self, measurement: Measurement, reused: bool) -> None:
        now = self.clock()
        self.done += 1
        self.total = max(self.total, self.done)  # a caller that never queued still reads sensibly
        if not reused:
            self.fresh += 1
            if self._first_fresh is None:
                self._first_fresh = now
        candidate = measurement.candidate
        if not measurement.ok:
            self.failed[measurement.status.value] += 1
        elif measurement.latency_us is not None and candidate.gemm is Gemm.BOTH and candidate.level is Level.FULL:
            per_m = self.best.setdefault(candidate.shape.label, {})
            per_m[candidate.M] = min(per_m.get(candidate.M, float("inf")), measurement.latency_us)
            self._best_shape = candidate.shape.label
        self._show(now, all_done=self.done == self.total)

    def tick(self) -> None:
        """The engine is busy: keep the terminal line's clock moving, and in a log write the status
        if ``LOG_INTERVAL_S`` has passed without a line."""
        self._show(self.clock())

    def phase(self, name: str) -> None:
        """The run moved on (a line in a log and on a terminal alike)."""
        self.phase_name = name
        self.note(name)

    def eta_s(self, now: float) -> float | None:
        if self._first_fresh is None or self.fresh < 2 or self.total <= self.done:
            return None
        rate = (self.fresh - 1) / max(now - self._first_fresh, 1e-9)
        return (self.total - self.done) / rate if rate > 0 else None

    def status_line(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        parts = [f"[{self.done}/{self.total}]"] if self.total else []  # nothing queued yet: no counter
        parts.append(f"elapsed {format_duration(now - self._started)}")
        if self.phase_name:
            parts.insert(0, self.phase_name)
        eta = self.eta_s(now)
        if eta is not None:
            parts.append(f"ETA {format_duration(eta)} (queued work)")
        if self.failed:
            parts.append("failed " + ", ".join(f"{k} {v}" for k, v in sorted(self.failed.items())))
        best = self.best.get(self._best_shape)
        if best:
            parts.append(f"best full timing {self._best_shape} "
                         + " ".join(f"M={m}:{us:.1f}us" for m, us in sorted(best.items())))
        return " | ".join(parts)

    def _show(self, now: float, all_done: bool = False) -> None:
        if self.live:
            width = shutil.get_terminal_size((120, 20)).columns
            self.stream.write("\r\x1b[K" + self.status_line(now)[: width - 1])
            self.stream.flush()
            self._line_open = True
        elif all_done or now - self._last_log >= LOG_INTERVAL_S:
            self._line(self.status_line(now), now)

    def note(self, text: str) -> None:
        """A one-off message (workers started, a worker lost, re-timing finalists …)."""
        self._line(text, self.clock())

    def _line(self, text: str, now: float) -> None:
        if self._line_open:
            self.stream.write("\n")
            self._line_open = False
        self.stream.write(f"moe-tune: {text}\n")
        self.stream.flush()
        self._last_log = now

    def close(self) -> None:
        if self._line_open:
            self.stream.write("\n")
            self.stream.flush()
            self._line_open = False
