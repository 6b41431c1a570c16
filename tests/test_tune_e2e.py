"""``moe-tune tune`` end to end on CPU: embedded Ray with 2 logical GPUs, the real Triton kernels
under the interpreter, the tiny fixture model (E=4, N=K=64, top-2), 8 configs × M ∈ {1, 4}.

Latencies come from the fault hook's deterministic function (the kernel still runs and is still
checked), so the files a run must write, and the measurements the default (fast) strategy makes,
are known exactly; wall-clock timing itself is covered by tests/test_worker.py. One clean run is
shared by the assertions that only read it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tune_helpers import (VLLM_FILE, deterministic_ranking, expected_evaluations, expected_vllm_file, run_tune,
                          tiny_candidates, tune_argv, write_fault_plan)
from tuner.journal import JOURNAL_NAME
from tuner.writers import write_vllm
from workers.default_config import VLLM, server_default
from workers.faults import ENV_VAR, FaultPlan
from workers.records import Candidate, Config

pytestmark = pytest.mark.timeout(600)
CANDIDATES = len(tiny_candidates())
TOTAL = expected_evaluations()


@pytest.fixture(scope="module")
def deterministic(tmp_path_factory):
    plan = write_fault_plan(tmp_path_factory.mktemp("faults") / "deterministic.json")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ENV_VAR, str(plan))
        yield plan


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, deterministic):
    out = tmp_path_factory.mktemp("clean") / "out"
    code, summary = run_tune(tune_argv(out))
    assert code == 0, summary
    return out, summary


def test_clean_run_writes_the_vllm_file(clean_run):
    out, summary = clean_run
    assert {"evaluations_run", "evaluations_reused", "failed", "files_written", "wall_s"} <= set(summary)
    assert summary["evaluations_run"] == TOTAL
    assert summary["devices"][0]["measured"] == {"both/screen": CANDIDATES, "both/full": TOTAL - CANDIDATES}
    assert CANDIDATES == 16 and TOTAL > CANDIDATES and summary["budget_ended"] is False
    assert summary["evaluations_reused"] == 0
    assert summary["failed"] == {}
    assert summary["files_written"] == [str(out / VLLM_FILE)]
    assert summary["wall_s"] > 0
    assert json.loads((out / VLLM_FILE).read_text()) == expected_vllm_file()
    (device,) = summary["devices"]
    assert device["device"] == "cpu" and device["workers"] == 2
    assert all(entry["retimed"] for entry in device["best"]["E=4,N=64,K=64,topk=2,dtype=bf16"].values())


def test_second_run_reuses_every_measurement(clean_run):
    out, _ = clean_run
    before = (out / VLLM_FILE).read_bytes()
    code, summary = run_tune(tune_argv(out))
    assert code == 0
    assert summary["evaluations_run"] == 0
    assert summary["evaluations_reused"] == TOTAL
    assert summary["retimed_groups"] == 0 and summary["retimes_reused"] == 2
    assert (out / VLLM_FILE).read_bytes() == before


def test_a_baseline_folder_is_timed_against_the_winner(tmp_path, deterministic):
    ranking = deterministic_ranking()
    shape = ranking[1][0].shape
    slowest = ranking[1][-1].config  # in the space, but the search would never fully time it
    off_space = Config(16, 32, 32, 16, 4, 2)  # GROUP_SIZE_M=16 is not in the tiny space
    baseline = {1: slowest, 4: off_space}
    write_vllm(tmp_path / "shipped", shape, "cpu", baseline, "3.0.0")
    code, summary = run_tune(tune_argv(tmp_path / "out", "--baseline", str(tmp_path / "shipped")))
    assert code == 0, summary

    latency = FaultPlan(deterministic_latency=True).latency_us
    best = summary["devices"][0]["best"][shape.label]
    written = json.loads((tmp_path / "out" / VLLM_FILE).read_text())
    # the folder's config and the server's default config (what it runs without a file) both compete
    pinned = {M: [config, server_default(shape, M, VLLM)[0]] for M, config in baseline.items()}
    for M, configs in pinned.items():
        assert best[str(M)]["baseline_us"] == pytest.approx(
            min(latency(Candidate(shape, M, c)) for c in configs), abs=1e-3)
        assert best[str(M)]["vs_baseline"] <= 1.0
        fastest = min([ranking[M][0].config, *configs], key=lambda c: (latency(Candidate(shape, M, c)), c))
        assert written[str(M)] == fastest.to_dict()
    records = [json.loads(line) for line in (tmp_path / "out" / JOURNAL_NAME).read_text().splitlines()]
    fulls = {(r["candidate"]["M"], Config.from_dict(r["candidate"]["config"])) for r in records
             if r.get("kind") == "measure" and r["candidate"]["level"] == "full"}
    assert {(M, c) for M, configs in pinned.items() for c in configs} <= fulls


def test_a_baseline_folder_without_config_files_is_refused(tmp_path, capsys):
    from tuner.cli import main

    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "absent"):
        assert main(tune_argv(tmp_path / "out", "--baseline", str(folder))) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(folder) in err, err
    assert not (tmp_path / "out").exists()


def _complete_records(journal) -> int:
    return journal.read_bytes().count(b"\n") if journal.exists() else 0


def test_driver_killed_then_restarted_loses_only_in_flight_work(tmp_path, deterministic):
    out = tmp_path / "out"
    journal = out / ".moe-tune-journal.jsonl"
    # Its own session: SIGKILL goes to the driver and the embedded Ray it started, as when a node dies.
    driver = subprocess.Popen([sys.executable, "-m", "tuner.cli", *tune_argv(out)], start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ})
    try:
        deadline = time.monotonic() + 400
        while _complete_records(journal) < 3 and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert driver.poll() is None, f"driver ended before it could be killed: {driver.stderr.read().decode()[-2000:]}"
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(30)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        driver.stderr.close()
    measured_before = _complete_records(journal)
    assert 3 <= measured_before < TOTAL, "the kill must land mid-run"

    code, summary = run_tune(tune_argv(out))
    assert code == 0
    assert summary["evaluations_reused"] >= measured_before
    assert summary["evaluations_run"] + summary["evaluations_reused"] == TOTAL
    assert json.loads((out / VLLM_FILE).read_text()) == expected_vllm_file()


BAD_SPACE = "BLOCK_SIZE_M: [15]\nBLOCK_SIZE_N: [32]\nBLOCK_SIZE_K: [32]\nGROUP_SIZE_M: [1]\nnum_warps: [4]\nnum_stages: [2]\n"


@pytest.mark.parametrize("case", ["missing model", "malformed model", "unknown dtype", "batch sizes not numbers",
                                  "batch size zero", "invalid space", "out under a file", "too big to interpret",
                                  "no workers"])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, tmp_path, capsys):
    from tuner.cli import main

    out = tmp_path / "out"
    argv = tune_argv(out)
    malformed = tmp_path / "config.json"
    malformed.write_text('{"model_type": "mixtral", "hidden_size": ')
    space = tmp_path / "space.yaml"
    space.write_text(BAD_SPACE)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")

    def replace(flag: str, value: str) -> list[str]:
        i = argv.index(flag)
        return [*argv[:i + 1], value, *argv[i + 2:]]

    argv = {
        "missing model": lambda: replace("--model", str(tmp_path / "nope.json")),
        "malformed model": lambda: replace("--model", str(malformed)),
        "unknown dtype": lambda: [*argv, "--dtype", "bf17"],
        "batch sizes not numbers": lambda: replace("--batch-sizes", "1,x"),
        "batch size zero": lambda: replace("--batch-sizes", "0,4"),
        "invalid space": lambda: replace("--search-space", str(space)),
        "out under a file": lambda: replace("--out", str(blocker / "out")),
        "too big to interpret": lambda: replace("--model", "mixtral-8x7b"),
        "no workers": lambda: replace("--workers", "0"),
    }[case]()
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moe-tune: error: "), captured.err
    assert "Traceback" not in captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "config.json", "space.yaml"]
