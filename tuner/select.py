"""Choosing the config to ship per batch size: the best correct candidate, confirmed by a re-timing.

Only ``ok`` measurements compete (a wrong result, a crash or a timeout is never a winner). The
search timed each candidate once, possibly on different GPUs and minutes apart, and machines
drift by a few per cent; so the ``FINALISTS`` fastest of each group are re-timed back to back on
one worker, interleaved, and the choice is made on those numbers. Ties (equal latency, e.g. the
deterministic test latencies or a coarse interpreter clock) go to the smaller ``Config`` in field
order, so the same measurements always give the same files.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from workers.records import Candidate, Gemm, Measurement, MoEShape

FINALISTS = 3


@dataclass(frozen=True, order=True)
class GroupKey:
    """The candidates competing for one entry of an output file: everything but the config."""

    shape_label: str
    routing: str
    gemm: str
    M: int

    @classmethod
    def of(cls, candidate: Candidate) -> "GroupKey":
        return cls(candidate.shape.label, candidate.routing, candidate.gemm.value, candidate.M)


@dataclass(frozen=True)
class Selection:
    """The winner of one group and the numbers it won with."""

    candidate: Candidate
    latency_us: float
    search_latency_us: float
    retimed: bool

    @property
    def shape(self) -> MoEShape:
        return self.candidate.shape

    @property
    def gemm(self) -> Gemm:
        return self.candidate.gemm


def _rank(latency_us: float, candidate: Candidate) -> tuple:
    return (latency_us, candidate.config)


def finalists(measurements: Iterable[Measurement], count: int = FINALISTS) -> dict[GroupKey, list[Measurement]]:
    """The ``count`` fastest correct measurements of each group, fastest first."""
    groups: dict[GroupKey, list[Measurement]] = defaultdict(list)
    for m in measurements:
        if m.ok and m.latency_us is not None:
            groups[GroupKey.of(m.candidate)].append(m)
    return {key: sorted(ms, key=lambda m: _rank(m.latency_us, m.candidate))[:count]
            for key, ms in sorted(groups.items())}


Retimer = Callable[[list[list[Candidate]]], list[list[float] | None]]
"""Re-times groups of finalists; per group one latency per candidate, or None if that failed."""


def select(measurements: Iterable[Measurement], retime: Retimer, count: int = FINALISTS) -> dict[GroupKey, Selection]:
    """The winner of every group that has at least one correct candidate."""
    tops = finalists(measurements, count)
    contested = [key for key, ms in tops.items() if len(ms) > 1]
    retimed = dict(zip(contested, retime([[m.candidate for m in tops[key]] for key in contested])))
    chosen: dict[GroupKey, Selection] = {}
    for key, ms in tops.items():
        latencies = retimed.get(key)
        if latencies is None:
            best = ms[0]
            chosen[key] = Selection(best.candidate, best.latency_us, best.latency_us, retimed=False)
            continue
        winner_index = min(range(len(ms)), key=lambda i: _rank(latencies[i], ms[i].candidate))
        winner = ms[winner_index]
        chosen[key] = Selection(winner.candidate, latencies[winner_index], winner.latency_us, retimed=True)
    return chosen


def by_shape(selections: dict[GroupKey, Selection]) -> dict[tuple[MoEShape, str, Gemm], dict[int, Selection]]:
    """Winners regrouped per output file: (shape, routing, GEMM part) → {M: selection}."""
    files: dict[tuple[MoEShape, str, Gemm], dict[int, Selection]] = defaultdict(dict)
    for key in sorted(selections):
        s = selections[key]
        files[(s.shape, s.candidate.routing, s.gemm)][s.candidate.M] = s
    return dict(files)


def groups_without_winner(measurements: Sequence[Measurement]) -> list[GroupKey]:
    """Groups where every candidate failed: the run cannot write an entry for them."""
    seen = {GroupKey.of(m.candidate) for m in measurements}
    won = {GroupKey.of(m.candidate) for m in measurements if m.ok}
    return sorted(seen - won)
