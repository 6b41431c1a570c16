"""Ray for the commands that need one GPU process rather than the tuner's pool: ``bench``
(one BenchmarkWorker actor times every variant back to back) and ``compare`` (one task runs
each dtype's tuned kernel on shared inputs).

Why Ray even for one GPU: under ``ray job submit`` on KubeRay the driver runs on a head pod with
no GPU, so the GPU work must be placed on a worker node, as the tuner's actors are. The rules
match the tuner's (``tuner.driver``): ``--address``/``RAY_ADDRESS`` joins a cluster, otherwise
an embedded Ray starts; ``--interpret`` gives it one logical GPU and sets ``TRITON_INTERPRET=1``
in the worker processes before they import a kernel; the fault-injection variable is forwarded
so tests can make latencies deterministic.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import ray

from workers import faults


@contextmanager
def ray_session(address: str | None, interpret: bool) -> Iterator[None]:
    env_vars = {"TRITON_INTERPRET": "1"} if interpret else {}
    if os.environ.get(faults.ENV_VAR):
        env_vars[faults.ENV_VAR] = os.environ[faults.ENV_VAR]
    runtime_env = {"env_vars": env_vars} if env_vars else None
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    elif interpret:
        ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, runtime_env=runtime_env)
    else:
        ray.init(include_dashboard=False, runtime_env=runtime_env)
    try:
        yield
    finally:
        ray.shutdown()


def gpu_worker(timeout_s: float = 300.0):
    """One BenchmarkWorker actor on one GPU (its own process: a poisoned CUDA context or a hang
    ends that process, not the command)."""
    from workers.worker import BenchmarkWorker

    return ray.remote(BenchmarkWorker).options(num_gpus=1, max_restarts=0).remote(timeout_s=timeout_s)
