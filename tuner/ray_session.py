"""The one place Ray is started: every command that needs GPUs (``tune``, ``compare``, ``bench``,
``job run``) opens one ``ray_session`` and does all its GPU work inside it.

Why Ray even for one GPU: under ``ray job submit`` on KubeRay the driver runs on a head pod with
no GPU, so the GPU work must be placed on a worker node. The rules: ``--address`` (or
``RAY_ADDRESS``, as under ``ray job submit``) joins a cluster, and a cluster that cannot be joined
is a run failure (``RunFailed``, exit 1); otherwise an embedded Ray starts, a new one even
where a ``ray start`` on this host left its address behind (``ray.init()`` would join that
cluster, or fail on a dead one; joining is only ever asked for). With ``--interpret`` it
gets ``workers`` logical GPUs (default ``INTERPRET_NUM_GPUS``) and ``TRITON_INTERPRET=1`` is set in
the worker processes before they import a kernel; the fault-injection variable (so tests can make
latencies deterministic) and ``MOE_TUNE_SERVER_CODE`` (where a server's code is) are forwarded.

Nothing here waits without a bound. Joining a cluster takes at most ``connect_timeout_s``
(``--connect-timeout``, default ``DEFAULT_CONNECT_TIMEOUT_S``): a ``host:port`` address is first
reached with a plain TCP connection (retried each second: a head may still be starting), then
``ray.init`` runs in a helper thread the driver stops waiting for at the deadline; either way
the run fails with one line (``RunFailed``). A helper thread still inside ``ray.init`` cannot be
stopped and would crash the interpreter's shutdown, so the CLI then ends the process at once
(``connect_stranded``). Ray's own SIGTERM handler (which exits through a crash-looking dump) is
replaced by ``tuner.signals``'s once Ray is up.

Ray prints what it forwards from the cluster (worker output, "(raylet) A worker died …") on the
driver's stdout; stdout belongs to the command's result (``--json``, tables), so all of that goes
to stderr while the session is open, and ``RaySession.stdout`` is the command's own stdout.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TextIO

import ray

from tuner import signals
from tuner.cli import VERBOSE_ENV
from tuner.errors import RunFailed
from tuner.options import TuneOptions
from workers import faults
from workers.backends.server_code import SERVER_CODE_ENV

INTERPRET_NUM_GPUS = 2
"""Logical GPUs of an embedded Ray under ``--interpret`` when the command names no worker count."""
DEFAULT_CONNECT_TIMEOUT_S = TuneOptions.connect_timeout  # 60 s
TCP_RETRY_S = 1.0
_stranded: list[threading.Thread] = []


def ray_logging_level() -> int:
    """The level of Ray's own driver-side logger for ``ray.init``: ERROR unless ``--verbose``, so
    its start-up chatter (the token-authentication notice, "Started a local Ray instance", …)
    stays out of the user's terminal while real errors still show."""
    return logging.INFO if os.environ.get(VERBOSE_ENV) == "1" else logging.ERROR


def _host_port(address: str) -> tuple[str, int] | None:
    """``host:port`` of ``address`` (``ray://`` stripped); None for ``auto``/``local`` and the like."""
    text = address.removeprefix("ray://")
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def join(address: str, runtime_env: dict | None, timeout_s: float) -> None:
    """``ray.init(address=...)`` within ``timeout_s`` seconds, or ``RunFailed`` with one line."""
    deadline = time.monotonic() + timeout_s
    target = _host_port(address)
    if target is not None:
        last = ""
        while True:
            try:
                with socket.create_connection(target, timeout=max(0.1, min(deadline - time.monotonic(), 5.0))):
                    break
            except OSError as exc:
                last = exc.strerror or type(exc).__name__
            if time.monotonic() + TCP_RETRY_S >= deadline:
                raise RunFailed(f"cannot reach the Ray cluster at {address} within {timeout_s:g}s ({last}); "
                                "check --address, or raise --connect-timeout")
            time.sleep(TCP_RETRY_S)
    outcome: dict[str, BaseException | None] = {}

    def connect() -> None:
        try:
            ray.init(address=address, runtime_env=runtime_env, logging_level=ray_logging_level())
            outcome["error"] = None
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            outcome["error"] = exc

    thread = threading.Thread(target=connect, name="moe-tune-ray-connect", daemon=True)
    thread.start()
    try:
        thread.join(max(0.0, deadline - time.monotonic()))
    except BaseException:  # SIGTERM while waiting: the thread stays inside ray.init
        _stranded.append(thread)
        raise
    if thread.is_alive():
        _stranded.append(thread)
        raise RunFailed(f"could not join the Ray cluster at {address} within {timeout_s:g}s "
                        "(something answers there, but no Ray head did); check --address, or raise --connect-timeout")
    error = outcome["error"]
    if error is not None:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise RunFailed(f"cannot join the Ray cluster at {address}: {first}")


def connect_stranded() -> bool:
    """True when a ``ray.init`` given up on is still running (the process must end with ``os._exit``)."""
    return any(thread.is_alive() for thread in _stranded)


@dataclass(frozen=True)
class RaySession:
    stdout: TextIO
    """The command's stdout (``sys.stdout`` is stderr while the session is open)."""


@contextlib.contextmanager
def ray_session(address: str | None, interpret: bool, workers: int | None = None,
                connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S) -> Iterator[RaySession]:
    """Start an embedded Ray (always a new one), or join the cluster at ``address`` /
    ``RAY_ADDRESS`` within ``connect_timeout_s``; shut it down on exit.

    ``workers``: the GPU workers the command will use at most (under ``--interpret``, the number
    of logical GPUs). Raises RunFailed when the cluster cannot be joined.
    """
    env_vars = {"TRITON_INTERPRET": "1"} if interpret else {}
    for name in (faults.ENV_VAR, SERVER_CODE_ENV):
        if os.environ.get(name):
            env_vars[name] = os.environ[name]
    runtime_env = {"env_vars": env_vars} if env_vars else None
    address = address or os.environ.get("RAY_ADDRESS")
    session = RaySession(stdout=sys.stdout)
    with contextlib.redirect_stdout(sys.stderr):
        if address:
            join(address, runtime_env, connect_timeout_s)
        else:
            gpus = workers or INTERPRET_NUM_GPUS
            resources = {"num_cpus": max(2, gpus), "num_gpus": gpus} if interpret else {}
            try:
                # "local": a new instance even where a ``ray start`` on this host left its address
                # (``ray.init()`` would join that cluster; only --address / RAY_ADDRESS join one).
                ray.init(address="local", include_dashboard=False, runtime_env=runtime_env,
                         logging_level=ray_logging_level(), **resources)
            except SystemExit as exc:
                if exc.code != signal.SIGTERM:
                    raise
                # Ray's own SIGTERM handler (active while ray.init runs) exits with the signal's number.
                ray.shutdown()
                raise signals.arrived_elsewhere() from None
        signals.restore()
        try:
            yield session
        finally:
            ray.shutdown()
