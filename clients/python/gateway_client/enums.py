"""Enum values as the CLI prints them, including values this client does not know."""

from __future__ import annotations

from typing import Any


def enum_name(enum: Any, value: int, *, prefix: str = "") -> str:
    """`enum.Name(value)` without `prefix`, or the number itself for a value this client's
    generated code does not know (a newer gateway's). `Name` raises on one, which ended a
    command after its call was answered, and paid for."""
    try:
        return str(enum.Name(value)).removeprefix(prefix)
    except ValueError:
        return str(value)
