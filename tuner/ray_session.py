"""The one place Ray is started: every command that needs GPUs (``tune``, ``compare``, ``bench``,
``job run``) opens one ``ray_session`` and does all its GPU work inside it.

Why Ray even for one GPU: under ``ray job submit`` on KubeRay the driver runs on a head pod with
no GPU, so the GPU work must be placed on a worker node. The rules: ``--address`` (or
``RAY_ADDRESS``, as under ``ray job submit``) joins a cluster, and a cluster that cannot be joined
is a run failure (``RunFailed``, exit 1); otherwise an embedded Ray starts. With ``--interpret`` it
gets ``workers`` logical GPUs (default ``INTERPRET_NUM_GPUS``) and ``TRITON_INTERPRET=1`` is set in
the worker processes before they import a kernel; the fault-injection variable is forwarded so
tests can make latencies deterministic.

Ray prints what it forwards from the cluster (worker output, "(raylet) A worker died …") on the
driver's stdout; stdout belongs to the command's result (``--json``, tables), so all of that goes
to stderr while the session is open, and ``RaySession.stdout`` is the command's own stdout.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TextIO

import ray

from tuner.errors import RunFailed
from workers import faults

INTERPRET_NUM_GPUS = 2
"""Logical GPUs of an embedded Ray under ``--interpret`` when the command names no worker count."""


@dataclass(frozen=True)
class RaySession:
    stdout: TextIO
    """The command's stdout (``sys.stdout`` is stderr while the session is open)."""


@contextlib.contextmanager
def ray_session(address: str | None, interpret: bool, workers: int | None = None) -> Iterator[RaySession]:
    """Start an embedded Ray, or join the cluster at ``address`` / ``RAY_ADDRESS``; shut it down on exit.

    ``workers``: the GPU workers the command will use at most (under ``--interpret``, the number
    of logical GPUs). Raises RunFailed when the cluster cannot be joined.
    """
    env_vars = {"TRITON_INTERPRET": "1"} if interpret else {}
    if os.environ.get(faults.ENV_VAR):
        env_vars[faults.ENV_VAR] = os.environ[faults.ENV_VAR]
    runtime_env = {"env_vars": env_vars} if env_vars else None
    address = address or os.environ.get("RAY_ADDRESS")
    session = RaySession(stdout=sys.stdout)
    with contextlib.redirect_stdout(sys.stderr):
        if address:
            try:
                ray.init(address=address, runtime_env=runtime_env)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise RunFailed(f"cannot join the Ray cluster at {address}: {exc}") from None
        elif interpret:
            gpus = workers or INTERPRET_NUM_GPUS
            ray.init(num_cpus=max(2, gpus), num_gpus=gpus, include_dashboard=False, runtime_env=runtime_env)
        else:
            ray.init(include_dashboard=False, runtime_env=runtime_env)
        try:
            yield session
        finally:
            ray.shutdown()
