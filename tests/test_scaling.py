"""Compile-ahead off the GPUs' critical path (issue 11, scaling), end to end through Ray with
logical GPUs and the fault hook's stand-in compiler (``workers.faults``: it controls how long a
compile-ahead job takes, under the interpreter, which has no compiler to run ahead).

- Idle workers never wait for compile-ahead: with compiles that never finish, every candidate is
  taken by an idle worker (which compiles it itself) and the run writes the clean run's file.
- Speculation: with spare compile processes the fast strategy's likely next configs are
  compiled before they are proposed (counted in the summary: used where the strategy, replayed
  offline on the same latencies, proposed the config, unused otherwise), and the run measures
  exactly what that replay measures.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tune_helpers import (BATCH_SIZES, TINY_MODEL, VLLM_FILE, expected_vllm_file, run_tune, tune_argv,
                          write_fault_plan)
from tuner.journal import JOURNAL_NAME
from tuner.models import load_model
from tuner.plan import build_plan
from tuner.search import Fast, SearchJob
from tuner.spaces import load_space
from workers.faults import ENV_VAR, FaultPlan
from workers.records import Candidate, Measurement, Status

pytestmark = pytest.mark.timeout(600)

WIDER_SPACE = """description: 72 tiny configs, so the fast strategy walks past its first slice
BLOCK_SIZE_M: [16, 32]
BLOCK_SIZE_N: [16, 32, 64]
BLOCK_SIZE_K: [16, 32, 64]
GROUP_SIZE_M: [1, 4]
num_warps: [2, 4]
num_stages: [2]
"""


def _plan(path: Path, job_s: float) -> Path:
    write_fault_plan(path)
    plan = json.loads(path.read_text())
    plan["compile_ahead"] = {"setup_s": 0, "job_s": job_s}
    path.write_text(json.dumps(plan))
    return path


def test_idle_workers_do_not_wait_for_compile_ahead(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(_plan(tmp_path / "faults.json", job_s=3600)))
    out = tmp_path / "out"
    code, summary = run_tune(tune_argv(out, "--strategy", "exhaustive"))
    assert code == 0
    assert json.loads((out / VLLM_FILE).read_text()) == expected_vllm_file()
    stats = summary["devices"][0]["compile_ahead"]
    assert stats["outcomes"] == {}  # not one compile-ahead job finished
    assert stats["taken_uncompiled"] == summary["evaluations_run"] > 0
    # Every finalist ran on a worker in this search (compiled there): the re-timing asks compile-ahead
    # for none of them, though compile-ahead never finished one (``DeviceGroup.ran``).
    assert stats["retiming"]["jobs"] == 0, stats
    t = summary["timeline"]
    assert t["first_measurement_s"] - t["worker_start"]["end_s"] < 5, t


def _replayed_candidates(space: Path) -> list[Candidate]:
    """What the fast strategy measures on the tiny model when every candidate takes the fault
    hook's deterministic latency."""
    plan = build_plan([load_model(str(TINY_MODEL))], 1, 1, None, None, list(BATCH_SIZES), load_space(str(space)),
                      "cpu")
    strategy = Fast([SearchJob(job) for job in plan.jobs])
    latency = FaultPlan(deterministic_latency=True).latency_us
    measured = []
    while proposed := strategy.propose():
        for candidate in proposed:
            strategy.observe(Measurement(candidate, Status.OK, latency_us=latency(candidate)))
            measured.append(candidate)
    return measured


def test_speculative_compiles_are_counted_and_change_nothing_measured(tmp_path, monkeypatch):
    space = tmp_path / "space.yaml"
    space.write_text(WIDER_SPACE)
    monkeypatch.setenv(ENV_VAR, str(_plan(tmp_path / "faults.json", job_s=0.02)))
    argv = tune_argv(tmp_path / "out")
    argv[argv.index("--search-space") + 1] = str(space)
    code, summary = run_tune(argv)
    assert code == 0
    proposed = _replayed_candidates(space)
    assert summary["evaluations_run"] == len(proposed)
    # Every config the strategy proposed was asked for once, as a needed job or taken from
    # speculation (used); every other job is a speculative one the strategy never proposed
    # (unused), whichever configs were speculated and when.
    stats = summary["devices"][0]["compile_ahead"]
    unused = stats["jobs"] - len({(c.shape, c.config) for c in proposed})
    speculative = stats["speculative"]
    assert speculative["unused"] == unused, stats
    assert speculative["used"] == speculative["jobs"] - unused > 0, stats
    # Every finalist ran in this run's search: the re-timing asks compile-ahead for nothing.
    assert summary["devices"][0]["compile_ahead"]["retiming"] == {
        "jobs": 0, "batch_sizes_compiled_ahead": 0, "batch_sizes_taken_uncompiled": 0}


def test_a_resumed_run_compiles_the_journals_finalists_ahead_of_their_retiming(tmp_path, monkeypatch):
    """A journal that holds the whole search but no re-timing (the driver killed while re-timing,
    or a run resumed on another node or with an empty Triton cache): the search ends at once, all
    reused, and nothing in this run compiled the finalists. They are submitted to compile-ahead
    before they are re-timed; the one worker takes the first batch size still compiling (and
    compiles for itself), and the next once compile-ahead has compiled it."""
    out = tmp_path / "out"
    argv = tune_argv(out, "--strategy", "exhaustive")
    argv[argv.index("--workers") + 1] = "1"
    monkeypatch.setenv(ENV_VAR, str(write_fault_plan(tmp_path / "plain.json")))
    code, first = run_tune(argv)
    assert code == 0 and first["retimed_groups"] == len(BATCH_SIZES)
    journal = out / JOURNAL_NAME
    lines = journal.read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["kind"] != "retime"]
    assert len(kept) == len(lines) - len(BATCH_SIZES)
    journal.write_text("\n".join(kept) + "\n")
    (out / VLLM_FILE).unlink()

    # Same measurements (the plan's digest ignores the stand-in compiler and the delays). The
    # workers start 3 s late, so the compile processes are up when the re-timing asks; each
    # re-timing takes 2 s longer (a GPU worker compiling the finalists itself), so compile-ahead
    # finishes the second batch size's while the first is re-timed.
    plan = json.loads((tmp_path / "plain.json").read_text())
    plan.update(compile_ahead={"setup_s": 0, "job_s": 0}, worker_start_s=3, retime_s=2)
    (tmp_path / "faults.json").write_text(json.dumps(plan))
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "faults.json"))
    code, summary = run_tune(argv)
    assert code == 0
    assert summary["evaluations_run"] == 0 and summary["evaluations_reused"] == first["evaluations_run"]
    assert summary["retimed_groups"] == len(BATCH_SIZES) and summary["retimes_reused"] == 0
    assert json.loads((out / VLLM_FILE).read_text()) == expected_vllm_file()
    stats = summary["devices"][0]["compile_ahead"]
    retiming = stats["retiming"]
    assert retiming["jobs"] > 0 and stats["outcomes"].get("ok", 0) >= 1, stats
    assert retiming["batch_sizes_taken_uncompiled"] == 1, stats  # the first, taken at once
    assert retiming["batch_sizes_compiled_ahead"] == len(BATCH_SIZES) - 1, stats
    t = summary["timeline"]
    assert t["compile_ahead"]["end_s"] > t["retiming"]["start_s"], t  # outcomes taken in while re-timing
    assert t["retiming"]["end_s"] <= t["writing"]["start_s"], t
