"""Fault isolation: failure classification, the fault-injection hook, the watchdog, and a whole
tune in which chosen candidates raise, kill their worker process, hang or compute a wrong result."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

from tune_helpers import (VLLM_FILE, deterministic_ranking, expected_evaluations, expected_vllm_file, run_tune, tune_argv,
                          write_fault_plan)
from tuner.journal import measurement_key
from workers.faults import CORRUPT_SCALE, ENV_VAR, FaultPlan, InjectedFault, active_plan
from workers.records import Candidate, Config, DType, MoEShape, Status
from workers.failures import ConfigRejected, classify
from workers.worker import POISON_EXIT_CODE, WATCHDOG_EXIT_CODE


def test_failures_map_to_statuses():
    assert classify(OutOfResources(232448, 227 * 1024, "shared memory")) is Status.OUT_OF_RESOURCES
    assert classify(CompilationError("def k(): ...", None, "bad tile")) is Status.COMPILE_ERROR
    assert classify(ConfigRejected("block fp8 needs ...")) is Status.COMPILE_ERROR
    # Triton's compiler raises a failed MLIR pass as a plain RuntimeError (seen on an H200, Triton 3.6)
    assert classify(RuntimeError("PassManager::run failed")) is Status.COMPILE_ERROR
    assert classify(RuntimeError("something else failed")) is Status.CRASHED
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


def test_corrupt_scales_the_output_after_the_run_and_nothing_else(tmp_path):
    shape = MoEShape(E=4, N=64, K=64, topk=2, dtype=DType.BF16)
    a, b = Config(16, 32, 32, 1, 4, 2), Config(32, 64, 64, 1, 4, 2)
    plan = FaultPlan.from_file(str(write_fault_plan(tmp_path / "plan.json",
                                                    [{"config": a.label, "M": 4, "action": "corrupt"}])))
    plan.inject(Candidate(shape, 4, a))  # acts on the output, not before the run
    for candidate, scale in ((Candidate(shape, 4, a), CORRUPT_SCALE), (Candidate(shape, 1, a), 1.0),
                             (Candidate(shape, 4, b), 1.0)):
        output = torch.arange(1.0, 7.0).view(2, 3)
        plan.corrupt_output(candidate, output)
        assert torch.equal(output, torch.arange(1.0, 7.0).view(2, 3) * scale), candidate.config.label


@pytest.fixture
def describe_worker(monkeypatch):
    """``BenchmarkWorker().describe()`` under a fault plan file (None: no plan)."""
    from workers.worker import BenchmarkWorker

    def describe(plan_path: Path | None) -> dict[str, str]:
        if plan_path is None:
            monkeypatch.delenv(ENV_VAR, raising=False)
        else:
            monkeypatch.setenv(ENV_VAR, str(plan_path))
        active_plan.cache_clear()  # the plan is read once per process
        return BenchmarkWorker(timeout_s=600).describe()

    yield describe
    active_plan.cache_clear()


def test_a_fault_plan_is_part_of_the_worker_environment_so_fake_timings_are_never_reused(tmp_path, describe_worker):
    shape = MoEShape(E=4, N=64, K=64, topk=2, dtype=DType.BF16)
    candidate = Candidate(shape, 4, Config(16, 32, 32, 1, 4, 2))
    real = describe_worker(None)
    fake = describe_worker(write_fault_plan(tmp_path / "a.json"))
    faulty = describe_worker(write_fault_plan(tmp_path / "b.json", [{"config": candidate.config.label,
                                                                      "action": "corrupt"}]))
    assert describe_worker(write_fault_plan(tmp_path / "c.json")) == fake  # the plan's content, not its path
    assert "fault_plan" not in real
    assert {k: v for k, v in fake.items() if k != "fault_plan"} == real
    keys = {measurement_key(env, candidate) for env in (real, fake, faulty)}
    assert len(keys) == 3


def test_watchdog_ends_a_hung_process():
    script = ("import time; from workers.worker import Watchdog; w = Watchdog(0.5, poll_s=0.05)\n"
              "with w.guard('a hang'):\n    time.sleep(30)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == WATCHDOG_EXIT_CODE, done.stderr
    assert "a hang ran past 0.5s;" in done.stderr  # a sub-second --timeout was reported as "0s"


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


@pytest.mark.timeout(300)
def test_a_wrong_but_finite_result_is_journaled_and_never_written_even_when_fastest(tmp_path, monkeypatch):
    """The kernel runs, then the fault hook scales its output by 1.5: finite, plausible, wrong.
    Each M's corrupted candidate is its fastest under the fake latencies, so only the check
    against the reference can keep it out of the file."""
    fastest = {M: ranked[0] for M, ranked in deterministic_ranking().items()}
    faults = [{"config": c.config.label, "M": M, "action": "corrupt"} for M, c in fastest.items()]
    monkeypatch.setenv(ENV_VAR, str(write_fault_plan(tmp_path / "faults.json", faults)))
    out = tmp_path / "out"
    code, summary = run_tune(tune_argv(out))
    assert code == 0
    wrong = frozenset((c.config.label, M) for M, c in fastest.items())
    assert summary["failed"] == {"wrong_result": len(fastest)}
    assert summary["evaluations_run"] == expected_evaluations(wrong)
    written = json.loads((out / VLLM_FILE).read_text())
    assert written == expected_vllm_file(wrong)
    assert all(written[str(M)] != c.config.to_dict() for M, c in fastest.items())
    records = [json.loads(line) for line in (out / ".moe-tune-journal.jsonl").read_text().splitlines()]
    corrupted = {r["candidate"]["M"]: r for r in records if r["kind"] == "measure"
                 and Config.from_dict(r["candidate"]["config"]) == fastest[r["candidate"]["M"]].config}
    assert sorted(corrupted) == sorted(fastest)
    for record in corrupted.values():
        assert record["status"] == Status.WRONG_RESULT.value and record["latency_us"] is None
        assert record["rel_err"] == pytest.approx(CORRUPT_SCALE - 1, rel=0.05)  # |1.5·out − ref| / |ref|


@pytest.mark.timeout(300)
def test_a_worker_dying_while_re_timing_leaves_the_choice_to_the_search_numbers(tmp_path, monkeypatch, capsys):
    ranking = deterministic_ranking()
    winner = ranking[4][0]
    faults = [{"config": winner.config.label, "M": 4, "action": "kill_retiming"}]
    monkeypatch.setenv(ENV_VAR, str(write_fault_plan(tmp_path / "faults.json", faults)))
    out = tmp_path / "out"
    code, summary = run_tune(tune_argv(out))
    err = capsys.readouterr().err
    assert code == 0, err
    assert "re-timing at M=4 failed" in err
    assert summary["failed"] == {}  # the measurement itself was fine
    best = summary["devices"][0]["best"][next(iter(summary["devices"][0]["best"]))]
    assert best["4"]["retimed"] is False and best["1"]["retimed"] is True
    assert best["4"]["latency_us"] == best["4"]["search_latency_us"]
    assert json.loads((out / VLLM_FILE).read_text()) == expected_vllm_file()
    records = [json.loads(line) for line in (out / ".moe-tune-journal.jsonl").read_text().splitlines()]
    assert len([r for r in records if r["kind"] == "retime"]) == 1  # M=1's only: a failed re-timing is not journaled


@pytest.mark.timeout(300)
def test_every_worker_lost_fails_the_run_and_keeps_the_journal(tmp_path, monkeypatch, capsys):
    ranking = deterministic_ranking()
    doomed = ranking[1][-1]
    faults = [{"config": doomed.config.label, "M": 1, "action": "lose"}]
    monkeypatch.setenv(ENV_VAR, str(write_fault_plan(tmp_path / "faults.json", faults)))
    out = tmp_path / "out"
    code, summary = run_tune(tune_argv(out))
    err = capsys.readouterr().err
    assert code == 1, err
    assert summary == {}
    assert "every worker was lost" in err.strip().splitlines()[-1]
    assert err.count("is gone (it is dead") == 2, err  # each worker retired once its restart failed
    if (out / VLLM_FILE).exists():  # only batch sizes whose search finished, as a clean run chose them
        written = json.loads((out / VLLM_FILE).read_text())
        assert "1" not in written
        assert all(written[m] == expected_vllm_file()[m] for m in written)
    records = [json.loads(line) for line in (out / ".moe-tune-journal.jsonl").read_text().splitlines()]
    assert any(r["status"] == "ok" for r in records)  # what was measured before is kept
    for record in (r for r in records if r["status"] != "ok"):  # only the candidate that took both workers
        assert (Config.from_dict(record["candidate"]["config"]), record["candidate"]["M"], record["status"]) == \
            (doomed.config, 1, Status.CRASHED.value)


def test_a_poisoned_cuda_context_ends_the_worker_process():
    """An error naming a poisoned context (illegal address, …) in a measurement or a re-timing
    ends the process with POISON_EXIT_CODE; the text of the error is all the worker has to go on."""
    script = """
import sys
from workers.faults import FaultPlan
from workers.records import Candidate, Config, DType, MoEShape
from workers.worker import BenchmarkWorker

class Poisoned(FaultPlan):
    def inject(self, candidate):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    inject_retiming = inject

worker = BenchmarkWorker(timeout_s=600)
worker.fault_plan = Poisoned()
candidate = Candidate(MoEShape(4, 64, 64, 2, DType.BF16), 2, Config(16, 32, 32, 1, 4, 2))
getattr(worker, sys.argv[1])(candidate if sys.argv[1] == "measure" else [candidate])
print("survived")
"""
    for method in ("measure", "retime"):
        done = subprocess.run([sys.executable, "-c", script, method], capture_output=True, text=True, timeout=300)
        assert done.returncode == POISON_EXIT_CODE, (method, done.stderr[-2000:])
        assert "CUDA context poisoned" in done.stderr and "survived" not in done.stdout
