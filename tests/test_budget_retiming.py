"""A run ended by its time budget still re-times its finalists, within a cap (issue 11, budget).

``driver.tune`` runs on a stand-in pool (no Ray) whose actors answer at once and whose clock is
the run's injected clock: the search's single timings are deliberately misleading (one config
looks 5% faster than it is), the back-to-back re-timing tells the truth, so a run that skipped
the re-timing would write the misleading config. The re-timing cap is tested by making each
re-timing call cost more than the cap.
"""

from __future__ import annotations

import io
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from tuner import driver
from tuner import select as selection
from tuner.commands.tune import format_summary, summarize
from tuner.plan import Job as PlanJob
from tuner.pool import Done, Slot
from tuner.progress import Progress
from tuner.search import SearchJob
from workers.records import Candidate, Config, DType, Gemm, Measurement, MoEShape, Status

SHAPE = MoEShape(E=8, N=256, K=128, topk=2, dtype=DType.BF16)
ENV = {"device": "stand-in GPU", "torch": "t", "triton": "t", "kernel": "builtin", "kernel_hash": "h"}
CONFIGS = [Config(16, 32 * (1 + i % 4), 64, 1, 4, 2 + i // 4) for i in range(12)]
BEST, LIAR, BASELINE = CONFIGS[0], CONFIGS[1], CONFIGS[5]
BATCH_SIZES = (1, 16, 64, 256)


def true_us(config: Config, M: int) -> float:
    """The config's real latency: CONFIGS[0] is best, then in list order, 1 µs apart."""
    return 100.0 + M / 100 + CONFIGS.index(config)


def search_us(config: Config, M: int) -> float:
    """One noisy timing: LIAR looks 5% faster than it is (and faster than BEST)."""
    return true_us(config, M) * (0.95 if config == LIAR else 1.0)


@dataclass
class _Method:
    answer: object

    def remote(self, *args):
        return self.answer(*args)


class StandInActor:
    def __init__(self) -> None:
        self.measure = _Method(lambda c: Measurement(c, Status.OK, latency_us=search_us(c.config, c.M),
                                                     device=ENV["device"]))
        self.retime = _Method(lambda cs: [true_us(c.config, c.M) for c in cs])


@dataclass
class StandInPool:
    """Calls finish when polled; each poll advances ``clock`` by the slowest call it returns
    (the actors work in parallel): ``measure_s`` per candidate, ``retime_s`` per re-timing."""

    clock: list[float]
    measure_s: float = 1.0
    retime_s: float = 2.0
    slots: list[Slot] = field(default_factory=lambda: [Slot(i, StandInActor(), env=dict(ENV)) for i in range(2)])
    submitted: list[tuple[float, str, object]] = field(default_factory=list)

    def live_slots(self) -> list[Slot]:
        return self.slots

    def free_slots(self) -> list[Slot]:
        return [s for s in self.slots if not s.pending]

    def busy(self) -> bool:
        return any(s.pending for s in self.slots)

    def recovering(self) -> bool:
        return False

    def submit(self, slot: Slot, task, call) -> None:
        kind = "retime" if isinstance(task, tuple) else "measure"
        self.submitted.append((self.clock[0], kind, task))
        slot.pending = deque([(kind, task, call(slot.actor))])

    def poll(self, timeout_s: float) -> list[Done]:
        events, cost = [], 0.0
        for slot in self.slots:
            if slot.pending:
                kind, task, value = slot.pending.popleft()
                cost = max(cost, self.retime_s if kind == "retime" else self.measure_s)
                events.append(Done(slot, task, value))
        self.clock[0] += cost
        return events

    def shutdown(self) -> None:
        pass


def _request(tmp_path: Path, budget_s: float, written: list) -> driver.TuneRequest:
    job = PlanJob(model="stand-in", shape=SHAPE, tp=1, ep=1, file_name="", sglang_file_name="",
                  candidates={M: list(CONFIGS) for M in BATCH_SIZES}, dropped_by_reason={})
    search = SearchJob(job, baseline_by_m={M: (BASELINE,) for M in BATCH_SIZES})

    def write(device, env, chosen, split):
        written.append(chosen)
        return []

    return driver.TuneRequest(jobs_for_device=lambda device: [search], write_outputs=write,
                              journal_path=tmp_path / "journal.jsonl", interpret=True, strategy="exhaustive",
                              budget_s=budget_s)


def _tune(tmp_path, monkeypatch, pool: StandInPool, budget_s: float):
    monkeypatch.setattr(driver, "start_pool", lambda *args, **kwargs: pool)
    written: list = []
    stream = io.StringIO()
    result = driver.tune(_request(tmp_path, budget_s, written), Progress(stream, live=False),
                         clock=lambda: pool.clock[0])
    return result, written[0], stream.getvalue()


def test_a_budget_ended_run_retimes_its_finalists(tmp_path, monkeypatch):
    pool = StandInPool(clock=[1000.0])
    # 48 screens (two at a time, 1 s each) take 24 s: a 30 s budget ends among the full timings.
    result, chosen, log = _tune(tmp_path, monkeypatch, pool, budget_s=30)
    assert result.budget_ended and result.retime_cap_s == driver.retime_cap_s(30) == driver.BUDGET_RETIME_MIN_S
    measured = result.devices[0].measurements
    tops = selection.finalists(measured, selection.FINALISTS,
                               {selection.GroupKey(SHAPE, "uniform", Gemm.BOTH, M): [BASELINE] for M in BATCH_SIZES})
    assert len(chosen) == len(BATCH_SIZES)
    fooled = 0
    for key, selected in chosen.items():
        finalists = [m.candidate.config for m in tops[key]]
        assert selected.retimed, key
        assert selected.candidate.config == min(finalists, key=lambda c: true_us(c, key.M))
        assert selected.latency_us == true_us(selected.candidate.config, key.M)
        assert selected.baseline_us == true_us(BASELINE, key.M)  # the baseline was re-timed alongside
        # The search's own numbers would have picked LIAR where it was a finalist next to a better config.
        fooled += LIAR in finalists and selected.candidate.config != LIAR
    assert fooled >= 1, "the stand-in surface must make skipping the re-timing visible"
    # Only candidates with a correct timing were re-timed, none was measured for the re-timing's sake.
    retimed = [c for _, kind, (_, cs) in ((t, k, x) for t, k, x in pool.submitted if k == "retime") for c in cs]
    timed = {m.candidate for m in measured if m.ok}
    assert retimed and set(retimed) <= timed
    assert result.retimed_groups == len(BATCH_SIZES) and result.retimes_cut == 0
    assert "re-timing the finalists found so far" in log

    summary = summarize(result)
    assert summary["retime_cap_s"] == driver.BUDGET_RETIME_MIN_S and summary["retimes_cut"] == 0
    assert all(entry["retimed"] for per_m in summary["devices"][0]["best"].values() for entry in per_m.values())
    text = format_summary(summary)
    assert f"their finalists were re-timed back to back ({len(BATCH_SIZES)} batch sizes)" in text
    assert "not re-timed" not in text


def test_the_retiming_after_a_budget_is_capped(tmp_path, monkeypatch):
    cap = driver.retime_cap_s(30)
    # Each re-timing call costs 1.2 caps: the first wave (two workers) starts, the next
    # would start past the cap and does not; the rest keep the search's numbers.
    pool = StandInPool(clock=[0.0], retime_s=1.2 * cap)
    result, chosen, log = _tune(tmp_path, monkeypatch, pool, budget_s=30)
    assert result.budget_ended and result.retime_cap_s == cap
    retimes = [t for t, kind, _ in pool.submitted if kind == "retime"]
    measures_end = max(t for t, kind, _ in pool.submitted if kind == "measure") + pool.measure_s
    assert len(retimes) == 2 and all(t < measures_end + cap for t in retimes)
    assert result.retimed_groups == 2 and result.retimes_cut == len(BATCH_SIZES) - 2
    assert sum(s.retimed for s in chosen.values()) == 2
    for key, selected in chosen.items():
        if not selected.retimed:
            assert selected.latency_us == selected.search_latency_us  # the search's numbers, as stated
    assert "re-timing cap reached" in log
    text = format_summary(summarize(result))
    assert f"{len(BATCH_SIZES) - 2} batch sizes kept the search's numbers (the {cap:g}s re-timing cap ran out)" in text


def test_the_cap_grows_with_the_budget():
    assert driver.retime_cap_s(60) == driver.BUDGET_RETIME_MIN_S
    assert driver.retime_cap_s(600) == 600 * driver.BUDGET_RETIME_FRACTION
