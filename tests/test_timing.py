"""The timers, through their public functions, on work of known length.

CPU: ``time.sleep`` never returns early, so a wall-clock latency can be bounded from below
exactly; the upper bounds leave room for a loaded machine. GPU (marked ``gpu``, skipped without
CUDA): the CUDA-graph timer against CUDA events around plain launches of a spin kernel whose
length is set in clock cycles.
"""

from __future__ import annotations

import time

import pytest
import torch

from workers.timing import (GRAPH_INVOCATIONS, SCREEN_INVOCATIONS, SCREEN_WALL_RUNS, WALL_RUNS, summarize,
                            time_call, time_interleaved, time_screen)

SLACK_US = 50_000  # a busy 2-core CI host may deschedule a sleeper for tens of ms


class Sleeper:
    """A callable that sleeps ``seconds`` and counts its calls (``log`` records its name per call)."""

    def __init__(self, seconds: float, name: str = "", log: list[str] | None = None) -> None:
        self.seconds, self.name, self.log, self.calls = seconds, name, log, 0

    def __call__(self) -> None:
        self.calls += 1
        if self.log is not None:
            self.log.append(self.name)
        time.sleep(self.seconds)


@pytest.mark.parametrize("timer,runs", [(time_call, WALL_RUNS), (time_screen, SCREEN_WALL_RUNS)])
def test_wall_clock_latency_is_the_sleep_length(timer, runs):
    short, long = Sleeper(0.002), Sleeper(0.060)
    t_short, t_long = timer(short, "cpu"), timer(long, "cpu")
    assert (short.calls, long.calls) == (runs, runs)
    assert (t_short.samples, t_long.samples) == (runs, runs)
    assert 2_000 <= t_short.median_us < 2_000 + SLACK_US
    assert 60_000 <= t_long.median_us < 60_000 + SLACK_US
    assert t_long.median_us > t_short.median_us
    assert 0 <= t_short.spread_us < SLACK_US


def test_interleaved_wall_clock_rotates_the_order_and_times_each_callable():
    log: list[str] = []
    sleepers = [Sleeper(0.001, "a", log), Sleeper(0.030, "b", log), Sleeper(0.010, "c", log)]
    timings = time_interleaved(sleepers, "cpu", rounds=4)
    assert log == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert [t.samples for t in timings] == [4, 4, 4]
    for sleeper, timing in zip(sleepers, timings):
        assert sleeper.seconds * 1e6 <= timing.median_us < sleeper.seconds * 1e6 + SLACK_US
    assert timings[1].median_us > timings[0].median_us
    assert [t.samples for t in time_interleaved(sleepers[:1], "cpu")] == [WALL_RUNS]


def test_summary_is_the_median_and_the_spread():
    assert summarize([5.0, 1.0, 3.0]) == summarize([1.0, 3.0, 5.0])
    small = summarize([5.0, 1.0, 3.0])
    assert (small.median_us, small.spread_us, small.samples) == (3.0, 4.0, 3)  # max − min below 4 samples
    big = summarize([float(v) for v in (9, 1, 5, 3, 7, 100, 2, 4)])  # the outlier moves neither number
    assert (big.median_us, big.spread_us, big.samples) == (4.5, 4.75, 8)  # interquartile range 7.5 − 2.75
    with pytest.raises(ValueError):
        summarize([])


def _spin(cycles: int):
    return lambda: torch.cuda._sleep(cycles)


def _event_us(fn, calls: int = 50) -> float:
    """µs per call of ``fn`` from CUDA events around ``calls`` plain (not captured) launches."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000.0 / calls


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_latency_matches_events_around_plain_launches():
    """A spin of ~100 µs and one 4× as long: launch overhead is noise at that length, so the
    graph timer must agree with plain event timing, and scale with the spin."""
    cycles = 200_000  # ~100 µs at ~2 GHz
    short, long = _spin(cycles), _spin(4 * cycles)
    for fn in (short, long):
        fn()
    torch.cuda.synchronize()
    captured: list[int] = []

    def counted() -> None:
        captured.append(1)
        short()

    full = time_call(counted, "cuda")
    assert len(captured) == GRAPH_INVOCATIONS  # Python runs only while capturing; replays are the graph's
    captured.clear()
    screen = time_screen(counted, "cuda")
    assert len(captured) == SCREEN_INVOCATIONS
    reference = _event_us(short)
    assert full.median_us == pytest.approx(reference, rel=0.10)
    assert screen.median_us == pytest.approx(reference, rel=0.15)
    assert time_call(long, "cuda").median_us == pytest.approx(4 * full.median_us, rel=0.10)
    a, b = time_interleaved([short, long], "cuda")
    assert b.median_us == pytest.approx(4 * a.median_us, rel=0.10)
    assert a.median_us == pytest.approx(reference, rel=0.10)
