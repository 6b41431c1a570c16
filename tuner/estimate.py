"""What a tune will measure and roughly how long it takes, before any GPU is touched.

The count comes from the strategies themselves (``tuner.search``), not from a formula beside
them: the chosen strategy is run against the cost model (``tuner.cost_model``) standing in for
the GPU, every proposed candidate answered with its modelled latency. Where the search depends on
what the GPU says (the fast strategy's neighbour seeds, local-search walk and promotions; the
exhaustive strategy's promotions), the real count differs; the bounds that hold whatever the
timings are given with it:

- ``exhaustive``: every pruned config is screened (exact); full timings: at least
  ``SCREEN_FLOOR``, at most all screened configs per group;
- ``fast``: per group the initial slice is screened (exact: it is the cost model's ordering),
  then at most ``FAST_SEEDS_PER_NEIGHBOUR`` seeds per neighbouring batch size and at most
  ``FAST_MAX_LOCAL_ROUNDS`` local-search rounds of one- or two-key neighbours; full timings: at
  most ``max(FAST_FULL_MAX, SCREEN_FLOOR)`` per group, plus ``FULL_RETRY_ROUNDS`` ×
  ``SCREEN_FLOOR`` where every full timing of a group fails.

The time is the sum of three parts, each modelled from the measured H200 runs of
``docs/benchmarks.md`` (Mixtral-8x7B TP2 bf16, fast, one GPU: 102 s wall for 1301 screens and
108 full timings, 483 configs compiled ahead on 15 CPU processes in 630 CPU-s):

- start-up (Ray, workers): ``STARTUP_S``;
- compiling: distinct (shape, config) pairs × ``COMPILE_CPU_S`` / compile processes, overlapped
  with the GPU work (the GPUs start as soon as the first configs are compiled);
- GPU work: per measurement ``MEASUREMENT_OVERHEAD_S`` (problem set-up, correctness check against
  the reference, graph capture) plus its kernel calls (``SCREEN_CALLS`` or ``FULL_CALLS``, as
  ``workers.timing`` makes them) at the cost model's latency, divided over the GPU workers.

A rough number: the cost model ranks, it does not predict (its constants are Hopper-like), and
configs that fail to compile or run out of resources are counted as measured.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

from tuner.cost_model import predict_seconds
from tuner.progress import format_duration
from tuner.search import (FAST_FULL_MAX, FAST_MAX_LOCAL_ROUNDS, FAST_SEEDS_PER_NEIGHBOUR, FULL_RETRY_ROUNDS, SCREEN_FLOOR, STRATEGIES,
                          SearchJob, Strategy)
from workers.records import CONFIG_KEYS, Gemm, Level, Measurement, Status

SCREEN_CALLS = 5 * (1 + 2)
"""Kernel calls of one screen: ``workers.timing``'s SCREEN_INVOCATIONS × (SCREEN_WARMUP_REPLAYS + SCREEN_REPLAYS)."""
FULL_CALLS = 10 * (3 + 20)
"""Kernel calls of one full timing: GRAPH_INVOCATIONS × (WARMUP_REPLAYS + TIMED_REPLAYS)."""
STARTUP_S = 10.0
MEASUREMENT_OVERHEAD_S = 0.045
COMPILE_CPU_S = 1.3
"""CPU-seconds per config compiled ahead (630 CPU-s / 483 configs on the H200 host)."""
_LOCAL_NEIGHBOURS = 2 * len(CONFIG_KEYS) + 4 * math.comb(len(CONFIG_KEYS), 2)
"""At most this many configs per local-search round: one step up or down in each of the six keys,
then every pair of keys moved one step each."""


@dataclass(frozen=True)
class Estimate:
    """What one strategy measures for a set of jobs, and roughly how long it takes."""

    strategy: str
    groups: int
    """(shape, batch size, GEMM part) searches."""
    screens: int
    fulls: int
    screens_bounds: tuple[int, int]
    fulls_bounds: tuple[int, int]
    configs_to_compile: int
    kernel_s: float
    """Modelled seconds of kernel calls over all measurements (one GPU)."""
    workers: int
    compile_processes: int

    @property
    def measurements(self) -> int:
        return self.screens + self.fulls

    @property
    def compile_s(self) -> float:
        return self.configs_to_compile * COMPILE_CPU_S / max(1, self.compile_processes)

    @property
    def gpu_s(self) -> float:
        return (self.measurements * MEASUREMENT_OVERHEAD_S + self.kernel_s) / max(1, self.workers)

    @property
    def wall_s(self) -> float:
        return STARTUP_S + max(self.compile_s, self.gpu_s)

    def to_json(self) -> dict:
        return {
            "strategy": self.strategy, "groups": self.groups, "measurements": self.measurements,
            "screens": self.screens, "full_timings": self.fulls,
            "screens_bounds": list(self.screens_bounds), "full_timings_bounds": list(self.fulls_bounds),
            "configs_to_compile": self.configs_to_compile, "workers": self.workers,
            "compile_processes": self.compile_processes, "compile_s": round(self.compile_s, 1),
            "gpu_s": round(self.gpu_s, 1), "wall_s": round(self.wall_s, 1),
        }


def default_compile_processes(workers: int) -> int:
    """This host's CPUs less one per GPU worker, as the tuner sizes a node's compile pool."""
    return max(1, (os.cpu_count() or 1) - workers)


def format_estimate(e: Estimate) -> str:
    """Two lines: the count with its bounds, and the time with its parts."""
    screens_low, screens_high = e.screens_bounds
    count = (f"{e.strategy} strategy: about {e.measurements} measurements ({e.screens} screens + {e.fulls} full "
             f"timings over {e.groups} searches)")
    if screens_low == screens_high:
        count += f"; exactly {e.screens} screens, at most {e.fulls_bounds[1]} full timings"
    else:
        count += (f" if the GPU ranks configs as the cost model does; whatever the timings: {screens_low} to "
                  f"{screens_high} screens, at most {e.fulls_bounds[1]} full timings")
    time_line = (f"roughly {format_duration(e.wall_s)} on {e.workers} GPU worker(s): start-up {STARTUP_S:.0f}s, "
                 f"compiling {e.configs_to_compile} configs on {e.compile_processes} CPU processes "
                 f"~{format_duration(e.compile_s)}, measuring ~{format_duration(e.gpu_s)} (overlapped)")
    return count + "\n" + time_line


def estimate(jobs: Sequence[SearchJob], strategy: str, workers: int = 1, compile_processes: int = 1,
             split_gemms: bool = False) -> Estimate:
    """Run ``strategy`` (a ``tuner.search.STRATEGIES`` name) over ``jobs`` with the cost model
    answering for the GPU; ``workers`` GPU workers, ``compile_processes`` CPU compile processes."""
    search: Strategy = STRATEGIES[strategy](jobs, split_gemms)
    counts = {Level.SCREEN: 0, Level.FULL: 0}
    compiled: set = set()
    kernel_s = 0.0
    while proposals := search.propose():
        for candidate in proposals:
            seconds = predict_seconds(candidate.shape, candidate.M, candidate.config, candidate.gemm)
            counts[candidate.level] += 1
            compiled.add((candidate.shape, candidate.config))
            kernel_s += seconds * (SCREEN_CALLS if candidate.level is Level.SCREEN else FULL_CALLS)
            search.observe(Measurement(candidate=candidate, status=Status.OK, latency_us=seconds * 1e6))
    return Estimate(strategy=strategy, groups=len(search.groups), screens=counts[Level.SCREEN],
                    fulls=counts[Level.FULL], screens_bounds=_screen_bounds(search, strategy),
                    fulls_bounds=_full_bounds(search, strategy), configs_to_compile=len(compiled), kernel_s=kernel_s,
                    workers=workers, compile_processes=compile_processes)


def _screen_bounds(search: Strategy, strategy: str) -> tuple[int, int]:
    low = high = 0
    for group in search.groups:
        space = len(set(group.configs) | set(group.baseline))
        if strategy == "fast":
            first = len(set(search.initial_slice(group)) | set(group.baseline))
            neighbours = len(search.neighbour_groups(group))
            low += first
            high += min(space, first + FAST_SEEDS_PER_NEIGHBOUR * neighbours
                        + FAST_MAX_LOCAL_ROUNDS * _LOCAL_NEIGHBOURS)
        else:
            low += space
            high += space
    return low, high


def _full_bounds(search: Strategy, strategy: str) -> tuple[int, int]:
    """No full timing at all when every screen fails; at most the promotion cap (fast; plus the
    retry rounds of a group whose every full timing failed) or every screened config
    (exhaustive), the baselines, and with split GEMMs the pairing round's two per GEMM part."""
    cap = max(FAST_FULL_MAX, SCREEN_FLOOR) + FULL_RETRY_ROUNDS * SCREEN_FLOOR if strategy == "fast" else None
    high = 0
    for group in search.groups:
        screened = len(group.screens)
        high += (min(cap, screened) if cap is not None else screened) + len(group.baseline)
        high += 2 if group.gemm is not Gemm.BOTH else 0
    return 0, high
