"""Errors the CLI turns into exit codes: bad input is exit 2 with one line, never a traceback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class UsageError(Exception):
    """The user's input is wrong (bad flag value, unreadable model config, invalid space file)."""


class OptionError(UsageError):
    """Bad input about one option of a command.

    ``option``: the option's name as its ``argparse`` destination and ``tuner.options.TuneOptions``
    field (``block_shape`` for ``--block-shape``); ``index``: which value of a repeatable option
    (``--baseline``), when known; ``reason``: the line without the flag. ``str()`` is the line the
    CLI prints: ``--block-shape <reason>``, or the reason alone when ``flagged`` is False (a line
    that reads without the flag, such as ``nothing to tune: …``). A caller that takes the option
    from elsewhere (a job spec's key) names it from ``option`` and prints ``reason``.
    """

    def __init__(self, option: str, reason: str, *, flagged: bool = True, index: int | None = None) -> None:
        self.option = option
        self.reason = reason
        self.index = index
        super().__init__(f"{self.flag} {reason}" if flagged else reason)

    @property
    def flag(self) -> str:
        return "--" + self.option.replace("_", "-")


@contextmanager
def about(option: str, index: int | None = None) -> Iterator[None]:
    """A UsageError raised inside that names no option becomes an ``OptionError`` about
    ``option`` (its line unchanged); one that names an option already passes as it is."""
    try:
        yield
    except OptionError:
        raise
    except UsageError as exc:
        raise OptionError(option, str(exc), flagged=False, index=index) from None


class RunFailed(Exception):
    """The run itself failed (no GPU, every candidate failed); exit code 1."""
