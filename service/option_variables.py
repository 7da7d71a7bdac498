"""Command-line options whose default an environment variable gives
(`--log-level` from `LLM_GATEWAY_LOG_LEVEL`, `--address` from `LLM_GATEWAY_ADDRESS`, ...).

A value the option's type refuses is reported naming where it came from: the variable,
which the user set, rather than the option, which they never typed. No dependency beyond
the standard library, so that the client library (`gateway_client`) shares it.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from typing import TypeVar

__all__ = ["naming_variable", "variable_default", "variable_of"]

T = TypeVar("T")


class _FromVariable(str):
    """An option's default as read from the environment variable `variable`."""

    variable: str

    def __new__(cls, value: str, variable: str) -> _FromVariable:
        text = super().__new__(cls, value)
        text.variable = variable
        return text


def variable_default(
    variable: str, fallback: str | None = None, *, environ: Mapping[str, str] = os.environ
) -> str | None:
    """The environment variable `variable` as an option's default, else `fallback`; an
    empty one (a script's unset variable passed on) is unset."""
    value = environ.get(variable)
    if not value:
        return fallback
    return _FromVariable(value, variable)


def variable_of(value: str) -> str | None:
    """The environment variable a `variable_default` was read from; None for a value the
    user typed."""
    return value.variable if isinstance(value, _FromVariable) else None


def naming_variable(parse: Callable[[str], T]) -> Callable[[str], T]:
    """`parse` as an option's argparse type that, refusing a `variable_default`, names
    the variable: `environment variable LLM_GATEWAY_LOG_LEVEL: 'verbose' is not one of ...`.

    argparse runs a text default through the option's type only when the option is not
    given, and reports an `ArgumentTypeError` there as the option's ("argument
    --log-level: ..."); an `ArgumentError` of no option is reported as its message alone,
    as the same usage error (exit 2).
    """

    def parse_naming_variable(value: str) -> T:
        try:
            return parse(str(value))  # a plain str onwards: the variable is known here
        except argparse.ArgumentTypeError as exc:
            variable = variable_of(value)
            if variable is not None:
                message = f"environment variable {variable}: {exc}"
                raise argparse.ArgumentError(None, message) from None
            raise

    return parse_naming_variable
