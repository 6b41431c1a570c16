"""Latency of one MoE call: CUDA-graph replays on a GPU, wall clock under the Triton interpreter.

Why a CUDA graph: launching the kernels of one MoE call from Python costs tens of µs of CPU time,
as much as a decode-sized kernel takes on the GPU; replaying a captured graph measures the GPU's
time only, which is what a server running CUDA graphs sees (vLLM's and SGLang's tuners do the same).

GPU numbers, per candidate: ``GRAPH_INVOCATIONS`` = 10 MoE calls captured in one graph (one
replay is long enough for the event timer's ~0.5 µs resolution), ``WARMUP_REPLAYS`` = 3 replays
discarded (clocks, caches, TLB), then ``TIMED_REPLAYS`` = 20 replays, each timed with CUDA events;
latency = median over replays of (replay time / 10), spread = interquartile range of the same.
The median, not the mean, because a replay hit by a clock change or a neighbour's burst is an
outlier to drop, not a cost to average in.

Screening (``Level.SCREEN``), the cheap first look the search uses to drop clear losers before
paying for the above: ``SCREEN_INVOCATIONS`` = 5 calls in one graph, ``SCREEN_WARMUP_REPLAYS`` = 1
replay discarded, the median of ``SCREEN_REPLAYS`` = 2 timed replays (about a tenth of the full
timing's GPU time). A screen is only compared with a generous margin (``tuner.search``).

Under the interpreter (no GPU) the numbers are meaningless for tuning, but the path must run:
``WALL_RUNS`` = 3 calls timed with ``time.perf_counter``, median and spread = max - min (1 call
for a screen).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

GRAPH_INVOCATIONS = 10
WARMUP_REPLAYS = 3
TIMED_REPLAYS = 20
WALL_RUNS = 3
SCREEN_INVOCATIONS = 5
SCREEN_WARMUP_REPLAYS = 1
SCREEN_REPLAYS = 2
SCREEN_WALL_RUNS = 1


@dataclass(frozen=True)
class Timing:
    """Latency of one call in µs: the median over samples and its spread."""

    median_us: float
    spread_us: float
    samples: int


def summarize(samples_us: Sequence[float]) -> Timing:
    """Median and spread (interquartile range from 4 samples on, max - min below that)."""
    if not samples_us:
        raise ValueError("no timing samples")
    ordered = sorted(samples_us)
    if len(ordered) >= 4:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
        spread = q3 - q1
    else:
        spread = ordered[-1] - ordered[0]
    return Timing(median_us=statistics.median(ordered), spread_us=spread, samples=len(ordered))


class GraphTimer:
    """One callable captured ``invocations`` times in a CUDA graph; ``replay_us`` times one replay.

    The callable must have run once before (Triton compiles on the first launch, which cannot be
    captured) and must not synchronise with the host.
    """

    def __init__(self, fn: Callable[[], object], invocations: int = GRAPH_INVOCATIONS) -> None:
        self.invocations = invocations
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            for _ in range(invocations):
                fn()
        torch.cuda.synchronize()
        self._start = torch.cuda.Event(enable_timing=True)
        self._end = torch.cuda.Event(enable_timing=True)

    def warm_up(self, replays: int = WARMUP_REPLAYS) -> None:
        for _ in range(replays):
            self.graph.replay()
        torch.cuda.synchronize()

    def replay_us(self) -> float:
        """µs per captured call, from one timed replay."""
        self._start.record()
        self.graph.replay()
        self._end.record()
        self._end.synchronize()
        return self._start.elapsed_time(self._end) * 1000.0 / self.invocations

    def release(self) -> None:
        self.graph.reset()


def time_cuda_graph(fn: Callable[[], object], replays: int = TIMED_REPLAYS, invocations: int = GRAPH_INVOCATIONS,
                    warmup_replays: int = WARMUP_REPLAYS) -> Timing:
    timer = GraphTimer(fn, invocations)
    try:
        timer.warm_up(warmup_replays)
        return summarize([timer.replay_us() for _ in range(replays)])
    finally:
        timer.release()


def time_wall_clock(fn: Callable[[], object], runs: int = WALL_RUNS) -> Timing:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e6)
    return summarize(samples)


def time_call(fn: Callable[[], object], device: str) -> Timing:
    """The latency of ``fn`` on ``device`` ("cuda…": CUDA graph; "cpu": interpreter wall clock)."""
    return time_cuda_graph(fn) if device.startswith("cuda") else time_wall_clock(fn)


def time_screen(fn: Callable[[], object], device: str) -> Timing:
    """A cheap latency estimate of ``fn`` for screening (numbers in the module docstring)."""
    if device.startswith("cuda"):
        return time_cuda_graph(fn, SCREEN_REPLAYS, SCREEN_INVOCATIONS, SCREEN_WARMUP_REPLAYS)
    return time_wall_clock(fn, SCREEN_WALL_RUNS)


def time_interleaved(fns: Sequence[Callable[[], object]], device: str, rounds: int | None = None) -> list[Timing]:
    """Time several callables back to back, alternating between them round by round
    (``rounds`` default: ``TIMED_REPLAYS`` graph replays each on a GPU, ``WALL_RUNS`` calls on the CPU).

    Finalists are compared this way because a machine's speed drifts (clocks, heat, neighbours):
    timing A fully, then B, lets the drift decide; interleaving exposes each to the same drift.
    The order rotates every round so no callable always runs right after the same other one.
    """
    if rounds is None:
        rounds = TIMED_REPLAYS if device.startswith("cuda") else WALL_RUNS
    if device.startswith("cuda"):
        timers = [GraphTimer(fn) for fn in fns]
        for timer in timers:
            timer.warm_up()
        sample_one: list[Callable[[], float]] = [timer.replay_us for timer in timers]
    else:
        timers = []
        sample_one = [_wall_sampler(fn) for fn in fns]
    samples: list[list[float]] = [[] for _ in fns]
    try:
        for r in range(rounds):
            for i in range(len(fns)):
                j = (i + r) % len(fns)
                samples[j].append(sample_one[j]())
    finally:
        for timer in timers:
            timer.release()
    return [summarize(s) for s in samples]


def _wall_sampler(fn: Callable[[], object]) -> Callable[[], float]:
    def sample() -> float:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e6
    return sample
