"""Search strategies: a strategy decides what to measure, the engine (``tuner.driver``) measures it.

The split follows Kernel Tuner's strategies/runners: a strategy never compiles, times, retries
or journals anything. The engine asks ``propose()`` for work whenever its queue runs dry, feeds
every outcome (fresh or from the journal) to ``observe()``, and ends when the queue is empty,
nothing is in flight and ``propose()`` returns nothing.

Both strategies work per group — one (shape, batch size, GEMM part) — in rounds: a round's
candidates are proposed together, and the next round is decided once all of them are back.
Deciding on whole rounds, never on whichever result happened to arrive first, makes a search
a function of the measurements alone: the same latencies give the same candidates and files
whatever the number of workers or the order results came back in.

Measuring only what matters (successive halving over repetitions):
1. every candidate the strategy wants gets a screen (``Level.SCREEN``: a few graph replays);
2. screened candidates within ``SCREEN_RATIO`` = 1.3× the group's best screen go on to the full
   timing (``Level.FULL``), at least ``SCREEN_FLOOR`` = 3 of them (the best screens), so noise
   in a screen can never leave the group with a single contender;
3. the fastest full timings are re-timed back to back before the choice (``tuner.select``).
If every full timing of a group fails (a crash or time-out its screen did not show), the next
``SCREEN_FLOOR`` best screens are fully timed, up to ``FULL_RETRY_ROUNDS`` times: a group with
correct screens ends with a correct full timing unless every one of those fails too (or the
time budget cuts the search), so a winner is chosen on a screen alone only then.
A 1.3× margin drops only clear losers: screens of one candidate on a CUDA graph agree within a
few per cent.

``exhaustive`` screens every pruned config (the reference). ``fast`` (the default) screens the
top of a cost-model ordering (``tuner.cost_model``) plus the best-modelled config of every
(BLOCK_SIZE_N, BLOCK_SIZE_K) tile so a wrong model cannot hide a whole tile shape, then the
best configs of the neighbouring batch sizes, then walks from the best screened config to its
neighbours (each of the six keys one step up or down in the space; when none of those is new,
every pair of keys moved one step each, which steps over configs that do not compile) until no
neighbour is faster, and promotes at most ``FAST_FULL_MAX`` contenders to the full timing.

``likely_next()`` lists what a strategy expects to propose once its rounds in flight are back
(the fast strategy: per open group, the neighbours of its best screens so far, and the seeds its
neighbour groups' screens so far give), so compile-ahead can compile them on otherwise idle CPUs
(``tuner.compiling``). It is a guess, read only for that: nothing it returns changes what
``propose()`` returns, so the search stays a function of the measurements alone.

Baseline configs (``--baseline``: what the server runs today) join a batch size's first round in
either strategy and are always fully timed, whatever their screen.

With split GEMMs the up and the down GEMM are searched as groups of their own (``Gemm.UP``,
``Gemm.DOWN``) next to the whole op (``Gemm.BOTH``, for the vLLM layout). Once all three of a
batch size are done, a pairing round adds the full timings selection needs: each GEMM of the
whole-op winner (the shared-config baseline of the split gain), and each GEMM's winner moved to
the other's BLOCK_SIZE_M (the token sort is shared, so SGLang's up and down configs must agree
on it).
"""

from __future__ import annotations

import functools
import itertools
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import Enum

from tuner.cost_model import predict_seconds
from tuner.plan import Job as PlanJob
from tuner.select import GroupKey
from workers.records import CONFIG_KEYS, Candidate, Config, Gemm, Level, Measurement, MoEShape

SCREEN_RATIO = 1.3
SCREEN_FLOOR = 3
FAST_SLICE_MIN = 24
FAST_SLICE_FRACTION = 0.02
FAST_SEEDS_PER_NEIGHBOUR = 3
FAST_MAX_LOCAL_ROUNDS = 12
FAST_FULL_MAX = 6
FULL_RETRY_ROUNDS = 2
SPLIT_GEMMS = (Gemm.BOTH, Gemm.UP, Gemm.DOWN)


class Phase(str, Enum):
    """Where one group's search stands. Every strategy starts at START and hands over at PROMOTE;
    the fast strategy passes SEED (its neighbours' best screened) and LOCAL (the local search) on
    the way. Then the promoted screens are fully timed (TIMED), with split GEMMs the up/down
    pairs are timed (PAIR), and the group is DONE."""

    START = "start"
    SEED = "seed"
    LOCAL = "local"
    PROMOTE = "promote"
    TIMED = "timed"
    PAIR = "pair"
    DONE = "done"


@dataclass(frozen=True)
class SearchJob:
    """The search of one plan job (``tuner.plan.Job``: one kernel shape and its pruned configs
    per batch size) under one routing."""

    job: PlanJob
    routing: str = "uniform"
    baseline_by_m: dict[int, tuple[Config, ...]] = field(default_factory=dict)
    """The configs a server runs today at each batch size (``tuner.baseline``): screened and fully
    timed whatever the search thinks of them, so selection can put them against the winner."""

    @property
    def shape(self) -> MoEShape:
        return self.job.shape

    @property
    def configs_by_m(self) -> dict[int, list[Config]]:
        return self.job.candidates

    @property
    def batch_sizes(self) -> list[int]:
        return sorted(self.job.candidates)


def promoted(screens: dict[Config, float | None], already: set[Config], cap: int | None = None) -> list[Config]:
    """The screened configs that earn a full timing (the rule in the module docstring), minus
    those that have one already; ``cap`` bounds the total promoted (the fast strategy's)."""
    ranked = sorted((latency, config) for config, latency in screens.items() if latency is not None)
    if not ranked:
        return []
    best = ranked[0][0]
    chosen = [c for i, (latency, c) in enumerate(ranked) if latency <= SCREEN_RATIO * best or i < SCREEN_FLOOR]
    if cap is not None:
        chosen = chosen[:max(cap, SCREEN_FLOOR)]
    return [c for c in chosen if c not in already]


@dataclass
class Group:
    """The search state of one (job, batch size, GEMM part)."""

    job: SearchJob
    M: int
    gemm: Gemm
    screens: dict[Config, float | None] = field(default_factory=dict)
    fulls: dict[Config, float | None] = field(default_factory=dict)
    waiting: set[tuple[Config, Level]] = field(default_factory=set)
    phase: Phase = Phase.START
    local_rounds: int = 0
    full_retries: int = 0

    @property
    def configs(self) -> tuple[Config, ...]:
        return self.job.configs_by_m[self.M]

    @functools.cached_property
    def in_space(self) -> frozenset[Config]:
        """The pruned space of this batch size, for membership tests (baselines may lie outside it)."""
        return frozenset(self.configs)

    @property
    def baseline(self) -> tuple[Config, ...]:
        """The baseline configs of this batch size; they compete for the whole op only (vLLM's files)."""
        return self.job.baseline_by_m.get(self.M, ()) if self.gemm is Gemm.BOTH else ()

    @property
    def key(self) -> GroupKey:
        return GroupKey(self.job.shape, self.job.routing, self.gemm, self.M)

    @property
    def idle(self) -> bool:
        return not self.waiting

    def ranked(self, level: Level) -> list[Config]:
        """Configs measured at ``level`` without failure, fastest first (ties: config order)."""
        results = self.screens if level is Level.SCREEN else self.fulls
        return [c for _, c in sorted((latency, c) for c, latency in results.items() if latency is not None)]

    def best(self, level: Level) -> Config | None:
        ranked = self.ranked(level)
        return ranked[0] if ranked else None

    def candidate(self, config: Config, level: Level) -> Candidate:
        return Candidate(shape=self.job.shape, M=self.M, config=config, gemm=self.gemm, routing=self.job.routing,
                         level=level)


Round = list[tuple[Group, Config, Level]]
"""What to measure next: (the group it belongs to, config, level)."""


class Strategy(ABC):
    """Proposes candidates in rounds per group and learns from their measurements."""

    full_cap: int | None = None
    """At most this many full timings per group (None: every candidate the screening rule keeps)."""

    def __init__(self, jobs: Sequence[SearchJob], split_gemms: bool = False) -> None:
        self.jobs = list(jobs)
        self.split_gemms = split_gemms
        gemms = SPLIT_GEMMS if split_gemms else (Gemm.BOTH,)
        self.groups = [Group(job, M, gemm) for job in self.jobs for M in job.batch_sizes for gemm in gemms]
        self._by_key = {g.key: g for g in self.groups}

    def propose(self) -> list[Candidate]:
        """The next candidates to measure; an empty list when nothing more can be decided now."""
        out: list[Candidate] = []
        moved = True
        while moved:  # a group that moves on may release one that waits on it: go round until none moves
            moved = False
            for group in self.groups:
                if not group.idle or group.phase == Phase.DONE:
                    continue
                phase = group.phase
                for target, config, level in self._advance(group):
                    if (config, level) not in target.waiting:
                        target.waiting.add((config, level))
                        out.append(target.candidate(config, level))
                moved |= group.phase != phase
        return out

    def observe(self, measurement: Measurement) -> None:
        """One outcome of a proposed candidate (any status; a failure counts as no latency)."""
        c = measurement.candidate
        group = self._by_key.get(GroupKey.of(c))
        if group is None:
            return
        latency = measurement.latency_us if measurement.ok else None
        (group.screens if c.level is Level.SCREEN else group.fulls)[c.config] = latency
        group.waiting.discard((c.config, c.level))

    def likely_next(self) -> list[Candidate]:
        """Candidates this strategy expects to propose after the rounds now in flight, most likely
        first; none by default (a strategy that proposes everything at once has nothing to guess).
        A guess for compile-ahead only: it changes no state and no later proposal."""
        return []

    def finished(self) -> set[tuple[MoEShape, str, int]]:
        """The (shape, routing, M) whose every group (GEMM part) has finished its search: nothing
        waiting and nothing more to propose. Call ``propose`` first so idle groups pass the rounds
        that need no measurement."""
        open_keys = {(g.job.shape, g.job.routing, g.M) for g in self.groups if g.phase is not Phase.DONE or not g.idle}
        return {(g.job.shape, g.job.routing, g.M) for g in self.groups} - open_keys

    def _advance(self, group: Group) -> Round:
        """Move an idle group on to its next round; empty when it is done or waits on others."""
        while group.phase != Phase.DONE:
            work = self._step(group)
            if work is None:
                return []
            if work:
                return work
        return []

    def _step(self, group: Group) -> Round | None:
        """One phase transition: the round it starts ([] if none), or None to wait on other groups."""
        if group.phase == Phase.PROMOTE:
            group.phase = Phase.TIMED
            chosen = promoted(group.screens, set(group.fulls), self.full_cap)
            chosen += [c for c in group.baseline
                       if group.screens.get(c) is not None and c not in group.fulls and c not in chosen]
            return [(group, c, Level.FULL) for c in chosen]
        if group.phase == Phase.TIMED:
            if group.best(Level.FULL) is None and group.full_retries < FULL_RETRY_ROUNDS:
                # Every full timing failed (a crash or time-out the screen did not show): the next
                # best screens get theirs, so a batch size with correct screens is never left to
                # be chosen on a screen alone.
                group.full_retries += 1
                retry = [c for c in group.ranked(Level.SCREEN) if c not in group.fulls][:SCREEN_FLOOR]
                if retry:
                    return [(group, c, Level.FULL) for c in retry]
            group.phase = Phase.PAIR if group.gemm is Gemm.BOTH and self.split_gemms else Phase.DONE
            return []
        if group.phase == Phase.PAIR:
            return self._pairing(group)
        return self._search_step(group)

    @abstractmethod
    def _search_step(self, group: Group) -> Round | None:
        """The strategy's own phases, from ``Phase.START``; it sets ``Phase.PROMOTE`` when screening is over."""

    def _pairing(self, both: Group) -> Round | None:
        """Once the up and down groups of this batch size are done too: the full timings split
        selection needs (module docstring)."""
        shape, routing, M = both.job.shape, both.job.routing, both.M
        up, down = self._by_key[GroupKey(shape, routing, Gemm.UP, M)], self._by_key[GroupKey(shape, routing, Gemm.DOWN, M)]
        if up.phase != Phase.DONE or down.phase != Phase.DONE:
            return None
        both.phase = Phase.DONE
        shared, best_up, best_down = both.best(Level.FULL), up.best(Level.FULL), down.best(Level.FULL)
        wanted: list[tuple[Group, Config]] = []
        if shared is not None:
            wanted += [(up, shared), (down, shared)]
        if best_up is not None and best_down is not None and best_up.BLOCK_SIZE_M != best_down.BLOCK_SIZE_M:
            wanted += [(down, replace(best_down, BLOCK_SIZE_M=best_up.BLOCK_SIZE_M)),
                       (up, replace(best_up, BLOCK_SIZE_M=best_down.BLOCK_SIZE_M))]
        return [(g, c, Level.FULL) for g, c in wanted if c in g.configs and c not in g.fulls]


class Exhaustive(Strategy):
    """Every pruned config screened at every batch size, contenders fully timed: the reference
    the faster strategies are judged by."""

    def _search_step(self, group: Group) -> Round:
        group.phase = Phase.PROMOTE
        return [(group, c, Level.SCREEN) for c in dict.fromkeys([*group.configs, *group.baseline])]


class Fast(Strategy):
    """Cost-model slice, the neighbours' best, local search; a few contenders fully timed."""

    full_cap = FAST_FULL_MAX

    def __init__(self, jobs: Sequence[SearchJob], split_gemms: bool = False) -> None:
        super().__init__(jobs, split_gemms)
        self._values = {job.shape: {k: sorted({getattr(c, k) for cs in job.configs_by_m.values() for c in cs})
                                    for k in CONFIG_KEYS} for job in self.jobs}

    def _search_step(self, group: Group) -> Round | None:
        if group.phase == Phase.START:
            group.phase = Phase.SEED
            return [(group, c, Level.SCREEN) for c in dict.fromkeys([*self.initial_slice(group), *group.baseline])]
        if group.phase == Phase.SEED:
            neighbours = self.neighbour_groups(group)
            if any(n.phase == Phase.START or (n.phase == Phase.SEED and not n.idle) for n in neighbours):
                return None  # a neighbour's first slice is still out: its best is not known yet
            group.phase = Phase.LOCAL
            return [(group, c, Level.SCREEN) for c in self._seeds(group, neighbours)]
        if group.phase == Phase.LOCAL:
            # Walk from the best config of the space: a baseline outside it has no neighbours there.
            best = next((c for c in group.ranked(Level.SCREEN) if c in group.in_space), None)
            todo = [c for c in self.neighbours(group, best) if c not in group.screens] if best else []
            if best and not todo:
                # A one-key optimum can sit next to configs that do not compile (a larger tile needs
                # fewer stages): moving two keys at once steps over such a hole.
                todo = [c for c in self.neighbours(group, best, keys_moved=2) if c not in group.screens]
            group.local_rounds += 1
            if not todo or group.local_rounds > FAST_MAX_LOCAL_ROUNDS:
                group.phase = Phase.PROMOTE
                return []
            return [(group, c, Level.SCREEN) for c in todo]
        raise AssertionError(f"unknown phase {group.phase}")

    def initial_slice(self, group: Group) -> list[Config]:
        """The cost model's top ``max(FAST_SLICE_MIN, FAST_SLICE_FRACTION × n)`` configs, plus the
        best-modelled config of each (BLOCK_SIZE_N, BLOCK_SIZE_K) tile not among them."""
        shape = group.job.shape
        ordered = sorted(group.configs, key=lambda c: (predict_seconds(shape, group.M, c, group.gemm), c))
        size = max(FAST_SLICE_MIN, math.ceil(FAST_SLICE_FRACTION * len(ordered)))
        chosen = list(ordered[:size])
        tiles = {(c.BLOCK_SIZE_N, c.BLOCK_SIZE_K) for c in chosen}
        for c in ordered[size:]:
            if (c.BLOCK_SIZE_N, c.BLOCK_SIZE_K) not in tiles:
                tiles.add((c.BLOCK_SIZE_N, c.BLOCK_SIZE_K))
                chosen.append(c)
        return chosen

    def neighbours(self, group: Group, config: Config, keys_moved: int = 1) -> list[Config]:
        """The group's configs that differ from ``config`` in ``keys_moved`` keys by one step of the
        space each (``config`` itself may lie outside the space: a baseline config)."""
        values = self._values[group.job.shape]
        out = []
        for keys in itertools.combinations(CONFIG_KEYS, keys_moved):
            options = []
            for key in keys:
                steps, value = values[key], getattr(config, key)
                below = [v for v in steps if v < value][-1:]
                above = [v for v in steps if v > value][:1]
                options.append([(key, v) for v in below + above])
            for moves in itertools.product(*options):
                moved = replace(config, **dict(moves))
                if moved in group.in_space:
                    out.append(moved)
        return out

    def neighbour_groups(self, group: Group) -> list[Group]:
        """The groups whose best screened configs seed ``group``'s search (at most
        ``FAST_SEEDS_PER_NEIGHBOUR`` each, once their first slice is measured): the same GEMM part
        at the adjacent batch sizes of the job; for one GEMM part (``--split-gemms``), also the
        whole op at the same batch size. ``group`` must be one of this strategy's ``groups``."""
        shape, routing = group.job.shape, group.job.routing
        sizes = group.job.batch_sizes
        i = sizes.index(group.M)
        keys = [GroupKey(shape, routing, group.gemm, sizes[j]) for j in (i - 1, i + 1) if 0 <= j < len(sizes)]
        if group.gemm is not Gemm.BOTH:
            keys.append(GroupKey(shape, routing, Gemm.BOTH, group.M))
        return [self._by_key[k] for k in keys]

    def likely_next(self) -> list[Candidate]:
        """Per group still screening: the seeds its neighbour groups' best screens so far give (while
        it waits to seed), the unscreened one-key neighbours of its two best screens so far, then
        the two-key neighbours of its best (the walk's next round if the best stays the best).
        Round robin over the groups, so each group's likeliest come first; no duplicates."""
        per_group = [self._likely(g) for g in self.groups if g.phase in (Phase.SEED, Phase.LOCAL)]
        out: list[Candidate] = []
        seen: set[Candidate] = set()
        for rank in itertools.zip_longest(*per_group):
            for candidate in rank:
                if candidate is not None and candidate not in seen:
                    seen.add(candidate)
                    out.append(candidate)
        return out

    def _likely(self, group: Group) -> list[Candidate]:
        known = set(group.screens) | {c for c, level in group.waiting if level is Level.SCREEN}
        likely: list[Config] = []
        if group.phase == Phase.SEED:
            likely += self._seeds(group, self.neighbour_groups(group))
        top = [c for c in group.ranked(Level.SCREEN) if c in group.in_space][:2]
        for config in top:
            likely += self.neighbours(group, config)
        if top:
            likely += self.neighbours(group, top[0], keys_moved=2)
        return [group.candidate(c, Level.SCREEN) for c in dict.fromkeys(likely) if c not in known]

    def _seeds(self, group: Group, neighbours: list[Group]) -> list[Config]:
        seeds = [c for n in neighbours for c in n.ranked(Level.SCREEN)[:FAST_SEEDS_PER_NEIGHBOUR]]
        return [c for c in dict.fromkeys(seeds) if c in group.in_space and c not in group.screens]


STRATEGIES: dict[str, type[Strategy]] = {"exhaustive": Exhaustive, "fast": Fast}
