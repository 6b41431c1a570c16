"""Compile-ahead's driver side (``tuner.compiling.CompileAhead``) without Ray: its service is a real
``CompileService`` (a ``CompilePool`` of one compile process) in this process, behind a stand-in
for the Ray actor handle, running a stand-in ``Compiler`` that records the order jobs run in.

Promotion: a speculative job the strategy then proposes (``CompileAhead.status``) becomes a
needed one, so it runs before every speculative job still waiting, not after them.

The search's end (``CompileAhead.end_search``): jobs no process started are dropped, and one the
re-timing then asks for is submitted again as a needed job; over two nodes, one dropped on one
node while the other compiles it is submitted again to the node that dropped it only.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest

from workers.compile_ahead import CompileJob, CompileOutcome, CompileService, CompileTarget
from workers.records import Config, DType, MoEShape, Status

pytestmark = pytest.mark.timeout(120)

SHAPE = MoEShape(E=4, N=64, K=64, topk=2, dtype=DType.BF16)
TARGET = CompileTarget("stand-in", 0, 32, 0)
GATE_WAIT_S = 60.0


@dataclass(frozen=True)
class GatedCompiler:
    """A stand-in ``workers.compile_ahead.Compiler`` (runs in the pool's process: importable by
    reference). Each job appends its config's label to the file ``log``; the job of ``held``
    waits until the file ``gate`` exists first, so the one process stays busy while the test
    submits and promotes."""

    log: str
    gate: str
    held: Config
    kernel: str = "builtin"
    needs_gpu: ClassVar[bool] = False

    def target(self, reported: CompileTarget | None) -> CompileTarget:
        return TARGET

    def setup(self) -> None:
        pass

    def compile(self, job: CompileJob) -> CompileOutcome:
        if job.config == self.held:
            deadline = time.monotonic() + GATE_WAIT_S
            while not os.path.exists(self.gate) and time.monotonic() < deadline:
                time.sleep(0.01)
        with open(self.log, "a", encoding="utf-8") as log:
            log.write(job.config.label + "\n")
        return CompileOutcome(Status.OK, "", 1, 0.0)


@dataclass(frozen=True)
class _Done:
    """A finished call's result (or the exception it raised), standing for Ray's object reference."""

    value: object
    error: Exception | None = None

    def result(self) -> object:
        if self.error is not None:
            raise self.error
        return self.value


class _Handle:
    """A Ray actor handle's surface over an object in this process: ``handle.f.remote(*args)``
    calls ``f`` at once (``ray.get`` raises what it raised). ``answers`` override methods (name →
    function); ``calls`` lists the names called."""

    def __init__(self, target: object, **answers) -> None:
        self._target, self._answers = target, answers
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> SimpleNamespace:
        method = self._answers.get(name) or getattr(self._target, name)

        def remote(*args) -> _Done:
            self.calls.append(name)
            try:
                return _Done(method(*args))
            except Exception as exc:  # noqa: BLE001 - surfaces at ``get``, as Ray's do
                return _Done(None, exc)

        return SimpleNamespace(remote=remote)


class _Ray:
    """What ``tuner.compiling`` calls on Ray, for ``_Done`` references; ``killed``: the handles killed."""

    killed: list = []

    @staticmethod
    def get(refs, timeout: float | None = None):
        return [ref.result() for ref in refs] if isinstance(refs, list) else refs.result()

    @staticmethod
    def wait(refs, num_returns: int = 1, timeout: float | None = None):
        return list(refs), []

    @staticmethod
    def kill(actor, no_restart: bool = True) -> None:
        _Ray.killed.append(actor)


def _one_held_process(tmp_path: Path, monkeypatch, held: Config):
    """``CompileAhead`` over a real ``CompileService`` of one compile process whose job for
    ``held`` waits for the file ``gate``: (compile-ahead, service, log, gate)."""
    from tuner import compiling

    monkeypatch.setattr(compiling, "ray", _Ray)
    log, gate = tmp_path / "order", tmp_path / "gate"
    service = CompileService(1, 60.0, GatedCompiler(str(log), str(gate), held))
    # The service counts its processes as CompileAhead does: while the pool has not handed the
    # speculative jobs out yet (its supervisor's tick), they wait behind needed jobs arriving
    # meanwhile. Here the one process is held, so that moment lasts, and the service says 4.
    handle = _Handle(service, size=lambda: 4)
    return compiling.CompileAhead(TARGET, [compiling._Service("node", handle, 4)], {SHAPE: (1, 8)}, print), \
        service, log, gate


def _release(ahead, gate: Path) -> None:
    """Let the held job finish, then take in every outcome."""
    gate.touch()
    deadline = time.monotonic() + GATE_WAIT_S
    while ahead.outstanding and time.monotonic() < deadline:
        ahead.pump(0.5)


def test_a_speculative_job_the_strategy_proposes_runs_before_the_speculative_ones_waiting(tmp_path: Path,
                                                                                        monkeypatch) -> None:
    """One compile process, held by a needed job. Three speculative jobs and a second needed one
    wait behind it; then the strategy proposes the last speculative config. Released, the
    process runs the needed jobs, then the promoted one, then the other speculative ones."""
    held, needed, *speculative = [Config(16, n, 32, 1, 4, 2) for n in (16, 32, 64, 128, 256)]
    ahead, _, log, gate = _one_held_process(tmp_path, monkeypatch, held)
    try:
        assert ahead.status(SHAPE, held) is None
        assert ahead.speculate([(SHAPE, c) for c in speculative]) == 3
        assert ahead.status(SHAPE, needed) is None
        promoted = speculative[-1]
        assert ahead.status(SHAPE, promoted) is None  # proposed now: promoted
        _release(ahead, gate)
        assert log.read_text().split() == [c.label for c in (held, needed, promoted, *speculative[:-1])]
        assert ahead.stats.speculative == 3 and ahead.stats.speculative_used == 1 and ahead.stats.jobs == 5
        assert all(ahead.status(SHAPE, c) == CompileOutcome(Status.OK, "", 1, 0.0)
                   for c in (held, needed, *speculative))
    finally:
        ahead.close()


def test_the_search_end_drops_what_no_process_started_and_a_dropped_config_asked_again_compiles(
        tmp_path: Path, monkeypatch) -> None:
    """One compile process, held by a needed job; a needed job and two speculative ones wait.
    ``end_search`` drops the three waiting (counted), leaving the held one running. The re-timing
    then asks for one dropped speculative config: it is submitted again as a needed job and
    compiles right after the held one; nothing else dropped ever runs."""
    held, needed, *speculative = [Config(16, n, 32, 1, 4, 2) for n in (16, 32, 64, 128)]
    ahead, service, log, gate = _one_held_process(tmp_path, monkeypatch, held)
    try:
        assert ahead.status(SHAPE, held) is None
        deadline = time.monotonic() + GATE_WAIT_S
        while service.pool._processes[0].key is None and time.monotonic() < deadline:
            time.sleep(0.01)  # the held job reached the process
        assert ahead.status(SHAPE, needed) is None
        assert ahead.speculate([(SHAPE, c) for c in speculative]) == 2
        ahead.end_search()
        assert ahead.stats.dropped == 3
        wanted = speculative[-1]
        assert ahead.status(SHAPE, wanted) is None  # asked again: a needed job
        assert ahead.stats.speculative_used == 0 and ahead.stats.jobs == 5
        _release(ahead, gate)
        assert log.read_text().split() == [held.label, wanted.label]
        assert ahead.status(SHAPE, wanted) == CompileOutcome(Status.OK, "", 1, 0.0)
        assert ahead.stats.to_json()["dropped_at_search_end"] == 3
        ahead.release()  # after it, what was not compiled is the GPU worker's to compile: never waited for
        from tuner.compiling import NOT_AHEAD

        assert ahead.status(SHAPE, Config(16, 256, 32, 1, 4, 2)) == NOT_AHEAD
        assert ahead.status(SHAPE, wanted) == CompileOutcome(Status.OK, "", 1, 0.0)
    finally:
        ahead.close()


def test_a_service_dropped_at_the_search_end_is_told_to_stop_and_killed_at_close(tmp_path: Path,
                                                                                 monkeypatch) -> None:
    """A service whose ``drop_waiting`` fails (as one that does not answer in time) is dropped
    by ``end_search``: it is told to stop its processes at once (nobody takes in what they would
    compile), and ``close`` kills its actor as it does the others'; what the re-timing then asks
    is not compiled ahead."""
    from tuner import compiling

    monkeypatch.setattr(compiling, "ray", _Ray)
    monkeypatch.setattr(_Ray, "killed", [])
    service = CompileService(1, 60.0, GatedCompiler(str(tmp_path / "order"), str(tmp_path / "gate"), None))

    def no_answer() -> list:
        raise TimeoutError("no answer")

    handle = _Handle(service, size=lambda: 1, drop_waiting=no_answer)
    ahead = compiling.CompileAhead(TARGET, [compiling._Service("node", handle, 1)], {SHAPE: (1, 8)}, lambda _: None)
    try:
        ahead.end_search()
        assert not ahead.available
        assert handle.calls[-2:] == ["drop_waiting", "close"]
        assert service.pool._closed  # its processes were stopped
        assert ahead.status(SHAPE, Config(16, 16, 32, 1, 4, 2)) == compiling.NOT_AHEAD
    finally:
        ahead.close()
    assert _Ray.killed == [handle]


def test_a_config_dropped_on_one_node_and_compiling_on_another_is_not_compiled_twice(tmp_path: Path,
                                                                                      monkeypatch) -> None:
    """A device group over two nodes, one compile process each. Node A's process is held by the
    first config, so the second waits there; node B finished the first and is compiling the
    second when the search ends. ``end_search`` drops the second on A only: it is still being
    compiled (on B), so it is not counted dropped, and the re-timing's ask for it submits it again
    to A alone — B, which is compiling it, does not get it a second time."""
    from tuner import compiling

    monkeypatch.setattr(compiling, "ray", _Ray)
    first, second = Config(16, 16, 32, 1, 4, 2), Config(16, 32, 32, 1, 4, 2)
    nodes = {}
    for node, held in (("A", first), ("B", second)):
        service = CompileService(1, 60.0, GatedCompiler(str(tmp_path / f"order-{node}"),
                                                        str(tmp_path / f"gate-{node}"), held))
        nodes[node] = service, compiling._Service(node, _Handle(service, size=lambda: 1), 1)
    ahead = compiling.CompileAhead(TARGET, [s for _, s in nodes.values()], {SHAPE: (1, 8)}, lambda _: None)

    def running(node: str, config: Config) -> None:
        deadline = time.monotonic() + GATE_WAIT_S
        while nodes[node][0].pool._processes[0].key != (SHAPE, config) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert nodes[node][0].pool._processes[0].key == (SHAPE, config)

    try:
        assert ahead.status(SHAPE, first) is None
        assert ahead.status(SHAPE, second) is None
        running("A", first)
        running("B", second)
        ahead.end_search()
        assert ahead.stats.dropped == 0  # B still compiles it: its outcome will come
        assert ahead.status(SHAPE, second) is None  # the re-timing asks for it
        assert ahead.stats.jobs == 2
        for node in nodes:
            (tmp_path / f"gate-{node}").touch()
        deadline = time.monotonic() + GATE_WAIT_S
        while ahead.outstanding and time.monotonic() < deadline:
            ahead.pump(0.5)
        assert not ahead.outstanding
        assert (tmp_path / "order-A").read_text().split() == [first.label, second.label]  # submitted again to A
        assert (tmp_path / "order-B").read_text().split() == [first.label, second.label]  # once, not twice
        assert ahead.status(SHAPE, second) == CompileOutcome(Status.OK, "", 1, 0.0)
    finally:
        ahead.close()
