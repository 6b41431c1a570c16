"""Argument types and checks the subcommands share.

Each ``*_arg``/``*_list`` function is an argparse ``type``: a bad value raises
``ArgumentTypeError``, which the CLI prints as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from tuner.errors import OptionError, UsageError
from workers.formats import block_shape_broken
from workers.records import DType, MoEShape

INTERPRET_MAX_WEIGHTS = 4 * 2 * 128 * 128
"""--interpret refuses shapes with more than E·2N·K = 131072 weights (E=4, N=K=128): the
interpreter runs each Triton program in numpy, so one candidate at that size takes seconds."""
INTERPRET_MAX_M = 64


def nonblank(text: str) -> str:
    """A name or path as given; a blank one (``--out "$OUT"`` with ``OUT`` unset) is refused rather
    than read as the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a name or path, got an empty string")
    return text


def path_arg(text: str) -> Path:
    """``nonblank`` as a ``Path``."""
    return Path(nonblank(text))


def int_list(text: str) -> list[int]:
    """``"1,2,4"`` → ``[1, 2, 4]``."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def batch_size_list(text: str) -> list[int]:
    """``"64,1,64"`` → ``[1, 64]`` (``tuner.plan.resolve_batch_sizes``)."""
    from tuner.plan import resolve_batch_sizes

    try:
        return resolve_batch_sizes(int_list(text))
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_batch_sizes_argument(parser: argparse.ArgumentParser, default: Sequence[int] | None = None) -> None:
    """``--batch-sizes M,M,...``; absent, the command's ``default`` (None: vLLM's and SGLang's
    tuning batch sizes, applied by ``tuner.plan.resolve_batch_sizes``)."""
    from tuner.plan import DEFAULT_BATCH_SIZES

    shown = default if default is not None else DEFAULT_BATCH_SIZES
    parser.add_argument("--batch-sizes", type=batch_size_list, default=list(default) if default else None,
                        metavar="M,M,...", help=f"default: {','.join(map(str, shown))}")


def block_shape_arg(text: str) -> tuple[int, int]:
    """``"128,128"`` → ``(128, 128)``: an fp8 weight block ``[block_n, block_k]``
    (``workers.formats.block_shape_broken``)."""
    values = int_list(text)
    problem = block_shape_broken(values)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return values[0], values[1]


def dtype_list(text: str) -> list[DType]:
    """``"bf16,fp8_w8a8"`` → the dtypes, each once, in the order given (``DType.parse_list``)."""
    try:
        return DType.parse_list(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class _DTypes(argparse.Action):
    """Collects ``--dtype`` values: each occurrence a ``dtype_list`` (``D`` or ``D,D,...``), all
    occurrences together, each dtype once in the order first given; the first occurrence replaces
    the default."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        current = getattr(namespace, self.dest, None)
        current = [] if current is None or current is self.default else list(current)
        setattr(namespace, self.dest, list(dict.fromkeys([*current, *values])))


def add_dtype_argument(parser: argparse.ArgumentParser, help: str, *names: str,
                       default: list[DType] | None = None) -> None:
    """The dtypes option, alike in every command: ``--dtype D`` repeatable and ``--dtype D,D,...``
    (also mixed: ``--dtype bf16,fp8_w8a8 --dtype int8_w8a16``); the parsed value is a list of
    ``DType`` without repeats, or ``default`` when the option is absent. ``names``: the option's
    spellings (default ``--dtype``)."""
    choices = ", ".join(d.value for d in DType)
    parser.add_argument(*(names or ("--dtype",)), type=dtype_list, action=_DTypes, default=default,
                        metavar="D[,D...]", help=f"{help} (repeatable or comma-separated; {choices})")


def _number(text: str, convert: Callable[[str], float], valid: Callable[[float], bool], expected: str):
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not valid(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 1, "a positive integer")


def group_size_arg(text: str) -> int:
    """An int4 scale group along K: a positive size, or ``-1`` (one group per row)."""
    return _number(text, int, lambda v: v == -1 or v >= 1, "a positive size or -1 (per row)")


def positive_float(text: str) -> float:
    return _number(text, float, lambda v: 0 < v < math.inf, "a positive number")


def ratio_arg(text: str) -> float:
    return _number(text, float, lambda v: 0.0 < v <= 1.0, "a number in (0, 1]")


def routing_arg(text: str) -> str:
    """The canonical routing spec (``uniform``, ``zipf:<alpha>``, ``file:<path>``; a file pinned
    to its absolute path and content digest, ``workers.routing.pin_file``)."""
    from workers.routing import pin_file  # imports torch: only for commands that take --routing

    try:
        return pin_file(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def check_routing_file(routing: str, shapes: Iterable[MoEShape]) -> None:
    """A captured routing's ids (``file:``) checked against each shape's experts and top-k before
    any work starts (``workers.routing.check_file``); UsageError naming the shape. Other kinds pass."""
    from workers.routing import check_file  # imports torch: only when a command runs

    for shape in dict.fromkeys(shapes):
        try:
            check_file(routing, shape)
        except ValueError as exc:
            raise OptionError("routing", f"({shape.label}): {exc}") from None


def check_output_location(path: Path, option: str, *, folder: bool) -> None:
    """Refuse, before anything is created, an output path that cannot become a folder (``folder``)
    or a file: an existing non-folder given as a folder, or a file on its way. An ``OptionError``
    about ``option`` (the command's option: ``out``, ``configs_out``, ``journal``), one line.
    Whether the place can be written is ``tuner.writers.probe_writable``'s check, made last."""
    if folder and path.exists() and not path.is_dir():
        raise OptionError(option, f"{path}: exists and is not a folder")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OptionError(option, f"{path}: {parent} is a file, not a folder")
            return


def interpret_shape_problem(shapes: Iterable[MoEShape]) -> str | None:
    """Why ``--interpret`` cannot run one of ``shapes`` in reasonable time (one line), or None."""
    for shape in shapes:
        weights = shape.E * shape.up_rows * shape.K
        if weights > INTERPRET_MAX_WEIGHTS:
            return (f"--interpret runs the Triton interpreter on the CPU, tiny shapes only: {shape.label} "
                    f"has E*2N*K = {weights} weights (limit {INTERPRET_MAX_WEIGHTS})")
    return None


def interpret_batch_problem(batch_sizes: Iterable[int]) -> str | None:
    """Why ``--interpret`` cannot run ``batch_sizes`` (one line), or None."""
    largest = max(batch_sizes)
    if largest > INTERPRET_MAX_M:
        return f"--interpret takes batch sizes up to {INTERPRET_MAX_M} (got {largest})"
    return None


def check_interpret_limits(shapes: Iterable[MoEShape], batch_sizes: Iterable[int]) -> None:
    """Refuse what ``--interpret`` cannot run in reasonable time: the interpreter runs on the CPU."""
    problem = interpret_shape_problem(shapes)
    if problem:
        raise OptionError("interpret", problem, flagged=False)
    problem = interpret_batch_problem(batch_sizes)
    if problem:
        raise OptionError("batch_sizes", f"{problem}; pass --batch-sizes", flagged=False)


def add_layout_arguments(parser: argparse.ArgumentParser, repeatable_model: bool = False) -> None:
    """``--model``, ``--tp`` and ``--ep``: the model and the parallel layout, alike in every command."""
    if repeatable_model:
        parser.add_argument("--model", action="append", required=True, type=nonblank, metavar="NAME|PATH",
                            help="preset name, config.json, model folder or cached HF repo id (repeatable)")
    else:
        parser.add_argument("--model", required=True, type=nonblank, metavar="NAME|PATH",
                            help="preset name, config.json, model folder or cached HF repo id")
    parser.add_argument("--tp", type=int, default=1, help="GPUs serving the MoE layer (tensor-parallel size)")
    parser.add_argument("--ep", type=int, default=1,
                        help="expert-parallel size, dividing --tp (--tp 2 --ep 2 is vLLM's --enable-expert-parallel)")


def add_fresh_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fresh", action="store_true",
                        help="set the journal aside (kept as <journal>.<time>.old) and measure everything again; "
                             "asks first when the journal holds measurements of this work")
    parser.add_argument("--yes", action="store_true", help="confirm --fresh without asking (needed without a terminal)")


def confirm_fresh(journal: Path, measurements: int, yes: bool) -> None:
    """Before ``--fresh`` sets aside ``measurements`` saved measurements of the work at hand: ask on
    a terminal, refuse without one unless ``yes`` (a UsageError: nothing has started)."""
    if measurements == 0 or yes:
        return
    what = f"--fresh sets aside {journal}, which holds {measurements} measurements of this work, and measures again"
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        raise OptionError("fresh", f"{what}: pass --yes to confirm (no terminal to ask on)", flagged=False)
    sys.stderr.write(f"moe-tune: {what}. Continue? [y/N] ")
    sys.stderr.flush()
    try:
        answer = sys.stdin.readline().strip().lower()
    except (EOFError, OSError):
        answer = ""
    if answer not in ("y", "yes"):
        raise OptionError("fresh", "not confirmed; nothing was changed")
