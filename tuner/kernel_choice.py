"""``--kernel``: which kernel backend a command times, decided before Ray starts.

``auto`` (the default) is the kernel of the server the output is for: ``--format vllm`` → the
``vllm`` backend, ``sglang`` → ``sglang``, ``both`` → each layout tuned on its own server's kernel
(two runs). A server whose code does not import here (``workers.backends.server_code``: the
installed package, or ``--server-code DIR`` / ``MOE_TUNE_SERVER_CODE``), or whose kernel does not
run one of the shapes, falls back to ``builtin`` with one warning line on stderr saying the files
are tuned on moe-tune's kernel. A server kernel asked for by name that cannot be imported, or
that does not run a shape, is a usage error (exit 2) naming what is missing.

The probe imports the server's code in this process: the Ray workers must see the same code
(same installed version, or the same ``--server-code`` path, which is forwarded to them).

moe-tune's own fp4 kernel (``--builtin-fp4``, and ``compare``'s second column: jobs whose files no
server reads, written apart) runs on the ``builtin`` backend whatever ``--kernel`` says: those
jobs are routed to a run on it (the server runs' own when they fall back to builtin anyway), so
no candidate is ever sent to a server kernel whose ``check`` refuses its dtype. Each run times
exactly the plan jobs ``KernelRun.takes`` gives it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from tuner.errors import OptionError
from tuner.plan import DevicePlan, Job
from tuner.writers import format_servers
from workers import backends
from workers.records import MoEShape

AUTO = "auto"
FORMAT_SERVER = {"vllm": backends.VLLM, "sglang": backends.SGLANG}
"""The server whose kernel reads each output layout (its backend bears the server's name)."""


@dataclass(frozen=True)
class KernelRun:
    """One tuning run: the layout(s) it writes and the backend it times.

    ``server_files``: it times the jobs whose files the servers of ``format`` read;
    ``builtin_fp4``: it times the jobs of moe-tune's own fp4 kernel (``Job.builtin_file_name``;
    only ever on ``builtin``)."""

    format: str
    kernel: str
    server_files: bool = True
    builtin_fp4: bool = False

    def takes(self, job: Job) -> bool:
        """Whether this run times plan job ``job``."""
        if job.builtin_file_name is not None:
            return self.builtin_fp4
        return self.server_files and bool(set(job.servers) & set(format_servers(self.format)))

    @property
    def what(self) -> str:
        """What the run tunes, in words (``tune --dry-run``)."""
        parts = [f"the {' and '.join(format_servers(self.format))} files"] if self.server_files else []
        if self.builtin_fp4:
            parts.append("moe-tune's own fp4 kernel (files apart, moe-tune-builtin/)")
        return " and ".join(parts)


def kernel_names() -> tuple[str, ...]:
    """What ``--kernel`` accepts: ``auto`` and every backend whose kernel takes a fused-MoE config
    (``workers.backends.config_names``)."""
    return (AUTO, *backends.config_names())


def kernel_metavar() -> str:
    """``--kernel``'s metavar, ``{auto,builtin,...}``: argparse shows no choices for a ``type``."""
    return "{" + ",".join(kernel_names()) + "}"


def refusal(kernel: str) -> str | None:
    """Why ``--kernel kernel`` is refused before anything is probed (a phrase: an unknown name, or
    a backend that takes no config), or None."""
    if kernel in backends.NO_CONFIG:
        return f"{backends.NO_CONFIG[kernel]}: nothing to tune or bench in it"
    if kernel not in kernel_names():
        return f"unknown kernel; expected one of {', '.join(kernel_names())}"
    return None


def kernel_arg(text: str) -> str:
    """argparse ``type`` of ``--kernel`` (tune, bench, compare): ``text`` if it is one of
    ``kernel_names()``, else ArgumentTypeError saying why (a backend that takes no config, such as
    triton_kernels, is named as such)."""
    import argparse

    reason = refusal(text)
    if reason:
        raise argparse.ArgumentTypeError(f"{text}: {reason}")
    return text


def use_server_code(path: Path | None) -> None:
    """Apply ``--server-code DIR`` (as an absolute path, since workers may start elsewhere)."""
    from workers.backends.server_code import SERVER_CODE_ENV

    if path is None:
        return
    folder = path.expanduser().resolve()
    if not folder.is_dir():
        raise OptionError("server_code", f"{path}: not a folder")
    os.environ[SERVER_CODE_ENV] = str(folder)


def _unavailable(kernel: str, shapes: list[MoEShape]) -> str | None:
    """None when backend ``kernel`` imports here and runs every shape, else why not (one line)."""
    from workers.backends.base import BackendUnavailable  # torch: only once a backend is probed

    try:
        backend = backends.load(kernel)
    except BackendUnavailable as exc:
        return str(exc)
    for shape in shapes:
        reason = backend.check(shape)
        if reason:
            return f"{reason} ({shape.label})"
    return None


def resolve(kernel: str, fmt: str, shapes: list[MoEShape],
            servers_of: Callable[[MoEShape], tuple[str, ...]] | None = None,
            warnings: list[str] | None = None, builtin_fp4: bool = False) -> list[KernelRun]:
    """The runs ``--kernel kernel --format fmt`` makes for ``shapes`` (see the module docstring).

    ``shapes``: the shapes of the jobs whose files a server reads (not moe-tune's own fp4 kernel's).
    ``servers_of``: the servers whose files each shape is planned for (``tuner.plan``: with SGLang's
    shared-expert fusion a model has one shape per server); under ``auto`` each server's kernel
    must run only its own shapes, and a layout without shapes makes no run. Default: every shape
    is for every server. ``warnings``: where the fallback warning lines go instead of stderr (a
    caller that validates more input afterwards prints them once all of it is accepted).
    ``builtin_fp4``: the plan also has jobs for moe-tune's own fp4 kernel; they go to a builtin run.
    UsageError (one line) for a named kernel that takes no config, does not import or does not
    run a shape."""
    return _with_builtin_fp4(_server_runs(kernel, fmt, shapes, servers_of, warnings), fmt, builtin_fp4)


def plan_runs(kernel: str, preflight: DevicePlan, fmt: str, warnings: list[str],
              server: str | None = None) -> list[KernelRun]:
    """The kernel runs of a plan: how ``tune`` and ``compare`` both turn their checked plan
    (``preflight``, the plan for the device the validation plans for) into runs, here because this
    module owns which backend times which job (each command keeps only its own policy: ``compare``
    asks for builtin under ``--interpret``).

    The jobs whose files a server reads are resolved by ``resolve``; moe-tune's own fp4 kernel's
    jobs go to a builtin run. ``server`` None (``tune``): each layout of ``fmt`` on its own server's
    kernel, a shape given to the layouts of the servers it is planned for (``Job.servers``).
    ``server`` given (``compare --server``): every such shape on that server's kernel choice, each
    run writing the ``fmt`` layouts. Warnings (``auto``'s fallback) are appended to ``warnings``;
    OptionError as ``resolve``."""
    servers = {job.shape: job.servers for job in preflight.jobs if job.builtin_file_name is None}
    builtin_fp4 = any(job.builtin_file_name for job in preflight.jobs)
    if server is None:
        return resolve(kernel, fmt, list(servers), servers.__getitem__, warnings, builtin_fp4=builtin_fp4)
    runs = resolve(kernel, server, list(servers), warnings=warnings, builtin_fp4=builtin_fp4)
    return [replace(run, format=fmt) for run in runs]


def _with_builtin_fp4(runs: list[KernelRun], fmt: str, builtin_fp4: bool) -> list[KernelRun]:
    """``runs`` with the builtin fp4 jobs given to the first builtin run, else to one of their own."""
    if not builtin_fp4:
        return runs
    for index, run in enumerate(runs):
        if run.kernel == backends.BUILTIN:
            return [*runs[:index], KernelRun(run.format, run.kernel, run.server_files, True), *runs[index + 1:]]
    return [*runs, KernelRun(fmt, backends.BUILTIN, server_files=False, builtin_fp4=True)]


def _server_runs(kernel: str, fmt: str, shapes: list[MoEShape],
                 servers_of: Callable[[MoEShape], tuple[str, ...]] | None,
                 warnings: list[str] | None) -> list[KernelRun]:
    if kernel != AUTO:
        refused = refusal(kernel)
        if refused:
            raise OptionError("kernel", f"{kernel}: {refused}")
    if not shapes:
        return []
    if kernel != AUTO:
        reason = _unavailable(kernel, shapes)
        if reason:
            raise OptionError("kernel", reason, flagged=False)
        return [KernelRun(fmt, kernel)]
    layouts = list(FORMAT_SERVER) if fmt == "both" else [fmt]
    runs = []
    for layout in layouts:
        server = FORMAT_SERVER[layout]
        own = [shape for shape in shapes if servers_of is None or layout in servers_of(shape)]
        if not own and servers_of is not None:
            continue
        reason = _unavailable(server, own)
        if reason:
            line = (f"moe-tune: warning: --kernel auto: {server}'s kernel is not usable here ({reason}); the "
                    f"{layout} configs are tuned and timed on moe-tune's builtin kernel, not {server}'s")
            if warnings is None:
                print(line, file=sys.stderr)
            else:
                warnings.append(line)
        runs.append(KernelRun(layout, backends.BUILTIN if reason else server))
    if len(runs) > 1 and len({run.kernel for run in runs}) == 1:
        return [KernelRun(fmt, runs[0].kernel)]
    return runs


def pinned_rule(server_version: str | None) -> str | None:
    """The default-config rule ``--server-version`` names (``workers.default_config.RULES``), None
    when it is not given. It depends on nothing else, so a command takes it first among its kernel
    checks: a bad ``--server-version`` is its one line of bad input, before ``--kernel``'s errors
    and ``auto``'s fallback warning. UsageError (one line) for a version whose rule is not recorded."""
    from workers import default_config

    if not server_version:
        return None
    try:
        return default_config.rule_for_version(server_version)
    except ValueError as exc:
        raise OptionError("server_version", str(exc)) from None


def default_rule(kernel: str, server_version: str | None, server: str = "vllm") -> str:
    """The default-config rule (``workers.default_config.RULES``) of ``server``, the server whose
    file is tuned or benched (what it runs where that file is missing): ``--server-version``'s rule
    when given (``server_version``: the flag's value, or the rule ``pinned_rule`` made of it);
    else SGLang's rule for ``sglang``; else, for ``vllm``, the rule of the vLLM version whose
    kernel is timed (``kernel`` ``vllm``, as imported), else of the installed vLLM, else vLLM's
    newest rule. Whatever ``kernel`` times the configs (builtin included), the default is the
    server's. UsageError (one line) for a version whose rule is not recorded."""
    from workers import default_config

    if server not in FORMAT_SERVER.values():
        raise ValueError(f"unknown server {server!r}")
    pinned = pinned_rule(server_version)
    if pinned:
        return pinned
    if server == "sglang":
        return default_config.SGLANG
    try:
        if kernel == backends.VLLM:
            version = backends.load(backends.VLLM).describe()["kernel_version"].split(" ", 1)[1]
            return default_config.rule_for_version(f"vllm=={version}")
        import importlib.metadata

        try:
            return default_config.rule_for_version(f"vllm=={importlib.metadata.version('vllm')}")
        except importlib.metadata.PackageNotFoundError:
            return default_config.VLLM
    except ValueError as exc:
        raise OptionError("server_version", str(exc)) from None
