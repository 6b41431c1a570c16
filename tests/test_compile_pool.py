"""The compile pool's contract with stand-in compile functions: results come back keyed, a job
that raises or kills its process is reported as crashed, a job that hangs is killed at its
deadline and reported as timeout, and the pool goes on with fresh processes either way."""

from __future__ import annotations

import os
import threading
import time

import pytest

from workers.compile_pool import CompilePool, PoolFailure
from workers.records import Status

pytestmark = pytest.mark.timeout(180)


def stand_in_compile(job: tuple[str, int]) -> tuple[int, int]:
    """("ok", n) → (n², pid); "sleep" sleeps n s first; "raise" raises; "die" ends its process;
    "hang" never returns."""
    action, n = job
    if action == "sleep":
        time.sleep(n)
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


def _one_process_held() -> tuple[CompilePool, float]:
    """A pool of one process running the job ``block`` (1.5 s), and a deadline 60 s away for the
    caller's waits: what is submitted next queues."""
    pool = CompilePool(stand_in_compile, processes=1, timeout_s=60.0)
    pool.submit("block", ("sleep", 1.5))
    deadline = time.monotonic() + 60
    while pool._processes[0].key is None and time.monotonic() < deadline:  # the process took it
        time.sleep(0.01)
    return pool, deadline


def test_speculative_jobs_run_only_while_no_needed_job_waits():
    """One process: a needed job runs while speculative and needed ones arrive; every needed one
    (and a promoted one, in promotion order) then runs before the speculative ones, oldest first."""
    pool, deadline = _one_process_held()
    try:
        for key in ("s1", "s2", "s3"):
            pool.submit(key, ("ok", 1), speculative=True)
        pool.submit("n1", ("ok", 2))
        pool.submit("n2", ("ok", 3))
        pool.promote("s3")
        pool.promote("x")  # promoted before its speculative submission arrives: it is ordinary
        pool.submit("x", ("ok", 4), speculative=True)
        pool.promote("block")  # already running: nothing changes
        order = []
        while len(order) < 7 and time.monotonic() < deadline:
            order += [key for key, _, _ in pool.results(timeout_s=0.5)]
        assert order == ["block", "n1", "n2", "s3", "x", "s1", "s2"]
    finally:
        pool.close()


def test_drop_waiting_forgets_jobs_not_started():
    """``drop_waiting`` returns the keys no process has started (ordinary ones first, in submission
    order), none of them is ever reported, the running job still is, and a dropped key is new
    again: promoted before its next (speculative) submission, it runs as an ordinary job, while a
    promotion made before the drop is forgotten with it (its job, submitted speculative later,
    stays speculative)."""
    pool, deadline = _one_process_held()
    try:
        pool.submit("n1", ("ok", 1))
        pool.submit("s1", ("ok", 2), speculative=True)
        pool.submit("n2", ("ok", 3))
        pool.promote("s3")  # a promotion whose job has not arrived: forgotten with the waiting jobs
        assert pool.drop_waiting() == ["n1", "n2", "s1"]
        pool.submit("s3", ("ok", 6), speculative=True)  # speculative again: runs after the ordinary n2
        pool.submit("s2", ("ok", 4), speculative=True)
        pool.promote("n2")
        pool.submit("n2", ("ok", 5), speculative=True)
        order = []
        while len(order) < 4 and time.monotonic() < deadline:
            order += [(key, result[0]) for key, result, _ in pool.results(timeout_s=0.5)]
        assert order == [("block", 2.25), ("n2", 25), ("s3", 36), ("s2", 16)]
        assert pool.results(timeout_s=1.0) == []  # the dropped jobs never run
    finally:
        pool.close()


def test_close_ends_busy_processes_at_once():
    pool = CompilePool(stand_in_compile, processes=2, timeout_s=600.0)
    pool.submit("hang", ("hang", 0))
    pool.submit("a", ("ok", 1))
    collect(pool, 1)
    processes = [p.process for p in pool._processes]
    started = time.monotonic()
    other = threading.Thread(target=pool.close)  # as the driver's release and its final close may
    other.start()
    pool.close()
    other.join(10)
    assert not other.is_alive()
    assert time.monotonic() - started < 5 and not any(p.is_alive() for p in processes)
