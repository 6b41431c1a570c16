"""When each phase of a run happened, measured: the summary's ``timeline``.

Phases (seconds from the run's start, ``time.monotonic``): ``ray_start`` (starting or joining
Ray), ``worker_start`` (the GPU actors created and described), ``compile_ahead`` (from the
compile services' start to the last compile-ahead outcome, speculative ones included),
``screening`` and ``full_timing`` (first submission to last result of that timing level on any
GPU), ``retiming`` (the finalists re-timed back to back), ``writing`` (the config files). Phases may overlap (screening and full
timing run side by side, compile-ahead runs under both); a phase that did not happen is absent.
``first_measurement_s`` is when the first candidate reached a GPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

PHASES = ("ray_start", "worker_start", "compile_ahead", "screening", "full_timing", "retiming", "writing")


@dataclass
class Timeline:
    clock: Callable[[], float] = time.monotonic
    started: float = field(default=0.0)
    spans: dict[str, list[float]] = field(default_factory=dict)
    first_measurement: float | None = None

    def __post_init__(self) -> None:
        if not self.started:
            self.started = self.clock()

    def touch(self, phase: str, at: float | None = None) -> None:
        """Stretch ``phase`` to cover the instant ``at`` (now by default)."""
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}")
        now = self.clock() if at is None else at
        span = self.spans.setdefault(phase, [now, now])
        span[0], span[1] = min(span[0], now), max(span[1], now)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a block as (part of) ``name``."""
        self.touch(name)
        try:
            yield
        finally:
            self.touch(name)

    def measuring(self) -> None:
        """A candidate was handed to a GPU."""
        if self.first_measurement is None:
            self.first_measurement = self.clock()

    def to_json(self) -> dict:
        out: dict = {name: {"start_s": round(self.spans[name][0] - self.started, 3),
                            "end_s": round(self.spans[name][1] - self.started, 3),
                            "duration_s": round(self.spans[name][1] - self.spans[name][0], 3)}
                     for name in PHASES if name in self.spans}
        out["first_measurement_s"] = (round(self.first_measurement - self.started, 3)
                                      if self.first_measurement is not None else None)
        return out
