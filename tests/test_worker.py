"""The BenchmarkWorker on its own (no Ray): correctness check, wall-clock timing under the
interpreter, interleaved re-timing, and a config the kernel refuses. Runs in a subprocess
because ``TRITON_INTERPRET`` must be set before the kernels are imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = """
import json
from workers.problem import ERROR_BOUNDS
from workers.records import Candidate, Config, DType, MoEShape
from workers.worker import BenchmarkWorker

worker = BenchmarkWorker(timeout_s=120)
shape = MoEShape(E=4, N=64, K=64, topk=2, dtype=DType.BF16)
small, large = Config(16, 32, 32, 1, 4, 2), Config(32, 64, 64, 1, 4, 2)
rejected = Config(16, 32, 8, 1, 4, 2)  # BLOCK_SIZE_K below tl.dot's minimum of 16
results = [worker.measure(Candidate(shape, 3, c)) for c in (small, large, rejected)]
retimed = worker.retime([Candidate(shape, 3, small), Candidate(shape, 3, large)])
print(json.dumps({"env": worker.describe(), "bound": ERROR_BOUNDS[DType.BF16], "retimed": retimed,
                  "results": [[m.status.value, m.latency_us, m.spread_us, m.rel_err, m.message] for m in results]}))
"""


def test_worker_checks_times_and_retimes_on_the_interpreter():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["env"]["device"] == "cpu" and report["env"]["kernel"] == "builtin"
    assert len(report["env"]["kernel_hash"]) == 16
    (s1, lat1, spread1, err1, _), (s2, lat2, spread2, err2, _), (s3, lat3, _, _, msg3) = report["results"]
    assert s1 == s2 == "ok"
    assert lat1 > 0 and lat2 > 0 and spread1 >= 0 and spread2 >= 0
    assert err1 <= report["bound"] and err2 <= report["bound"]
    assert s3 == "compile_error" and lat3 is None and "16" in msg3
    assert len(report["retimed"]) == 2 and all(v > 0 for v in report["retimed"])


CRASHES = """
from workers.records import Candidate, Config, DType, MoEShape
from workers.worker import BenchmarkWorker

worker = BenchmarkWorker(timeout_s=60)
candidate = Candidate(MoEShape(E=4, N=64, K=64, topk=2, dtype=DType.BF16), 1, Config(16, 32, 32, 1, 4, 2))
for message in ("this backend runs bf16, not mxfp4", "this backend runs bf16, not mxfp4", "another failure"):
    try:
        raise ValueError(message)
    except ValueError as exc:
        print(worker._failure(candidate, exc).status.value)
"""


def test_a_repeated_crash_prints_its_traceback_once():
    """A backend refusing a whole dtype fails every candidate alike: one traceback per distinct
    failure reaches the log (the rest are recorded, with their message, in the journal)."""
    done = subprocess.run([sys.executable, "-c", CRASHES], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["crashed"] * 3
    assert done.stderr.count("Traceback") == 2
