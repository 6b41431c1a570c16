"""The worker pool's bookkeeping with real Ray actors (a toy class, no kernels): a call overdue
beyond the timeout gets its actor killed (the backstop for a hang the worker's own watchdog
cannot end), the culprit is the oldest call in flight, calls queued behind it come back
uncharged, and the restarted actor gets work again once it answers a ping."""

from __future__ import annotations

import os
import time

import pytest
import ray

from tuner import pool as pool_module
from tuner.errors import RunFailed
from tuner.pool import Done, Lost, Raised, WorkerPool
from workers.records import Status

pytestmark = pytest.mark.timeout(300)


def toy_class() -> type:
    """Defined in a function so Ray ships the class by value (workers cannot import test modules)."""

    class Toy:
        def describe(self) -> dict[str, str]:
            return {"device": "toy"}

        def ping(self) -> int:
            return os.getpid()

        def work(self, seconds: float) -> int:
            time.sleep(seconds)
            return os.getpid()

        def die(self) -> None:
            os._exit(3)

        def fail(self, changed: bool) -> None:
            from workers.failures import InputChanged

            raise (InputChanged if changed else ValueError)("routing file ids.pt changed since it was pinned")

    return Toy


@pytest.fixture(scope="module")
def toy_pool():
    ray.init(num_cpus=2, include_dashboard=False)
    actor = ray.remote(toy_class()).options(max_restarts=-1, max_task_retries=0).remote()
    notes: list[str] = []
    workers = WorkerPool([actor], timeout_s=5.0, note=notes.append)
    workers.describe_all()
    yield workers, notes
    workers.shutdown()
    ray.shutdown()


def poll_until(workers: WorkerPool, done, limit_s: float = 120) -> list:
    events: list = []
    deadline = time.monotonic() + limit_s
    while not done(events) and time.monotonic() < deadline:
        events += workers.poll(0.2)
    assert done(events), events
    return events


def test_overdue_call_kills_its_actor_and_only_the_culprit_is_charged(toy_pool, monkeypatch):
    workers, notes = toy_pool
    monkeypatch.setattr(pool_module, "OVERDUE_GRACE_S", 0.5)
    slot = workers.slots[0]
    first_pid = ray.get(slot.actor.ping.remote())
    workers.submit(slot, "hang", lambda actor: actor.work.remote(1000))
    workers.submit(slot, "queued", lambda actor: actor.work.remote(0))
    events = poll_until(workers, lambda evs: len(evs) >= 2)
    assert [(e.task, e.culprit, e.cause) for e in events] == [("hang", True, Status.TIMEOUT),
                                                              ("queued", False, Status.TIMEOUT)]
    assert all(isinstance(e, Lost) for e in events)
    assert any("overdue" in n for n in notes)
    assert workers.free_slots() == [], "a lost actor gets no work until it answers a ping"

    poll_until(workers, lambda _: slot.lost_since is None)
    workers.submit(slot, "after", lambda actor: actor.work.remote(0))
    (done,) = poll_until(workers, lambda evs: len(evs) >= 1)
    assert isinstance(done, Done) and done.task == "after" and done.value != first_pid


def test_a_process_that_dies_fast_is_a_crash(toy_pool):
    workers, _ = toy_pool
    slot = workers.slots[0]
    poll_until(workers, lambda _: slot.lost_since is None)
    workers.submit(slot, "poison", lambda actor: actor.die.remote())
    (lost,) = poll_until(workers, lambda evs: len(evs) >= 1)
    assert isinstance(lost, Lost) and lost.culprit and lost.cause is Status.CRASHED
    poll_until(workers, lambda _: slot.lost_since is None)
    assert not slot.retired


def test_a_changed_input_ends_the_run_where_another_error_is_the_calls(toy_pool):
    """A worker's InputChanged (a pinned routing file changed during the run) is nobody's status:
    the pool ends the run with its message; any other error a method raises is that call's."""
    workers, _ = toy_pool
    poll_until(workers, lambda _: workers.slots[0].lost_since is None)
    raised = workers.call("other", lambda actor: actor.fail.remote(False))
    assert isinstance(raised, Raised) and raised.task == "other"
    with pytest.raises(RunFailed, match=r"^routing file ids.pt changed since it was pinned$"):
        workers.call("changed", lambda actor: actor.fail.remote(True))


def test_a_raised_call_reads_as_one_line_of_its_own_exception():
    """Progress notes and run failures quote a failed call as one line: the actor method's own
    exception (a Ray task error's ``cause``), never Ray's multi-line traceback."""

    class TaskError(Exception):  # the shape of ray.exceptions.RayTaskError: a traceback text, the cause
        def __init__(self, cause: BaseException) -> None:
            super().__init__("ray::BenchmarkWorker.retime() (pid=1, ip=10.0.0.1)\n  File \"x.py\", line 3\n    boom")
            self.cause = cause

    raised = Raised(slot=None, task=None, error=TaskError(ValueError("bad finalists\nsecond line")))
    assert raised.reason == "ValueError: bad finalists"
    assert Raised(slot=None, task=None, error=RuntimeError("plain\nmore")).reason == "RuntimeError: plain"
    assert Lost(slot=None, task=None, culprit=True, cause=Status.CRASHED, detail="worker died").reason == "worker died"
