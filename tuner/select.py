"""Choosing the config to ship per batch size: the best correct candidate, confirmed by a re-timing.

Only ``ok`` measurements compete (a wrong result, a crash or a timeout is never a winner). The
search timed each candidate once, possibly on different GPUs and minutes apart, and machines
drift by a few per cent; so the ``FINALISTS`` fastest of each group are re-timed back to back on
one worker, interleaved, and the choice is made on those numbers. Pinned configs (the baseline a
server runs today, ``tuner.baseline``) always join their group's finalists, so the winner is
confirmed against them in the same back-to-back timing, and a pinned config within
``BASELINE_MARGIN`` of the re-timed winner keeps its place: a file departs from what the server
runs today only for a gain larger than the spread of back-to-back timings of one config (on an
H200, 0.5-1% at large M; identical configs re-timed in one process differed by up to 0.8%). Ties
(equal latency, e.g. the deterministic test latencies or a coarse interpreter clock) go to the
smaller ``Config`` in field order, so the same measurements always give the same files.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from workers.records import Candidate, Config, Gemm, Level, Measurement, MoEShape

FINALISTS = 3
BASELINE_MARGIN = 0.01
"""A re-timed winner must beat the fastest pinned (baseline) config by more than this fraction to
replace it."""


@functools.total_ordering
@dataclass(frozen=True)
class GroupKey:
    """The candidates competing for one entry of an output file: everything but the config (and
    the timing level). The one key of a group, for the search (``tuner.search``) and selection;
    ordered by shape label, routing, GEMM part, M."""

    shape: MoEShape
    routing: str
    gemm: Gemm
    M: int

    @classmethod
    def of(cls, candidate: Candidate) -> "GroupKey":
        return cls(candidate.shape, candidate.routing, candidate.gemm, candidate.M)

    @property
    def shape_label(self) -> str:
        return self.shape.label

    def _order(self) -> tuple:
        return (self.shape.label, self.routing, self.gemm.value, self.M)

    def __lt__(self, other: "GroupKey") -> bool:
        return self._order() < other._order()


@dataclass(frozen=True)
class Selection:
    """The winner of one group and the numbers it won with."""

    candidate: Candidate
    latency_us: float
    search_latency_us: float
    retimed: bool
    baseline_us: float | None = None
    """The fastest pinned (baseline) config's latency, timed alongside the winner; None without one."""
    kept_baseline: bool = False
    """A faster config was re-timed, but within ``BASELINE_MARGIN`` of the baseline, which was kept."""

    @property
    def shape(self) -> MoEShape:
        return self.candidate.shape

    @property
    def gemm(self) -> Gemm:
        return self.candidate.gemm


def _rank(latency_us: float, candidate: Candidate) -> tuple:
    return (latency_us, candidate.config)


Pinned = Mapping[GroupKey, Collection[Config]]
"""Per group, configs that are finalists whatever their rank (the baseline)."""


def finalists(measurements: Iterable[Measurement], count: int = FINALISTS,
              pinned: Pinned | None = None) -> dict[GroupKey, list[Measurement]]:
    """The ``count`` fastest correct measurements of each group, fastest first, then the group's
    pinned configs that are not among them.

    Full timings compete; a group with none (a search cut short by its budget) falls back to
    its screens, the best it has.
    """
    groups: dict[GroupKey, dict[Level, list[Measurement]]] = defaultdict(lambda: defaultdict(list))
    for m in measurements:
        if m.ok and m.latency_us is not None:
            groups[GroupKey.of(m.candidate)][m.candidate.level].append(m)
    tops = {}
    for key, by_level in sorted(groups.items()):
        level = by_level.get(Level.FULL) or by_level[Level.SCREEN]
        ranked = sorted(level, key=lambda m: _rank(m.latency_us, m.candidate))
        top = ranked[:count]
        wanted = set((pinned or {}).get(key, ())) - {m.candidate.config for m in top}
        for m in ranked[count:]:
            if m.candidate.config in wanted:
                top.append(m)
                wanted.discard(m.candidate.config)
        tops[key] = top
    return tops


Retimer = Callable[[list[list[Candidate]]], list[list[float] | None]]
"""Re-times groups of finalists; per group one latency per candidate, or None if that failed."""


def select(measurements: Iterable[Measurement], retime: Retimer, count: int = FINALISTS,
           pinned: Pinned | None = None) -> dict[GroupKey, Selection]:
    """The winner of every group that has at least one correct candidate."""
    tops = finalists(measurements, count, pinned)
    contested = [key for key, ms in tops.items() if len(ms) > 1]
    retimed = dict(zip(contested, retime([[m.candidate for m in tops[key]] for key in contested])))
    chosen: dict[GroupKey, Selection] = {}
    for key, ms in tops.items():
        latencies = retimed.get(key)
        was_retimed = latencies is not None
        if not was_retimed:
            latencies = [m.latency_us for m in ms]
            winner_index = 0
        else:
            winner_index = min(range(len(ms)), key=lambda i: _rank(latencies[i], ms[i].candidate))
        baseline = set((pinned or {}).get(key, ()))
        best_pinned = min((i for i, m in enumerate(ms) if m.candidate.config in baseline),
                          key=lambda i: _rank(latencies[i], ms[i].candidate), default=None)
        baseline_us = None if best_pinned is None else latencies[best_pinned]
        # The winner ranks first overall, so a pinned winner is the best pinned config.
        kept = (was_retimed and best_pinned is not None and best_pinned != winner_index
                and baseline_us <= latencies[winner_index] * (1.0 + BASELINE_MARGIN))
        if kept:
            winner_index = best_pinned
        winner = ms[winner_index]
        chosen[key] = Selection(winner.candidate, latencies[winner_index], winner.latency_us,
                                retimed=was_retimed, baseline_us=baseline_us, kept_baseline=kept)
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


@dataclass(frozen=True)
class SplitChoice:
    """SGLang's split configs at one batch size and what they gain over one shared config.

    ``up``/``down`` share BLOCK_SIZE_M (the token sort is shared) and minimise the sum of the two
    GEMMs' full timings; ``shared`` is the whole-op winner and ``shared_us`` the sum of its own
    two GEMM timings, so both sides are measured the same way (the SwiGLU and the top-k sum,
    common to both, are left out)."""

    up: Config
    down: Config
    split_us: float
    shared: Config | None
    shared_us: float | None

    @property
    def gain(self) -> float | None:
        """1 − split / shared: the fraction of the two GEMMs' time the split saves."""
        return None if self.shared_us is None else 1.0 - self.split_us / self.shared_us


def split_choices(measurements: Iterable[Measurement], shared: dict[GroupKey, Selection]
                  ) -> dict[tuple[MoEShape, str], dict[int, SplitChoice]]:
    """Per (shape, routing) and M, the best up/down pair with one BLOCK_SIZE_M (full timings of
    the split search); ``shared`` holds the whole-op winners (``select``'s result)."""
    timed: dict[tuple[MoEShape, str, int], dict[Gemm, dict[Config, float]]] = defaultdict(lambda: defaultdict(dict))
    for m in measurements:
        c = m.candidate
        if m.ok and m.latency_us is not None and c.level is Level.FULL and c.gemm is not Gemm.BOTH:
            timed[(c.shape, c.routing, c.M)][c.gemm][c.config] = m.latency_us
    out: dict[tuple[MoEShape, str], dict[int, SplitChoice]] = defaultdict(dict)
    for (shape, routing, M), parts in sorted(timed.items(), key=lambda kv: (kv[0][0].label, kv[0][1], kv[0][2])):
        ups, downs = parts.get(Gemm.UP, {}), parts.get(Gemm.DOWN, {})
        pairs = [(ups[u] + downs[d], u, d) for u in ups for d in downs if u.BLOCK_SIZE_M == d.BLOCK_SIZE_M]
        if not pairs:
            continue
        split_us, up, down = min(pairs)
        winner = shared.get(GroupKey(shape, routing, Gemm.BOTH, M))
        config = winner.candidate.config if winner else None
        shared_us = ups[config] + downs[config] if config in ups and config in downs else None
        out[(shape, routing)][M] = SplitChoice(up, down, split_us, config, shared_us)
    return dict(out)
