"""The compile pool's contract with stand-in compile functions: results come back keyed, a job
that raises or kills its process is reported as crashed, a job that hangs is killed at its
deadline and reported as timeout, and the pool goes on with fresh processes either way."""

from __future__ import annotations

import os
import time

import pytest

from workers.compile_pool import CompilePool, PoolFailure
from workers.records import Status

pytestmark = pytest.mark.timeout(180)


def stand_in_compile(job: tuple[str, int]) -> tuple[int, int]:
    """("ok", n) → (n², pid); "raise" raises; "die" ends its process; "hang" never returns."""
    action, n = job
    if action == "raise":
        raise ValueError(f"stand-in compile error {n}")
    if action == "die":
        os._exit(3)
    if action == "hang":
        while True:
            time.sleep(1)
    return n * n, os.getpid()


def collect(pool: CompilePool, count: int, limit_s: float = 120) -> dict:
    results: dict = {}
    deadline = time.monotonic() + limit_s
    while len(results) < count and time.monotonic() < deadline:
        for key, result, seconds in pool.results(timeout_s=0.5):
            assert key not in results, f"{key} reported twice"
            results[key] = result
    return results


def test_results_failures_and_timeouts():
    pool = CompilePool(stand_in_compile, processes=2, timeout_s=3.0)
    try:
        jobs = {"a": ("ok", 3), "hang": ("hang", 0), "raise": ("raise", 7), "die": ("die", 0), "b": ("ok", 4)}
        for key, job in jobs.items():
            pool.submit(key, job)
        started = time.monotonic()
        results = collect(pool, len(jobs))
        assert set(results) == set(jobs)
        assert results["a"][0] == 9 and results["b"][0] == 16
        assert isinstance(results["raise"], PoolFailure) and results["raise"].status is Status.CRASHED
        assert "stand-in compile error 7" in results["raise"].message
        assert isinstance(results["die"], PoolFailure) and results["die"].status is Status.CRASHED
        assert "died" in results["die"].message
        hang = results["hang"]
        assert isinstance(hang, PoolFailure) and hang.status is Status.TIMEOUT and hang.seconds >= 3.0
        assert time.monotonic() - started < 60, "the hang held up the pool"
        assert pool.results() == []  # each job reported once, nothing left over

        # the pool still has its two processes, fresh ones in place of the killed/dead ones
        for i in range(4):
            pool.submit(("again", i), ("ok", i))
        again = collect(pool, 4)
        assert sorted(v[0] for v in again.values()) == [0, 1, 4, 9]
        assert pool.size == 2
        assert results["a"][1] != os.getpid()
    finally:
        pool.close()
