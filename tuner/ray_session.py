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

An address is checked before anything starts (``cluster_address``: exit 2, one line naming
``--address`` or ``RAY_ADDRESS``): ``auto``; ``local`` (a Ray started here, as without an
address); ``host:port`` with a host name, an IPv4 address or a bracketed IPv6 one (``[::1]:6379``,
Ray's own form) and a port 1-65535; or ``ray://host:port`` (Ray Client, which needs the
``ray[client]`` extra). Another scheme (``http://…:8265`` is the dashboard's Jobs address, for
``ray job submit``), a host without a port, a bare IPv6 literal and the like are refused.

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
import importlib.util
import ipaddress
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import ray

from tuner import signals
from tuner.cli import VERBOSE_ENV
from tuner.errors import OptionError, RunFailed, UsageError
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


CLIENT_SCHEME = "ray://"
HOST_NAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?")
"""A host name or an IPv4 address: letters, digits, ``-``, ``.``, ``_`` (RFC 952/1123, plus the
underscore some cluster DNS names carry)."""


def _host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of a checked ``host:port`` / ``[v6]:port`` / ``ray://…`` address; None for ``auto``."""
    text = address.removeprefix(CLIENT_SCHEME)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.removeprefix("[").removesuffix("]"), int(port)


def _address_problem(address: str) -> str | None:
    """Why ``address`` is no Ray cluster address moe-tune can join (None: it is one)."""
    if address == "auto":
        return None
    if "://" in address:
        scheme = address.split("://", 1)[0] + "://"
        if scheme != CLIENT_SCHEME:
            return (f"not a Ray cluster address ({scheme}host:8265 is the dashboard's, for 'ray job submit'); "
                    "give the head's host:port (port 6379 unless 'ray start --port' said otherwise) or "
                    "ray://host:10001")
        if importlib.util.find_spec("grpc") is None:
            return ("ray:// joins through Ray Client, which needs pip install 'ray[client]' here; or give "
                    "the head's host:port (port 6379 unless 'ray start --port' said otherwise)")
    text = address.removeprefix(CLIENT_SCHEME)
    host, sep, port = text.rpartition(":")
    if text.startswith("["):
        literal = host[1:-1] if host.endswith("]") else None
        try:
            ipaddress.IPv6Address(literal or "")
        except ValueError:
            return "malformed IPv6 host (write [address]:port, e.g. [::1]:6379)"
    elif ":" in host:
        return "more than one ':' (an IPv6 host goes in brackets, with a port: [address]:port, e.g. [::1]:6379)"
    elif not sep:
        return "no port (give host:port; port 6379 unless 'ray start --port' said otherwise)"
    elif not HOST_NAME.fullmatch(host):
        return f"invalid host name {host!r}"
    if not (port.isdigit() and 1 <= int(port) <= 65535):
        return f"invalid port {port!r} (an integer 1-65535)"
    return None


def cluster_address(address: str | None) -> str | None:
    """The cluster a command joins: ``address`` (``--address``, a job spec's ``address``) or else
    ``RAY_ADDRESS``, checked; None where an embedded Ray is to start (neither given, an empty
    ``RAY_ADDRESS``, or ``local``). Surrounding blanks are dropped.

    Raises OptionError (``address``) for a bad ``address``, UsageError naming ``RAY_ADDRESS`` for a
    bad variable: one line, before anything starts."""
    if address is not None:
        text, option = address.strip(), True
        if not text:
            raise OptionError("address", "is blank (an unset variable?); leave it out to start a Ray here")
    else:
        text, option = os.environ.get("RAY_ADDRESS", "").strip(), False
        if not text:
            return None
    if text == "local":
        return None
    problem = _address_problem(text)
    if problem is not None:
        if option:
            raise OptionError("address", f"{text}: {problem}")
        raise UsageError(f"RAY_ADDRESS={text}: {problem}")
    if text == "auto" and option and _ray_address_variable() and cluster_address(None) is None:
        # auto follows RAY_ADDRESS (checked just now), as Ray's own does
        raise UsageError("RAY_ADDRESS=local: names no cluster for --address auto to join")
    return text


def _ray_address_variable() -> str:
    """``RAY_ADDRESS`` where it names where ``auto`` leads: "" when unset, blank or ``auto``."""
    text = os.environ.get("RAY_ADDRESS", "").strip()
    return "" if text == "auto" else text


def _resolve_auto() -> tuple[str, tuple[str, int] | None, str]:
    """Where ``auto`` leads: ``RAY_ADDRESS`` (unless it says ``auto`` too); else the cluster the last ``ray start`` on this host
    recorded (``$RAY_TMPDIR/ray/ray_current_cluster``); else, as Ray does, the one Ray head found
    running here. Returns the address to give ``ray.init``, the ``(host, port)`` to reach first
    (None: unknown) and how it was found. RunFailed with Ray's line when there is none.

    Ray's own ``auto`` prefers a Ray process found running over the recorded cluster whenever
    exactly one is running: on a shared host, another user's short-lived ``ray.init()``."""
    from ray._common.utils import get_ray_address_file
    from ray._private import services

    variable = _ray_address_variable()
    if variable:  # checked, and local refused, by cluster_address("auto") before the session opened
        return variable, _host_port(variable), f"RAY_ADDRESS={variable}"
    recorded = Path(get_ray_address_file(None))
    text = recorded.read_text(errors="replace").strip() if recorded.is_file() else ""
    if text:
        if _address_problem(text) is not None:
            raise RunFailed(f"--address auto: {recorded} holds no Ray address ({text[:60]!r}); "
                            "give the head's host:port instead")
        try:  # the token Ray would send to a cluster it found itself (ray.init does this for "auto")
            from ray._private.authentication import authentication_token_setup as auth
        except ImportError:  # a Ray without token authentication
            pass
        else:
            notes = logging.getLogger(auth.__name__)
            level = notes.level
            notes.setLevel(ray_logging_level())  # its "Token authentication is enabled" notice: --verbose only
            try:
                auth.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
            finally:
                notes.setLevel(level)
        return text, _host_port(text), f"recorded by 'ray start' in {recorded}; stale if that cluster was stopped"
    try:
        found = services.canonicalize_bootstrap_address_or_die("auto")
    except ConnectionError as exc:
        raise RunFailed(f"--address auto: {str(exc).splitlines()[0]}") from None
    except Exception:  # noqa: BLE001 - a Ray internal that changed: ray.init alone decides then
        return "auto", None, ""
    return "auto", _host_port(found), f"{found}, the Ray head found running on this host"


def join(address: str, runtime_env: dict | None, timeout_s: float) -> None:
    """``ray.init(address=...)`` within ``timeout_s`` seconds, or ``RunFailed`` with one line."""
    deadline = time.monotonic() + timeout_s
    shown = address
    if address == "auto":
        address, target, where = _resolve_auto()
    else:
        target, where = _host_port(address), ""
    if target is not None:
        last = ""
        while True:
            try:
                with socket.create_connection(target, timeout=max(0.1, min(deadline - time.monotonic(), 5.0))):
                    break
            except OSError as exc:
                last = exc.strerror or type(exc).__name__
            if time.monotonic() + TCP_RETRY_S >= deadline:
                at = f"{shown} ({where})" if where else shown
                raise RunFailed(f"cannot reach the Ray cluster at {at} within {timeout_s:g}s ({last}); "
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
        # A lock wait past threading.TIMEOUT_MAX (--connect-timeout 1e308) raises OverflowError.
        thread.join(min(max(0.0, deadline - time.monotonic()), threading.TIMEOUT_MAX))
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
        if address != "auto" and os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
            # Ray sends its token only to a cluster it found itself (auto); the head then refuses
            # the connection with nothing but "Failed to connect" on the driver's side.
            first += ("; a cluster started by 'ray start' checks a token: join it with RAY_AUTH_MODE=token "
                      "(the token in RAY_AUTH_TOKEN or ~/.ray/auth_token)")
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
    ``RAY_ADDRESS`` (``cluster_address``) within ``connect_timeout_s``; shut it down on exit,
    however the session ends (a signal while Ray starts included), and end the Ray processes
    started under this one that outlive ``ray.shutdown`` (``reap``).

    ``workers``: the GPU workers the command will use at most (under ``--interpret``, the number
    of logical GPUs). Raises OptionError/UsageError for a bad address (nothing started), RunFailed
    when the cluster cannot be joined.
    """
    address = cluster_address(address)
    env_vars = {"TRITON_INTERPRET": "1"} if interpret else {}
    for name in (faults.ENV_VAR, SERVER_CODE_ENV):
        if os.environ.get(name):
            env_vars[name] = os.environ[name]
    runtime_env = {"env_vars": env_vars} if env_vars else None
    session = RaySession(stdout=sys.stdout)
    before = set(ray_processes_below(os.getpid()))
    with contextlib.redirect_stdout(sys.stderr):
        try:
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
                    raise signals.arrived_elsewhere() from None
            signals.restore()
            yield session
        finally:
            if not connect_stranded():  # a ray.init still running in a helper thread: the CLI ends the process
                started = [process for process in ray_processes_below(os.getpid()) if process not in before]
                ray.shutdown()
                reap(started)


REAP_GRACE_S = 3.0
"""How long Ray processes started by this session may take to exit after ``ray.shutdown``
before they are killed."""


def _stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state, parent, …; ``proc(5)``'s
    fields 3 on), or None where the process (or ``/proc``) is not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()


_STATE, _PARENT, _START_TIME = 0, 1, 19
"""Indices in ``_stat``: the state letter, the parent's pid, the start time (clock ticks since boot)."""


def _alive(process: tuple[int, str]) -> bool:
    """Whether ``(pid, start time)`` still runs: not a zombie, and not a newer process given the pid."""
    fields = _stat(process[0])
    return fields is not None and fields[_START_TIME] == process[1] and fields[_STATE] not in ("Z", "X")


def ray_processes_below(root: int) -> list[tuple[int, str]]:
    """The Ray processes descending from ``root`` (gcs_server, raylet, its agents, workers: a
    command line naming Ray's package or a ``ray::`` process title), each as ``(pid, start time)``
    so that a pid the system gives to a newer process is not taken for it; [] where ``/proc`` is not."""
    try:
        pids = [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return []
    children: dict[int, list[tuple[int, str]]] = {}
    for pid in pids:
        fields = _stat(pid)
        if fields is not None:
            children.setdefault(int(fields[_PARENT]), []).append((pid, fields[_START_TIME]))
    found, frontier = [], [root]
    while frontier:
        for process in children.get(frontier.pop(), []):
            frontier.append(process[0])
            try:
                cmdline = Path(f"/proc/{process[0]}/cmdline").read_bytes()
            except OSError:
                continue
            if cmdline.startswith(b"ray::") or b"/ray/" in cmdline:
                found.append(process)
    return found


def reap(processes: list[tuple[int, str]], grace_s: float = REAP_GRACE_S) -> None:
    """Wait up to ``grace_s`` for ``processes`` (``ray_processes_below``'s) to exit, then SIGKILL
    the rest (a pid now another process's is left alone). ``ray.shutdown`` after a signal that
    arrived while ``ray.init`` ran leaves the raylet's dashboard and runtime-env agents running
    for a minute or more; a nightly job's next run must not meet them."""
    deadline = time.monotonic() + grace_s
    while any(_alive(process) for process in processes) and time.monotonic() < deadline:
        time.sleep(0.1)
    for process in processes:
        if _alive(process):
            with contextlib.suppress(OSError):
                os.kill(process[0], signal.SIGKILL)
