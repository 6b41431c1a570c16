"""What a running tune shows on stderr: a live status line on a terminal, log lines otherwise.

On a terminal one line is redrawn in place (done/total, ETA, best latency so far per batch size,
failures by status). In a log (nightly job, ``ray job submit``) redrawing would spam, so the
same status is printed as a plain line at most every ``LOG_INTERVAL_S`` seconds, plus notes.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections import Counter
from typing import TextIO

from workers.records import Gemm, Measurement

LOG_INTERVAL_S = 15.0


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
    def __init__(self, stream: TextIO | None = None, live: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.total = 0
        self.done = 0
        self.fresh = 0
        self.failed: Counter[str] = Counter()
        self.best: dict[int, float] = {}
        self._started = time.monotonic()
        self._first_fresh: float | None = None
        self._last_log = 0.0
        self._line_open = False

    def set_total(self, total: int) -> None:
        self.total = max(total, self.done)

    def record(self, measurement: Measurement, reused: bool) -> None:
        now = time.monotonic()
        self.done += 1
        if not reused:
            self.fresh += 1
            if self._first_fresh is None:
                self._first_fresh = now
        if not measurement.ok:
            self.failed[measurement.status.value] += 1
        elif measurement.latency_us is not None and measurement.candidate.gemm is Gemm.BOTH:
            m = measurement.candidate.M
            self.best[m] = min(self.best.get(m, float("inf")), measurement.latency_us)
        self._show(now)

    def eta_s(self, now: float) -> float | None:
        if self._first_fresh is None or self.fresh < 2 or self.total <= self.done:
            return None
        rate = (self.fresh - 1) / max(now - self._first_fresh, 1e-9)
        return (self.total - self.done) / rate if rate > 0 else None

    def status_line(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        parts = [f"[{self.done}/{self.total}]", f"elapsed {format_duration(now - self._started)}"]
        eta = self.eta_s(now)
        if eta is not None:
            parts.append(f"ETA {format_duration(eta)}")
        if self.failed:
            parts.append("failed " + ", ".join(f"{k} {v}" for k, v in sorted(self.failed.items())))
        if self.best:
            parts.append("best " + " ".join(f"M={m}:{us:.1f}us" for m, us in sorted(self.best.items())))
        return " | ".join(parts)

    def _show(self, now: float) -> None:
        if self.live:
            width = shutil.get_terminal_size((120, 20)).columns
            self.stream.write("\r\x1b[K" + self.status_line(now)[: width - 1])
            self.stream.flush()
            self._line_open = True
        elif now - self._last_log >= LOG_INTERVAL_S or self.done == self.total:
            self._last_log = now
            self.note(self.status_line(now))

    def note(self, text: str) -> None:
        """A one-off message (workers started, a worker lost, re-timing finalists …)."""
        if self._line_open:
            self.stream.write("\n")
            self._line_open = False
        self.stream.write(f"moe-tune: {text}\n")
        self.stream.flush()

    def close(self) -> None:
        if self._line_open:
            self.stream.write("\n")
            self.stream.flush()
            self._line_open = False
