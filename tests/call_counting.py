"""Counting the Python calls a piece of code makes: the deterministic proxy of its CPU
that the call-budget tests hold (a wall-clock or CPU figure is too noisy to catch a few
calls more)."""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any


def start_counting_calls() -> Callable[[], int]:
    """Count, from now on in this thread, every call of a Python function or a builtin;
    returns the function that stops counting and says how many were made in between
    (itself and what it calls not counted). No garbage is collected meanwhile: a
    collection would call the finalizers (`__del__`) of whatever earlier tests in this
    process left behind, a few calls more in a full run."""
    calls = 0

    def count(frame: FrameType, event: str, arg: Any) -> None:
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    def stop() -> int:
        sys.setprofile(None)
        gc.enable()
        return calls - 2  # `stop` itself and its `sys.setprofile(None)`

    gc.collect()
    gc.disable()
    sys.setprofile(count)
    return stop
