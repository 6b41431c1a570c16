"""The ``moe-tune`` command: parses arguments, dispatches to ``tuner.commands.<name>``.

Exit codes: 0 success, 1 the run failed, 2 bad input (one line on stderr, nothing written),
130 interrupted (Ctrl-C), 143 terminated (SIGTERM: Ray stopped, the journal intact; see
``tuner.signals``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from tuner import signals
from tuner.errors import RunFailed, UsageError

COMMANDS = {
    "plan": "list the tuning jobs a model, layout and dtypes need (no GPU)",
    "check": "compare the fused-MoE kernel against the fp32 reference",
    "tune": "tune configs on GPU workers through Ray and write server files",
    "bench": "time config folders against the server's default config, back to back; optional regression gate",
    "compare": "tune every dtype of a model and report which to deploy per batch size (md/html/json)",
    "job": "validate or run a job spec (models x dtypes x layouts, optional bench gate): the nightly entry point",
}


VERBOSE_ENV = "MOE_TUNE_VERBOSE"
"""Set to 1 by ``--verbose``: ``tuner.ray_session.ray_logging_level`` then lets Ray's own logging through."""


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on bad flags already; keep its message to one line (the CLI adds the
    ``moe-tune: error:`` prefix; a subcommand's message names the subcommand)."""

    def error(self, message: str) -> None:  # noqa: D401 - argparse API
        command = self.prog.removeprefix("moe-tune").strip()
        raise UsageError(f"{command}: {message}" if command else message)


def _common_flags() -> argparse.ArgumentParser:
    flags = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand's parser must not reset a --verbose given before the subcommand.
    flags.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="also show Ray's own start-up and cluster log lines (hidden by default)")
    return flags


def versions() -> dict[str, str | None]:
    """moe-tune's version and those of the packages it runs with: torch, Triton, Ray, and the
    inference servers whose kernels ``--kernel`` can time (None: not importable here).

    Read from the installed distributions' metadata, so nothing heavy is imported; a server that is
    importable without metadata (a source tree on PYTHONPATH) is asked its ``<package>.version``
    module, and one whose version cannot be read is reported as ``importable, version unknown``."""
    import importlib.util
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in ("moe-tune", "torch", "triton", "ray", "vllm", "sglang"):
        try:
            out[name] = metadata.version(name)
            continue
        except metadata.PackageNotFoundError:
            out[name] = None
        if name in ("vllm", "sglang") and importlib.util.find_spec(name) is not None:
            try:
                out[name] = str(importlib.import_module(f"{name}.version").__version__)
            except Exception:  # noqa: BLE001 - any failure of a foreign package's import is "unknown"
                out[name] = "importable, version unknown"
    return out


class _Version(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print moe-tune's, torch's, Triton's, Ray's and the "
                         "installed servers' versions and exit")

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        for name, version in versions().items():
            print(f"{name} {version or 'not installed'}")
        parser.exit(0)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser, with the flags of ``command`` only (None: of every command): importing a
    command's module pulls in torch, Ray or matplotlib, seconds that ``plan`` should not pay."""
    common = _common_flags()
    parser = _Parser(prog="moe-tune", description="Autotune fused-MoE Triton kernels for vLLM and SGLang.",
                     parents=[common])
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        if command in (None, name):
            importlib.import_module(f"tuner.commands.{name}").configure(sub_parser)
    return parser


def _command_of(argv: list[str]) -> str:
    """The subcommand: the first word that is not an option ("" when there is none)."""
    return next((word for word in argv if not word.startswith("-")), "")


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    signals.install()
    if "--interpret" in words:
        # Triton reads this when its language module is first imported, which the commands' imports do.
        os.environ["TRITON_INTERPRET"] = "1"
    if not _command_of(words) and not {"-h", "--help", "--version"} & set(words):
        # A bare ``moe-tune``: the usage and the commands, not only argparse's complaint.
        build_parser("").print_help(sys.stderr)
        return 2
    try:
        args = build_parser(_command_of(words)).parse_args(argv)
        if getattr(args, "verbose", False):
            os.environ[VERBOSE_ENV] = "1"
        module = importlib.import_module(f"tuner.commands.{args.command}")
        code = int(module.run(args) or 0)
        signals.check()  # a SIGTERM or SIGINT swallowed on the way still ends the command as one
        return code
    except BaseException as exc:  # noqa: BLE001 - dispatched below; anything else propagates
        if signals.caused(exc):
            # However it surfaced: Terminated, or a Ray call ended by it (a SystemError around it).
            # The command's hint (a tune's: what its journal holds); else no claim about a journal.
            hint = signals.hint_of(exc) or "run the same command again"
            print(f"moe-tune: terminated by SIGTERM; Ray stopped; {hint}", file=sys.stderr)
            _exit_now_if_stranded(signals.EXIT_CODE)
            return signals.EXIT_CODE
        if signals.interrupted() and not isinstance(exc, (UsageError, RunFailed)):
            exc = KeyboardInterrupt()  # however it surfaced (a SystemError out of Ray's compiled core)
        return _failure(exc)


def _exit_now_if_stranded(code: int) -> None:
    """End the process at once when a ``ray.init`` given up on (a cluster join past its timeout, or
    one a SIGTERM interrupted) is still running: it cannot be stopped, and interpreter shutdown
    would crash on it."""
    session = sys.modules.get("tuner.ray_session")  # loaded by every command that starts Ray
    if session is not None and session.connect_stranded():
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(code)


def _failure(exc: BaseException) -> int:
    """The exit code and the one line for a command's exception; re-raises what is not a known failure."""
    if isinstance(exc, UsageError):
        print(f"moe-tune: error: {exc}".splitlines()[0], file=sys.stderr)
        return 2
    if isinstance(exc, RunFailed):
        print(f"moe-tune: run failed: {exc}".splitlines()[0], file=sys.stderr)
        _exit_now_if_stranded(1)
        return 1
    if isinstance(exc, BrokenPipeError):
        # The reader went away (``moe-tune plan | head``): not a failure; keep Python's exit flush quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if isinstance(exc, KeyboardInterrupt):
        print("moe-tune: interrupted", file=sys.stderr)
        _exit_now_if_stranded(130)
        return 130
    raise exc


if __name__ == "__main__":
    sys.exit(main())
