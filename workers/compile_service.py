"""One node's compile-ahead processes, behind a Ray actor the driver pins to that node.

The actor itself takes no GPU and no CPU from Ray's accounting; its ``CompilePool`` processes
run ``workers.compile_ahead.compile_job`` on the node's spare cores (the driver sizes the pool:
the node's CPUs minus one per GPU worker there). Being on the GPU worker's node is the point:
the Triton cache the processes fill is the one that worker reads.
"""

from __future__ import annotations

from collections.abc import Hashable

from workers.compile_ahead import CompileJob, CompileOutcome, compile_job, setup_compile_process
from workers.compile_pool import CompilePool, PoolFailure


class CompileService:
    def __init__(self, processes: int, timeout_s: float) -> None:
        self.pool = CompilePool(compile_job, processes, timeout_s, setup=setup_compile_process)

    def size(self) -> int:
        return self.pool.size

    def submit(self, jobs: list[tuple[Hashable, CompileJob]]) -> None:
        for key, job in jobs:
            self.pool.submit(key, job)

    def collect(self, wait_s: float) -> list[tuple[Hashable, CompileOutcome]]:
        """Outcomes finished since the last call (waits up to ``wait_s`` for a first one)."""
        out = []
        for key, result, seconds in self.pool.results(wait_s):
            if isinstance(result, PoolFailure):
                result = CompileOutcome(result.status, result.message, 0, result.seconds)
            out.append((key, result))
        return out

    def close(self) -> None:
        self.pool.close()
