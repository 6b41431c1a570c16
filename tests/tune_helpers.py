"""Shared by the end-to-end tune tests: the tiny model and space, the CLI call, and the file a
clean run must write when latencies come from the fault hook's deterministic function."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import triton

from tuner.cli import main
from tuner.models import load_model
from tuner.plan import build_plan
from tuner.search import FAST_FULL_MAX, promoted
from tuner.spaces import load_space
from workers.faults import FaultPlan
from workers.records import Candidate

FIXTURES = Path(__file__).parent / "fixtures"
TINY_MODEL = FIXTURES / "tiny-moe.json"
TINY_SPACE = FIXTURES / "tune-space.yaml"
BATCH_SIZES = (1, 4)
VLLM_FILE = "E=4,N=64,device_name=cpu.json"  # E=4 experts, N=64 per GPU, interpreter device "cpu"


def tune_argv(out: Path, *extra: str, timeout_s: float = 120) -> list[str]:
    return ["tune", "--model", str(TINY_MODEL), "--search-space", str(TINY_SPACE),
            "--batch-sizes", ",".join(map(str, BATCH_SIZES)), "--interpret", "--workers", "2",
            "--out", str(out), "--timeout", str(timeout_s), "--json", *extra]


def run_tune(argv: list[str]) -> tuple[int, dict]:
    """``moe-tune`` in this process; returns the exit code and the --json summary (stdout must be exactly it)."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(argv)
    text = stdout.getvalue()
    return code, json.loads(text) if text.strip() else {}


def moe_tune_process(argv: list[str], *paths: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """``moe-tune argv`` in a fresh process with ``paths`` first on its PYTHONPATH (which its Ray
    workers inherit: e.g. stand-in servers) and no ``MOE_TUNE_SERVER_CODE``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*map(str, paths), os.environ.get("PYTHONPATH", "")])}
    env.pop("MOE_TUNE_SERVER_CODE", None)
    code = "import sys; from tuner.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=timeout,
                          env=env)


def write_fault_plan(path: Path, faults: list[dict] | None = None) -> Path:
    path.write_text(json.dumps({"deterministic_latency": True, "faults": faults or []}))
    return path


def tiny_candidates() -> list[Candidate]:
    plan = build_plan([load_model(str(TINY_MODEL))], 1, 1, None, None, list(BATCH_SIZES), load_space(str(TINY_SPACE)),
                      "cpu")
    return [Candidate(job.shape, M, config) for job in plan.jobs for M, configs in job.candidates.items()
            for config in configs]


def deterministic_ranking() -> dict[int, list[Candidate]]:
    """Per batch size, the tiny candidates from fastest to slowest under the deterministic latencies."""
    plan = FaultPlan(deterministic_latency=True)
    ranking: dict[int, list[Candidate]] = {}
    for c in tiny_candidates():
        ranking.setdefault(c.M, []).append(c)
    return {M: sorted(cs, key=lambda c: (plan.latency_us(c), c.config)) for M, cs in ranking.items()}


def expected_vllm_file(failing: frozenset[tuple[str, int]] = frozenset()) -> dict:
    """What a deterministic run writes: per M the fastest config, plus the Triton version.
    ``failing``: (config label, M) of candidates that fail, so never win."""
    best = {str(M): next(c for c in ranked if (c.config.label, M) not in failing).config.to_dict()
            for M, ranked in sorted(deterministic_ranking().items())}
    return {"triton_version": triton.__version__, **best}


def expected_evaluations(failing: frozenset[tuple[str, int]] = frozenset()) -> int:
    """Measurements a deterministic run of the default (fast) strategy makes: a screen of every
    tiny candidate (its first slice, at least 24 configs, holds all 8 of the tiny space, whose
    neighbours are then all screened) plus the full timings the screening rule promotes.
    ``failing``: (config label, M) of candidates whose screen fails."""
    plan = FaultPlan(deterministic_latency=True)
    total = 0
    for M, ranked in deterministic_ranking().items():
        screens = {c.config: None if (c.config.label, M) in failing else plan.latency_us(c) for c in ranked}
        total += len(ranked) + len(promoted(screens, set(), FAST_FULL_MAX))
    return total
