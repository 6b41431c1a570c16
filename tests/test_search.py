"""Search strategies and the engine around them, on synthetic cost surfaces (no Ray, no kernels).

A stand-in pool answers every candidate at once from a known latency function, so a search's
result can be compared with the surface's true optimum, the engine's time budget can be run on a
fake clock, and compile-ahead verdicts can be shown never to reach a GPU worker.
"""

from __future__ import annotations

import io
import itertools
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import pytest

from tuner import select as selection
from tuner.compiling import CompileStats
from tuner.cost_model import predict_seconds
from tuner.engine import DeviceGroup, Engine, Retimer
from tuner.journal import Journal, WorkerEnv
from tuner.pool import Done, Slot
from tuner.plan import Job as PlanJob
from tuner.progress import Progress
from tuner.search import FAST_FULL_MAX, FULL_RETRY_ROUNDS, SCREEN_FLOOR, SCREEN_RATIO, Exhaustive, Fast, SearchJob, promoted
from workers.compile_ahead import CompileOutcome
from workers.records import Candidate, Config, DType, Gemm, Level, Measurement, MoEShape, Status

SHAPE = MoEShape(E=8, N=1024, K=512, topk=2, dtype=DType.BF16)
SPACE = {"BLOCK_SIZE_M": (16, 32, 64, 128), "BLOCK_SIZE_N": (32, 64, 128, 256), "BLOCK_SIZE_K": (32, 64, 128),
         "GROUP_SIZE_M": (1, 16, 32), "num_warps": (4, 8), "num_stages": (2, 3, 4)}
CONFIGS = tuple(Config(*combo) for combo in itertools.product(*SPACE.values()))  # 864 configs
ENV = {"device": "stand-in GPU", "torch": "t", "triton": "t", "kernel": "builtin", "kernel_hash": "h"}


def _search_job(configs_by_m: dict[int, list[Config]], baseline_by_m: dict | None = None) -> SearchJob:
    """The search of a plan job of SHAPE with these configs per batch size."""
    job = PlanJob(model="stand-in", shape=SHAPE, tp=1, ep=1, file_name="", sglang_file_name="",
                  candidates={M: list(configs) for M, configs in configs_by_m.items()}, dropped_by_reason={})
    return SearchJob(job, baseline_by_m=baseline_by_m or {})


def bowl(optimum: dict[str, int], rng: random.Random,
         offset_range: tuple[float, float] = (50, 100)) -> Callable[[Config, int, Gemm], float]:
    """A surface with one known optimum: per key, a random positive weight times the squared
    distance (in space steps) from the optimum's value, plus a random per-batch-size offset
    drawn from ``offset_range``."""
    weights = {k: rng.uniform(0.5, 3.0) for k in SPACE}
    offsets: dict[int, float] = {}

    def latency(config: Config, M: int, gemm: Gemm) -> float:
        offset = offsets.setdefault(M, rng.uniform(*offset_range))
        return offset + sum(w * (SPACE[k].index(getattr(config, k)) - SPACE[k].index(optimum[k])) ** 2
                            for k, w in weights.items())
    return latency


def drive(strategy, latency: Callable[[Config, int, Gemm], float]) -> list[Measurement]:
    """Run a strategy to the end, answering every round at once."""
    measured = []
    while True:
        round_ = strategy.propose()
        if not round_:
            assert all(g.idle for g in strategy.groups), "a strategy stopped with work in flight"
            return measured
        for c in round_:
            m = Measurement(c, Status.OK, latency_us=latency(c.config, c.M, c.gemm))
            measured.append(m)
            strategy.observe(m)


def best_full(measured: list[Measurement], M: int, gemm: Gemm = Gemm.BOTH) -> Config:
    fulls = [m for m in measured if m.candidate.level is Level.FULL and m.candidate.M == M and m.candidate.gemm is gemm]
    return min(fulls, key=lambda m: (m.latency_us, m.candidate.config)).candidate.config


@pytest.mark.parametrize("strategy_class", [Exhaustive, Fast])
def test_strategies_find_the_known_optimum(strategy_class, rng: random.Random):
    optimum = {k: rng.choice(v) for k, v in SPACE.items()}
    batch_sizes = (1, 16, 256, 4096)
    job = _search_job({M: CONFIGS for M in batch_sizes})
    measured = drive(strategy_class([job]), bowl(optimum, rng))
    for M in batch_sizes:
        assert best_full(measured, M) == Config(**optimum), f"M={M}"
    screens = sum(m.candidate.level is Level.SCREEN for m in measured)
    if strategy_class is Exhaustive:
        assert screens == len(CONFIGS) * len(batch_sizes)
    else:
        # fast's budget: a small fraction of the exhaustive screens, at most FAST_FULL_MAX full timings per M
        assert screens <= 0.2 * len(CONFIGS) * len(batch_sizes)
        assert len(measured) - screens <= FAST_FULL_MAX * len(batch_sizes)


@pytest.mark.parametrize("strategy_class", [Exhaustive, Fast])
def test_baseline_configs_are_screened_first_and_always_fully_timed(strategy_class, rng: random.Random):
    optimum = {k: rng.choice(v) for k, v in SPACE.items()}
    # The worst config's distance penalty is at least 6 (every key at least one step off, two keys
    # two, weights >= 0.5), so offsets <= 10 put it beyond the screening margin at every M: at
    # M=1 (where it is no baseline) only its screen may decide that it gets no full timing.
    surface = bowl(optimum, rng, offset_range=(5, 10))
    worst = max(CONFIGS, key=lambda c: surface(c, 64, Gemm.BOTH))
    for M in (1, 64):
        assert surface(worst, M, Gemm.BOTH) > SCREEN_RATIO * surface(Config(**optimum), M, Gemm.BOTH)
    outside = Config(48, 96, 64, 8, 4, 3)  # a shipped config need not lie in the search space
    job = _search_job({M: CONFIGS for M in (1, 64)}, baseline_by_m={64: (worst, outside)})

    def latency(config, M, gemm):
        return surface(config, M, gemm) if config != outside else surface(Config(**optimum), M, gemm) + 1.0

    strategy = strategy_class([job])
    first_round = strategy.propose()
    assert {(c.config, c.M) for c in first_round} >= {(worst, 64), (outside, 64)}
    for c in first_round:
        strategy.observe(Measurement(c, Status.OK, latency_us=latency(c.config, c.M, c.gemm)))
    measured = drive(strategy, latency)
    fulls = {(m.candidate.config, m.candidate.M) for m in measured if m.candidate.level is Level.FULL}
    assert {(worst, 64), (outside, 64)} <= fulls  # however slow its screen
    assert (worst, 1) not in fulls and (outside, 1) not in fulls  # baselines belong to their batch size
    assert best_full(measured, 64) == Config(**optimum)


def test_local_search_steps_from_a_baseline_outside_the_space_to_the_nearest_values():
    off_space = Config(48, 64, 64, 16, 4, 3)  # BLOCK_SIZE_M=48 is not in the space
    fast = Fast([_search_job({64: CONFIGS}, baseline_by_m={64: (off_space,)})])
    assert set(fast.neighbours(fast.groups[0], off_space)) == {replace(off_space, BLOCK_SIZE_M=32),
                                                               replace(off_space, BLOCK_SIZE_M=64)}


def test_neighbour_groups_are_the_adjacent_batch_sizes_and_for_a_gemm_part_the_whole_op():
    fast = Fast([_search_job({1: CONFIGS[:4], 4: CONFIGS[:4], 16: CONFIGS[:4]})], split_gemms=True)
    group = {(g.M, g.gemm): g for g in fast.groups}
    assert [(n.M, n.gemm) for n in fast.neighbour_groups(group[4, Gemm.BOTH])] == [(1, Gemm.BOTH), (16, Gemm.BOTH)]
    assert [(n.M, n.gemm) for n in fast.neighbour_groups(group[1, Gemm.BOTH])] == [(4, Gemm.BOTH)]
    up = [g for g in fast.groups if g.gemm is not Gemm.BOTH][0].gemm
    assert [(n.M, n.gemm) for n in fast.neighbour_groups(group[16, up])] == [(4, up), (16, Gemm.BOTH)]


def test_a_search_is_a_function_of_the_measurements_alone(rng: random.Random):
    optimum = {k: rng.choice(v) for k, v in SPACE.items()}
    job = _search_job({M: CONFIGS for M in (1, 64)})
    surface = bowl(optimum, rng)
    first = [m.candidate for m in drive(Fast([job]), surface)]
    assert first == [m.candidate for m in drive(Fast([job]), surface)]


def test_screening_never_drops_the_best_of_a_seeded_set(rng: random.Random):
    for _ in range(2000):
        size = rng.randint(1, 60)
        true = {c: rng.uniform(10, 1000) for c in rng.sample(CONFIGS, size)}
        # A screen is a few CUDA-graph replays: within a few per cent of the full timing; ±10% here.
        screens = {c: t * rng.uniform(0.9, 1.1) for c, t in true.items()}
        for c in rng.sample(list(screens), size // 10):
            screens[c] = None  # failed screens never count
        survivors = [c for c in true if screens[c] is not None]
        kept = promoted(screens, set())
        if survivors:
            assert min(survivors, key=true.get) in kept
            assert len(kept) >= min(SCREEN_FLOOR, len(survivors))
            best = min(screens[c] for c in survivors)
            assert all(screens[c] <= SCREEN_RATIO * best for c in kept[SCREEN_FLOOR:])
        assert promoted(screens, set(kept)) == []


def test_split_gemms_pick_one_block_m_and_report_the_gain(rng: random.Random):
    up_opt = {k: rng.choice(v) for k, v in SPACE.items()}
    down_opt = dict(up_opt, BLOCK_SIZE_M=16 if up_opt["BLOCK_SIZE_M"] != 16 else 128, BLOCK_SIZE_N=32)
    up_cost, down_cost = bowl(up_opt, rng), bowl(down_opt, rng)

    def latency(config: Config, M: int, gemm: Gemm) -> float:
        parts = {Gemm.UP: up_cost(config, M, gemm), Gemm.DOWN: down_cost(config, M, gemm)}
        return parts[gemm] if gemm in parts else sum(parts.values()) + 5.0

    job = _search_job({M: CONFIGS for M in (8, 512)})
    measured = drive(Fast([job], split_gemms=True), latency)
    chosen = selection.select([m for m in measured if m.candidate.gemm is Gemm.BOTH], lambda g: [None] * len(g))
    choices = selection.split_choices(measured, chosen)[(SHAPE, "uniform")]
    for M, choice in choices.items():
        assert choice.up.BLOCK_SIZE_M == choice.down.BLOCK_SIZE_M
        assert choice.split_us == pytest.approx(latency(choice.up, M, Gemm.UP) + latency(choice.down, M, Gemm.DOWN))
        assert choice.shared == best_full(measured, M)
        assert choice.gain is not None and choice.gain >= 0
        # the pair beats every shared config measured in both parts
        assert choice.split_us <= min(latency(c, M, Gemm.UP) + latency(c, M, Gemm.DOWN) for c in CONFIGS) + 1e-9


def test_cost_model_orders_tiles_by_batch_size():
    small, large = Config(16, 64, 128, 1, 4, 3), Config(128, 128, 64, 16, 8, 3)
    assert predict_seconds(SHAPE, 1, small) < predict_seconds(SHAPE, 1, large)
    big = MoEShape(E=8, N=7168, K=4096, topk=2, dtype=DType.BF16)
    assert predict_seconds(big, 4096, large) < predict_seconds(big, 4096, small)
    assert predict_seconds(big, 64, small, Gemm.UP) + predict_seconds(big, 64, small, Gemm.DOWN) == pytest.approx(
        predict_seconds(big, 64, small))


# -- the engine around a strategy ---------------------------------------------------------------


@dataclass
class StandInPool:
    """Answers each candidate at once from ``latency`` and advances ``clock`` by ``cost_s`` per answer."""

    latency: Callable[[Config, int, Gemm], float]
    clock: list[float]
    cost_s: float = 1.0
    slots: list[Slot] = field(default_factory=lambda: [Slot(0, None), Slot(1, None)])
    submitted: list[tuple[float, Candidate]] = field(default_factory=list)
    _events: list[Done] = field(default_factory=list)

    def live_slots(self) -> list[Slot]:
        return self.slots

    def free_slots(self) -> list[Slot]:
        return [s for s in self.slots if not any(e.slot is s for e in self._events)]

    def busy(self) -> bool:
        return bool(self._events)

    def recovering(self) -> bool:
        return False

    def submit(self, slot: Slot, work, call) -> None:
        candidate = work.candidate
        self.submitted.append((self.clock[0], candidate))
        self.clock[0] += self.cost_s
        value = Measurement(candidate, Status.OK, latency_us=self.latency(candidate.config, candidate.M, candidate.gemm),
                            device=ENV["device"])
        self._events.append(Done(slot, work, value))

    def poll(self, timeout_s: float) -> list[Done]:
        events, self._events = self._events, []
        return events


class NoSpeculation:
    """The parts of ``tuner.compiling.CompileAhead`` a stand-in without spare processes needs."""

    outstanding = False

    def __init__(self) -> None:
        self.stats = CompileStats()

    def spare(self) -> int:
        return 0

    def speculate(self, likely) -> int:
        return 0


class StandInCompiler(NoSpeculation):
    """Compile-ahead verdicts by rule: BLOCK_SIZE_N=256 fails to compile; the first ask of a config
    is pending (as while a compile runs), later asks answer."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: set[Config] = set()
        self.judged: set[Config] = set()

    def status(self, shape: MoEShape, config: Config) -> CompileOutcome | None:
        if config not in self.asked:
            self.asked.add(config)
            return None
        if config.BLOCK_SIZE_N == 256:
            self.judged.add(config)
            return CompileOutcome(Status.COMPILE_ERROR, "CompilationError: stand-in")
        return CompileOutcome(Status.OK)

    def pump(self, wait_s: float) -> bool:
        return True


def _engine(tmp_path, strategy, pool, clock, compiler=None, budget_s=None) -> tuple[Engine, DeviceGroup]:
    group = DeviceGroup(env=WorkerEnv.of(ENV), slots=pool.slots, strategy=strategy, compiler=compiler)
    journal = Journal(tmp_path / "journal.jsonl")
    engine = Engine(pool, [group], journal, Progress(io.StringIO(), live=False), budget_s, clock=lambda: clock[0])
    return engine, group


def test_the_time_budget_is_honoured_and_the_best_so_far_chosen(tmp_path, rng: random.Random):
    optimum = {k: rng.choice(v) for k, v in SPACE.items()}
    clock = [1000.0]
    pool = StandInPool(bowl(optimum, rng), clock)
    job = _search_job({M: CONFIGS for M in (1, 64, 1024)})
    engine, group = _engine(tmp_path, Exhaustive([job]), pool, clock, budget_s=120)
    engine.run()
    assert engine.budget_ended
    started_late = [c for t, c in pool.submitted if t >= 1000.0 + 120]
    assert started_late == []
    assert 100 <= len(pool.submitted) <= 121  # one second each; what was in flight at the deadline finished
    chosen = selection.select(group.measurements, lambda g: [None] * len(g))
    assert chosen, "the best so far (screens, when no full timing was reached) must be chosen"


def test_compile_verdicts_never_reach_a_gpu_worker(tmp_path, rng: random.Random):
    optimum = {k: rng.choice(v) for k, v in SPACE.items()}
    clock = [0.0]
    pool = StandInPool(bowl(optimum, rng), clock)
    job = _search_job({M: CONFIGS[:200] for M in (1, 32)})
    compiler = StandInCompiler()
    engine, group = _engine(tmp_path, Exhaustive([job]), pool, clock, compiler=compiler)
    submit = pool.submit

    def submit_unjudged(slot, work, call):
        # An idle worker may take a candidate still compiling (and compile it itself), never one
        # whose config compile-ahead has already refused.
        assert work.candidate.config not in compiler.judged, work.candidate
        submit(slot, work, call)

    pool.submit = submit_unjudged
    engine.run()
    assert not engine.budget_ended
    taken = [c for _, c in pool.submitted if c.config.BLOCK_SIZE_N == 256]
    assert len(taken) <= compiler.stats.taken_uncompiled <= len(pool.slots)  # only the first dispatch finds none compiled
    failed = [m for m in group.measurements if not m.ok]
    assert failed and all(m.status is Status.COMPILE_ERROR and m.candidate.config.BLOCK_SIZE_N == 256 for m in failed)
    assert "compile-ahead" in failed[0].message
    assert len(group.measurements) == engine.evaluations_run
    screened = {m.candidate.config for m in group.measurements if m.candidate.level is Level.SCREEN}
    assert screened == set(CONFIGS[:200])


def test_fast_steps_over_a_hole_that_one_key_moves_cannot_cross(rng: random.Random):
    """As on the H200 at M=256: the winner needs a larger BLOCK_SIZE_M *and* fewer stages, and
    every config with the larger tile and the old stage count fails to compile (it is not in the
    pruned set). One-key moves from the runner-up cannot reach the winner; two-key moves must."""
    runner_up = Config(64, 256, 64, 16, 8, 4)
    winner = Config(128, 256, 64, 16, 8, 3)
    allowed = tuple(c for c in CONFIGS if not (c.BLOCK_SIZE_M == 128 and c.num_stages == 4))
    base = bowl(runner_up.to_dict(), rng)
    surface = lambda c, M, gemm: base(c, M, gemm) - (100.0 if c == winner else 0.0)  # noqa: E731
    job = _search_job({256: allowed})
    fast = Fast([job])
    measured = drive(fast, surface)
    assert best_full(measured, 256) == winner


class LateVerdictCompiler(NoSpeculation):
    """Compile-ahead whose verdicts on BLOCK_SIZE_N=256 (out of resources) come only once nothing
    else is left to run (no GPU call in flight, nothing queued), as on the H200: a config compiling
    for seconds, alone in flight at the end of a round, then refused. (An idle worker may take one
    of them before that and decide it itself; the others still settle last.)"""

    def __init__(self, pool: StandInPool) -> None:
        super().__init__()
        self.pool = pool
        self.group: DeviceGroup | None = None
        self.pumped = False

    def status(self, shape: MoEShape, config: Config) -> CompileOutcome | None:
        if config.BLOCK_SIZE_N != 256:
            return CompileOutcome(Status.OK)
        if not self.pumped:
            return None
        return CompileOutcome(Status.OUT_OF_RESOURCES, "OutOfResources: stand-in")

    def pump(self, wait_s: float) -> bool:
        self.pumped |= not self.pool.busy() and not self.group.queue
        return True


@pytest.mark.parametrize("strategy_class", [Exhaustive, Fast])
def test_a_round_settled_by_a_late_compile_verdict_still_gets_its_full_timings(strategy_class, tmp_path,
                                                                                rng: random.Random):
    """On the H200 (gpt-oss-120b fp8_w8a8, M=4096, no budget) the last outcome of a screening
    round was a compile-ahead verdict settled while the GPU sat idle; the engine ended without
    asking the strategy again, and the batch size was chosen on a screen alone (87 screens, no
    full timing). Every batch size with correct screens must get its full timings."""
    optimum = {k: rng.choice(v) for k, v in SPACE.items()}
    clock = [0.0]
    pool = StandInPool(bowl(optimum, rng), clock)
    job = _search_job({M: [c for c in CONFIGS if c.BLOCK_SIZE_M == 16] for M in (64, 4096)})
    compiler = LateVerdictCompiler(pool)
    engine, group = _engine(tmp_path, strategy_class([job]), pool, clock, compiler=compiler)
    compiler.group = group
    engine.run()
    assert not engine.budget_ended
    assert any(m.status is Status.OUT_OF_RESOURCES for m in group.measurements)
    for M in (64, 4096):
        fulls = [m for m in group.measurements if m.candidate.M == M and m.candidate.level is Level.FULL and m.ok]
        assert len(fulls) >= SCREEN_FLOOR, f"M={M}: no full timing"
    assert all(g.phase.value == "done" for g in group.strategy.groups)


def test_a_group_whose_full_timings_all_fail_fully_times_the_next_screens(rng: random.Random):
    optimum = {k: rng.choice(v) for k, v in SPACE.items()}
    surface = bowl(optimum, rng)
    job = _search_job({64: CONFIGS[:200]})
    fast = Fast([job])
    failed_fulls: set[Config] = set()
    measured = []
    while round_ := fast.propose():
        for c in round_:
            fails = c.level is Level.FULL and len(failed_fulls) < FAST_FULL_MAX
            if fails:
                failed_fulls.add(c.config)
            m = Measurement(c, Status.CRASHED if fails else Status.OK,
                            latency_us=None if fails else surface(c.config, c.M, c.gemm))
            measured.append(m)
            fast.observe(m)
    good = [m for m in measured if m.candidate.level is Level.FULL and m.ok]
    assert len(failed_fulls) == FAST_FULL_MAX and len(good) == SCREEN_FLOOR
    assert not {m.candidate.config for m in good} & failed_fulls


def test_retries_of_failed_full_timings_are_bounded(rng: random.Random):
    """Every full timing fails: the next best screens get theirs ``FULL_RETRY_ROUNDS`` times,
    ``SCREEN_FLOOR`` at a time and never one twice, then the group ends on its screens."""
    optimum = {k: rng.choice(v) for k, v in SPACE.items()}
    surface = bowl(optimum, rng)
    fast = Fast([_search_job({64: CONFIGS[:200]})])
    fulls: list[list[Config]] = []
    while round_ := fast.propose():
        if any(c.level is Level.FULL for c in round_):
            fulls.append([c.config for c in round_ if c.level is Level.FULL])
        for c in round_:
            full = c.level is Level.FULL
            fast.observe(Measurement(c, Status.CRASHED if full else Status.OK,
                                     latency_us=None if full else surface(c.config, c.M, c.gemm)))
    assert [len(r) for r in fulls[1:]] == [SCREEN_FLOOR] * FULL_RETRY_ROUNDS
    assert len({c for r in fulls for c in r}) == sum(len(r) for r in fulls)


class TickCompiler:
    """Compile-ahead on the engine's loop: ``processes`` jobs compile at once, each done ``ticks``
    pumps after it started (``None``: never); needed jobs start before speculative ones and a
    speculative job the engine asks about becomes needed, as in ``workers.compile_pool``.
    ``ready_at_ask`` counts candidates whose config was compiled when the engine first asked."""

    def __init__(self, processes: int, ticks: int | None) -> None:
        self.stats = CompileStats(processes=processes)
        self.processes, self.ticks = processes, ticks
        self.needed: list = []
        self.speculative: list = []
        self.running: dict = {}
        self.done: dict = {}
        self.asked: set = set()
        self.speculated: set = set()
        self.ready_at_ask = 0

    @property
    def outstanding(self) -> bool:
        return bool(self.needed or self.speculative or self.running)

    def spare(self) -> int:
        return self.processes - len(self.needed) - len(self.speculative) - len(self.running)

    def status(self, shape: MoEShape, config: Config) -> CompileOutcome | None:
        key = (shape, config)
        if key in self.speculated:
            self.speculated.discard(key)
            self.stats.speculative_used += 1
            if key in self.speculative:
                self.speculative.remove(key)
                self.needed.append(key)
            self.ready_at_ask += key in self.done
        if key in self.done:
            return self.done[key]
        if key not in self.asked:
            self.asked.add(key)
            self.stats.jobs += 1
            self.needed.append(key)
        return None

    def speculate(self, likely) -> int:
        room, added = self.spare(), 0
        for key in likely:
            if added >= room:
                break
            if key not in self.asked:
                self.asked.add(key)
                self.speculated.add(key)
                self.speculative.append(key)
                added += 1
        self.stats.jobs += added
        self.stats.speculative += added
        return added

    def pump(self, wait_s: float) -> bool:
        arrived = False
        for key in list(self.running):
            self.running[key] -= 1
            if self.running[key] <= 0:
                del self.running[key]
                self.done[key] = CompileOutcome(Status.OK)
                self.stats.outcomes["ok"] += 1
                arrived = True
        while self.ticks is not None and len(self.running) < self.processes and (self.needed or self.speculative):
            key = (self.needed or self.speculative).pop(0)
            self.running[key] = self.ticks
        return arrived


def _fast_run(tmp_path, rng_seed: int, compiler: TickCompiler) -> tuple[list[Measurement], StandInPool]:
    rng = random.Random(rng_seed)
    optimum = {k: rng.choice(v) for k, v in SPACE.items()}
    clock = [0.0]
    pool = StandInPool(bowl(optimum, rng), clock)
    job = _search_job({M: CONFIGS for M in (1, 16, 256, 4096)})
    engine, group = _engine(tmp_path, Fast([job]), pool, clock, compiler=compiler)
    engine.run()
    return group.measurements, pool


def test_speculative_compiles_are_used_and_change_nothing_the_search_decides(tmp_path, rng: random.Random):
    """With spare compile processes the fast strategy's likely next configs (its local walk's next
    neighbours) compile before they are proposed; the candidates measured and their outcomes are
    the same as with no process to spare."""
    seed = rng.randrange(1 << 30)
    spare = TickCompiler(processes=400, ticks=2)
    measured, _ = _fast_run(tmp_path / "a", seed, spare)
    busy = TickCompiler(processes=400, ticks=2)
    busy.spare = lambda: 0  # every process taken: nothing is speculated
    reference, _ = _fast_run(tmp_path / "b", seed, busy)
    outcome = lambda ms: Counter((m.candidate, m.status, m.latency_us) for m in ms)  # noqa: E731
    assert outcome(measured) == outcome(reference)
    assert busy.stats.speculative == 0 and busy.ready_at_ask == 0
    stats = spare.stats
    assert stats.speculative > 0 and 0 < stats.speculative_used <= stats.speculative
    assert stats.to_json()["speculative"] == {"jobs": stats.speculative, "used": stats.speculative_used,
                                              "unused": stats.speculative - stats.speculative_used}
    assert spare.ready_at_ask > 0  # proposed configs found compiled already


def test_an_idle_worker_takes_a_candidate_still_compiling(tmp_path, rng: random.Random):
    """Compile-ahead that never finishes does not hold the GPUs back: each idle worker takes the
    oldest candidate still compiling and compiles it itself; the search ends as without it."""
    seed = rng.randrange(1 << 30)
    stuck = TickCompiler(processes=8, ticks=None)
    measured, pool = _fast_run(tmp_path / "a", seed, stuck)
    reference, _ = _fast_run(tmp_path / "b", seed, TickCompiler(processes=400, ticks=2))
    assert Counter(m.candidate for m in measured) == Counter(m.candidate for m in reference)
    assert stuck.stats.taken_uncompiled == len(pool.submitted) == len(measured)
    assert stuck.stats.outcomes.total() == 0


# -- the re-timing's compile-ahead (``tuner.engine.Retimer``) -----------------------------------


@dataclass
class RetimePool:
    """One slot; answers each re-timing call at once (one latency per finalist), logging it."""

    log: list[str]
    slots: list[Slot] = field(default_factory=lambda: [Slot(0, None, dict(ENV))])

    def free_slots(self) -> list[Slot]:
        return [s for s in self.slots if not s.pending]

    def submit(self, slot: Slot, task, call) -> None:
        self.log.append(f"retime M={task[1][0].M}")
        slot.pending.append(task)

    def poll(self, timeout_s: float) -> list[Done]:
        tasks = [(s, s.pending.popleft()) for s in self.slots if s.pending]
        return [Done(slot, task, [1.0] * len(task[1])) for slot, task in tasks]


class RetimeCompiler(NoSpeculation):
    """Compile-ahead after the search: ``slow`` compiles after ``pumps`` pumps (None: never); no
    other config ever does (the workers took them uncompiled in the search). Logs release, and
    fails on a status asked after it."""

    def __init__(self, slow: Config, pumps: int | None, log: list[str]) -> None:
        super().__init__()
        self.slow, self.pumps, self.log = slow, pumps, log
        self.pumped = 0
        self.released = False

    def status(self, shape: MoEShape, config: Config) -> CompileOutcome | None:
        assert not self.released, "status asked after release"
        if config == self.slow and self.pumps is not None and self.pumped >= self.pumps:
            return CompileOutcome(Status.OK)
        return None

    def pump(self, wait_s: float) -> bool:
        self.pumped += 1
        return self.pumps is not None and self.pumped == self.pumps

    def release(self) -> None:
        if not self.released:
            self.log.append("release")
        self.released = True


@pytest.mark.parametrize("pumps", [3, None], ids=["compiled-in-time", "never-compiled"])
def test_the_retiming_takes_compiled_batch_sizes_first_and_releases_compile_ahead_once_none_waits(
        tmp_path, pumps):
    """Three batch sizes; M=2's finalists hold a config no worker ran and compile-ahead has not
    compiled; the others' configs ran on the group's workers (never compiled ahead). The one
    worker re-times M=1 and M=4 first (compiled); M=2 once compiled (counted as
    compiled ahead), else last, compiling for itself (counted as taken uncompiled). Compile-ahead
    is released as soon as no batch size left waits for it (before M=2 is handed over when it
    compiled; right after, when it never does), and is never asked anything after."""
    configs = CONFIGS[:3]
    groups = [[Candidate(SHAPE, M, c) for c in configs] for M in (1, 2, 4)]
    slow = CONFIGS[3]
    groups[1].append(Candidate(SHAPE, 2, slow))
    log: list[str] = []
    pool = RetimePool(log)
    compiler = RetimeCompiler(slow, pumps, log)
    group = DeviceGroup(env=WorkerEnv.of(ENV), slots=pool.slots, strategy=None, compiler=compiler)
    group.ran = {(SHAPE, c) for c in configs}
    journal = Journal(tmp_path / "journal.jsonl")
    results = Retimer(pool, group, journal, Progress(io.StringIO(), live=False))(groups)
    assert [len(r) for r in results] == [3, 4, 3]
    stats = compiler.stats
    assert stats.retiming_jobs == 1
    if pumps is None:
        assert log == ["retime M=1", "retime M=4", "retime M=2", "release"]
        assert (stats.retiming_compiled, stats.retiming_taken_uncompiled) == (0, 1)
    else:
        assert log == ["retime M=1", "retime M=4", "release", "retime M=2"]
        assert (stats.retiming_compiled, stats.retiming_taken_uncompiled) == (1, 0)
