"""Progress: done/total over the queued work (resumed work counted as done), the best *full*
timing per batch size, a log line at least every LOG_INTERVAL_S and on every phase change."""

from __future__ import annotations

import io
import random
import re

from test_search import CONFIGS, ENV, SHAPE, SPACE, StandInPool, _search_job, bowl
from tuner.engine import DeviceGroup, Engine
from tuner.journal import Journal, WorkerEnv
from tuner.progress import LOG_INTERVAL_S, Progress
from tuner.search import Exhaustive, Fast, SearchJob
from workers.records import Candidate, Config, Gemm, Level, Measurement, Status

CONFIG = Config(16, 32, 32, 1, 4, 2)


def _measurement(M: int, level: Level, latency_us: float | None, config: Config = CONFIG,
                 status: Status = Status.OK, gemm: Gemm = Gemm.BOTH) -> Measurement:
    candidate = Candidate(shape=SHAPE, M=M, config=config, gemm=gemm, level=level)
    return Measurement(candidate, status, latency_us=latency_us if status is Status.OK else None)


def _counters(text: str) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in re.findall(r"\[(\d+)/(\d+)\]", text)]


def test_best_is_the_best_full_timing_never_a_screen() -> None:
    stream = io.StringIO()
    progress = Progress(stream, live=True)
    progress.queued(4)
    progress.record(_measurement(8, Level.SCREEN, 50.0), reused=False)
    assert "best" not in progress.status_line()
    progress.record(_measurement(8, Level.FULL, 80.0), reused=False)
    progress.record(_measurement(8, Level.FULL, 70.0, config=Config(32, 32, 32, 1, 4, 2)), reused=False)
    progress.record(_measurement(8, Level.FULL, 60.0, gemm=Gemm.UP), reused=False)
    line = progress.status_line()
    assert f"best full timing {SHAPE.label} M=8:70.0us" in line and "50.0" not in line and "60.0" not in line
    assert "[4/4]" in line


def test_log_line_at_least_every_interval_and_on_every_phase() -> None:
    clock = [0.0]
    stream = io.StringIO()
    progress = Progress(stream, live=False, clock=lambda: clock[0])
    progress.phase("searching (fast strategy)")
    assert stream.getvalue() == "moe-tune: searching (fast strategy)\n"
    progress.queued(10)
    clock[0] = LOG_INTERVAL_S - 0.1
    progress.tick()
    progress.record(_measurement(1, Level.SCREEN, 5.0), reused=False)
    assert stream.getvalue().count("\n") == 1  # nothing yet: the last line is younger than the interval
    clock[0] = LOG_INTERVAL_S + 0.1
    progress.tick()  # no result arrived, but the interval passed: a status line anyway
    assert stream.getvalue().count("\n") == 2 and "[1/10]" in stream.getvalue()
    clock[0] += LOG_INTERVAL_S / 2
    progress.phase("re-timing the finalists of 2 batch sizes on X")
    assert stream.getvalue().endswith("moe-tune: re-timing the finalists of 2 batch sizes on X\n")
    clock[0] += LOG_INTERVAL_S - 0.2
    progress.tick()  # the phase line counts as a line: the interval restarts there
    assert stream.getvalue().count("\n") == 3


def test_a_time_budget_drop_leaves_the_total() -> None:
    progress = Progress(io.StringIO(), live=False)
    progress.queued(10)
    progress.record(_measurement(1, Level.SCREEN, 5.0), reused=False)
    progress.dropped(7)
    assert (progress.done, progress.total) == (1, 3)


def _run(tmp_path, strategy_class, progress: Progress, seed: int) -> Engine:
    rng = random.Random(seed)
    clock = [0.0]
    optimum = {k: rng.choice(v) for k, v in SPACE.items()}
    pool = StandInPool(bowl(optimum, rng), clock)
    job = _search_job({M: CONFIGS[:120] for M in (1, 16)})
    group = DeviceGroup(env=WorkerEnv.of(ENV), slots=pool.slots, strategy=strategy_class([job]))
    with Journal(tmp_path / "journal.jsonl") as journal:
        engine = Engine(pool, [group], journal, progress, clock=lambda: clock[0])
        engine.run()
    return engine


def test_counts_stay_within_the_queued_work_fresh_and_resumed(tmp_path) -> None:
    for strategy_class in (Fast, Exhaustive):
        folder = tmp_path / strategy_class.__name__
        folder.mkdir()
        first_stream = io.StringIO()
        first = _run(folder, strategy_class, Progress(first_stream, live=True), seed=1)
        counters = _counters(first_stream.getvalue())
        assert counters and all(0 < done <= total for done, total in counters), counters
        assert counters[-1] == (first.evaluations_run, first.evaluations_run)

        # The same run again: everything is answered from the journal and counted as done.
        again_stream = io.StringIO()
        again = _run(folder, strategy_class, Progress(again_stream, live=False), seed=1)
        assert again.evaluations_run == 0 and again.evaluations_reused == first.evaluations_run
        counters = _counters(again_stream.getvalue())
        assert counters and all(0 < done <= total for done, total in counters), counters
        assert counters[-1] == (again.evaluations_reused, again.evaluations_reused)
