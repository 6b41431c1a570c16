"""Runners of one problem share their buffers (``workers.workspace``), and still compute right when
run one after another in any order; runners built without a workspace own theirs. Runs the
kernels under the interpreter in a subprocess (``TRITON_INTERPRET`` must be set before import)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from workers.workspace import PRIVATE, Workspace

SCRIPT = """
import json
from workers.backends import load
from workers.problem import ERROR_BOUNDS, build_problem, rel_error
from workers.records import Candidate, Config, DType, MoEShape
from workers.worker import BenchmarkWorker
from workers.workspace import Workspace

shape = MoEShape(E=4, N=64, K=64, topk=2, dtype=DType.BF16)
problem = build_problem(shape, 5, seed=0)
backend = load("builtin")
up16, up32 = Config(16, 32, 32, 1, 4, 2), Config(32, 64, 64, 1, 4, 2)
shared = Workspace()
# a runner whose down GEMM sorts for another tile height than its up GEMM, and one whose up GEMM
# uses that height: the two sorts of one runner must not share, the same height across runners may
split = backend.runner(problem, up16, up32, workspace=shared)
plain = backend.runner(problem, up32, workspace=shared)
private = backend.runner(problem, up32)
errors = []
for runner in (split, plain, split, private, plain):
    errors.append(rel_error(runner.run(), problem.reference))
# the split path: run_down reads what the last run() of *another* runner left in the shared buffers
plain.run()
split.run_up()
split.run_down()
errors.append(rel_error(split.output, problem.reference))

worker = BenchmarkWorker(timeout_s=120)
a, b = Candidate(shape, 3, up16), Candidate(shape, 3, up32)
runner_a, runner_b = worker._prepare(a)[1], worker._prepare(b)[1]  # both alive: a freed buffer may be reused
same_problem = runner_a.output.data_ptr() == runner_b.output.data_ptr()
del runner_a, runner_b
retimed = worker.retime([a, b])
measured = [worker.measure(c).status.value for c in (a, b)]
worker._prepare(Candidate(shape, 4, up16))  # another problem: the last one's buffers are let go
after_switch = len(worker._workspace)
print(json.dumps({"bound": ERROR_BOUNDS[DType.BF16], "errors": errors,
                  "shared_output": split.output.data_ptr() == plain.output.data_ptr(),
                  "private_output": private.output.data_ptr() != plain.output.data_ptr(),
                  "worker_shares": same_problem, "retimed": retimed, "measured": measured,
                  "buffers": len(shared), "after_switch": after_switch}))
"""


def test_runners_of_one_problem_share_buffers_and_stay_correct():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(err <= report["bound"] for err in report["errors"]), report["errors"]
    assert report["shared_output"] and report["private_output"]
    assert report["worker_shares"]
    assert report["measured"] == ["ok", "ok"] and len(report["retimed"]) == 2
    # gate_up, activated, output, down + 4 sort buffers for each of the two tile heights
    assert report["buffers"] == 12
    # one runner of the new problem (one tile height): nothing of the last problem is kept
    assert report["after_switch"] == 8


def test_workspace_shares_by_role_shape_and_dtype():
    space = Workspace()
    a = space.empty("up", (4, 8), torch.bfloat16, "cpu")
    assert space.empty("up", (4, 8), torch.bfloat16, "cpu") is a
    assert space.empty("up", (4, 9), torch.bfloat16, "cpu") is not a
    assert space.empty("up", (4, 8), torch.float32, "cpu") is not a
    assert space.empty("down", (4, 8), torch.bfloat16, "cpu") is not a
    assert len(space) == 4
    assert PRIVATE.empty("up", (4, 8), torch.bfloat16, "cpu") is not PRIVATE.empty("up", (4, 8), torch.bfloat16, "cpu")
    assert len(PRIVATE) == 0
