"""Fault isolation: failure classification, the fault-injection hook, the watchdog, and a whole
tune in which chosen candidates raise, kill their worker process or hang."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

from tune_helpers import (VLLM_FILE, deterministic_ranking, expected_evaluations, expected_vllm_file, run_tune, tune_argv,
                          write_fault_plan)
from workers.faults import ENV_VAR, FaultPlan, InjectedFault
from workers.records import Candidate, Config, DType, MoEShape, Status
from workers.failures import ConfigRejected, classify
from workers.worker import WATCHDOG_EXIT_CODE


def test_failures_map_to_statuses():
    assert classify(OutOfResources(232448, 227 * 1024, "shared memory")) is Status.OUT_OF_RESOURCES
    assert classify(CompilationError("def k(): ...", None, "bad tile")) is Status.COMPILE_ERROR
    assert classify(ConfigRejected("block fp8 needs ...")) is Status.COMPILE_ERROR
    assert classify(InjectedFault("boom")) is Status.CRASHED
    assert classify(RuntimeError("CUDA error: an illegal memory access was encountered")) is None
    assert classify(RuntimeError("Triton Error [CUDA]: misaligned address")) is None
    assert classify(RuntimeError("CUDA error: unspecified launch failure")) is None


def test_fault_plan_matches_config_and_batch_size(tmp_path):
    shape = MoEShape(E=4, N=64, K=64, topk=2, dtype=DType.BF16)
    a, b = Config(16, 32, 32, 1, 4, 2), Config(32, 64, 64, 1, 4, 2)
    path = write_fault_plan(tmp_path / "plan.json", [{"config": a.label, "M": 4, "action": "raise"},
                                                     {"config": b.label, "action": "hang"}])
    plan = FaultPlan.from_file(str(path))
    assert plan.action_for(Candidate(shape, 4, a)) == "raise"
    assert plan.action_for(Candidate(shape, 1, a)) is None
    assert plan.action_for(Candidate(shape, 1, b)) == plan.action_for(Candidate(shape, 64, b)) == "hang"
    with pytest.raises(InjectedFault):
        plan.inject(Candidate(shape, 4, a))
    latencies = {plan.latency_us(Candidate(shape, m, c)) for m in (1, 4) for c in (a, b)}
    assert len(latencies) == 4 and all(100 <= v < 200 for v in latencies)
    assert plan.latency_us(Candidate(shape, 1, a)) == FaultPlan(deterministic_latency=True).latency_us(
        Candidate(shape, 1, a))
    assert FaultPlan().latency_us(Candidate(shape, 1, a)) is None
    (tmp_path / "bad.json").write_text(json.dumps({"faults": [{"config": a.label, "action": "explode"}]}))
    with pytest.raises(ValueError):
        FaultPlan.from_file(str(tmp_path / "bad.json"))


def test_watchdog_ends_a_hung_process():
    script = ("import time; from workers.worker import Watchdog; w = Watchdog(0.5, poll_s=0.05)\n"
              "with w.guard('a hang'):\n    time.sleep(30)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == WATCHDOG_EXIT_CODE, done.stderr
    assert "a hang ran past" in done.stderr


@pytest.mark.timeout(600)
def test_faulty_candidates_are_quarantined_and_the_files_equal_a_clean_runs(tmp_path, monkeypatch):
    ranking = deterministic_ranking()
    # Faults go to candidates that lose anyway, so a run that survives them must write the clean run's file.
    kill, hang = ranking[1][-1], ranking[4][-1]
    throw = ranking[4][-2]
    faults = [{"config": kill.config.label, "M": 1, "action": "kill"},
              {"config": throw.config.label, "M": 4, "action": "raise"},
              {"config": hang.config.label, "M": 4, "action": "hang"}]
    monkeypatch.setenv(ENV_VAR, str(write_fault_plan(tmp_path / "faults.json", faults)))
    out = tmp_path / "out"
    code, summary = run_tune(tune_argv(out, timeout_s=15))
    assert code == 0
    assert summary["failed"] == {"crashed": 2, "timeout": 1}
    reported = {(f["config"], f["M"]): f for f in summary["devices"][0]["failures"]}
    assert reported[(kill.config.label, 1)]["status"] == Status.CRASHED.value
    assert "died" in reported[(kill.config.label, 1)]["message"]
    assert reported[(throw.config.label, 4)]["status"] == Status.CRASHED.value
    assert "InjectedFault" in reported[(throw.config.label, 4)]["message"]
    assert reported[(hang.config.label, 4)]["status"] == Status.TIMEOUT.value
    failing = frozenset({(kill.config.label, 1), (throw.config.label, 4), (hang.config.label, 4)})
    assert summary["evaluations_run"] == expected_evaluations(failing)
    assert json.loads((out / VLLM_FILE).read_text()) == expected_vllm_file()

    # Quarantined candidates are journaled like any other, so a resumed run does not try them again.
    records = [json.loads(line) for line in (out / ".moe-tune-journal.jsonl").read_text().splitlines()]
    attempts = {(Config.from_dict(r["candidate"]["config"]).label, r["candidate"]["M"], r["status"]): r["attempts"]
                for r in records if r["kind"] == "measure" and r["status"] != "ok"}
    assert attempts == {(kill.config.label, 1, "crashed"): 2, (throw.config.label, 4, "crashed"): 1,
                        (hang.config.label, 4, "timeout"): 2}


@pytest.mark.timeout(300)
def test_a_lone_worker_that_dies_is_restarted_and_the_run_finishes(tmp_path, monkeypatch):
    """With one worker nothing is in flight while it restarts: the engine must keep polling to
    bring it back (it once spun forever here, as both workers of a 2-GPU run did on H200s)."""
    ranking = deterministic_ranking()
    kill = ranking[1][-1]
    faults = [{"config": kill.config.label, "M": 1, "action": "kill"}]
    monkeypatch.setenv(ENV_VAR, str(write_fault_plan(tmp_path / "faults.json", faults)))
    out = tmp_path / "out"
    argv = tune_argv(out, timeout_s=60)
    argv[argv.index("--workers") + 1] = "1"
    code, summary = run_tune(argv)
    assert code == 0
    assert summary["failed"] == {"crashed": 1}
    assert summary["evaluations_run"] == expected_evaluations(frozenset({(kill.config.label, 1)}))
    assert json.loads((out / VLLM_FILE).read_text()) == expected_vllm_file()
