"""Reading user files and turning validation errors into the one-line messages the CLI prints
(exit code 2): the JSON and YAML parsers every input file goes through, and pydantic's errors as
one line."""

from __future__ import annotations

import json
from typing import Any

import yaml
from pydantic import ValidationError

NESTED_TOO_DEEPLY = "nested too deeply to parse"


def parse_json(text: str) -> Any:
    """``json.loads(text)``; a document nested deeper than the parser's recursion limit (a
    hostile or broken file, ``[[[[…``) raises ``json.JSONDecodeError`` like any other text that
    does not parse, never ``RecursionError``."""
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError(NESTED_TOO_DEEPLY, text, 0) from None


def parse_yaml(text: str, loader: type = yaml.SafeLoader) -> Any:
    """``yaml.load(text, loader)`` (a safe loader; default PyYAML's); nesting deeper than the
    parser's recursion limit raises ``yaml.YAMLError`` like any other text that does not parse."""
    try:
        return yaml.load(text, Loader=loader)  # noqa: S506 - callers pass safe loaders only
    except RecursionError:
        raise yaml.YAMLError(NESTED_TOO_DEEPLY) from None


def one_line(exc: ValidationError, source: str) -> str:
    """``source: field.path: reason`` for the first error, plus how many more there are."""
    errors = exc.errors()
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"]) or "(top level)"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    # A validator's own ValueError/assert reads as its message: pydantic prefixes "Value error, ".
    message = first["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    return f"{source}: {where}: {message}{more}"
