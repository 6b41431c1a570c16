"""Turn pydantic validation errors into the one-line messages the CLI prints (exit code 2)."""

from __future__ import annotations

from pydantic import ValidationError


def one_line(exc: ValidationError, source: str) -> str:
    """``source: field.path: reason`` for the first error, plus how many more there are."""
    errors = exc.errors()
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"]) or "(top level)"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{source}: {where}: {first['msg']}{more}"
