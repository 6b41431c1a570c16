"""Errors the CLI turns into exit codes: bad input is exit 2 with one line, never a traceback."""


class UsageError(Exception):
    """The user's input is wrong (bad flag value, unreadable model config, invalid space file)."""


class RunFailed(Exception):
    """The run itself failed (no GPU, every candidate failed); exit code 1."""
