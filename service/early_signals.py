"""SIGTERM, SIGINT and SIGHUP held from the first line of `serve` until its loop handles them.

Imports and the config take most of a second; until `serve` installs its own handlers, a
SIGTERM would kill the process (status 143), a SIGHUP too (129) and a SIGINT end it with
KeyboardInterrupt (130): a pod deleted just after it started would end in error. Held,
the signal is recorded and `serve` (or the `--workers` supervisor) stops as soon as it can
look. Standard library only: this module is imported before anything slow.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

# SIGHUP (a closed terminal, some process managers) stops the gateway as SIGTERM does,
# unless the process started with it ignored: `nohup` asks for exactly that.
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# What a terminal sends its whole process group: Ctrl-C, and SIGHUP when it closes.
GROUP_SIGNALS = frozenset({signal.SIGINT, signal.SIGHUP})
_received: list[int] = []
_previous: dict[int, Any] = {}


def _record(signum: int, _frame: FrameType | None) -> None:
    _received.append(signum)


def stop_signals() -> tuple[signal.Signals, ...]:
    """The signals that stop the gateway gracefully: SIGTERM, SIGINT and SIGHUP, less
    SIGHUP while it is ignored (`nohup`; a `--workers` worker inherits that at its start)."""
    return tuple(
        sig
        for sig in _SIGNALS
        if sig != signal.SIGHUP or signal.getsignal(sig) is not signal.SIG_IGN
    )


def hold() -> None:
    """Record the stop signals from now on instead of acting on them."""
    for sig in stop_signals():
        _previous.setdefault(sig, signal.signal(sig, _record))


def received() -> bool:
    """Whether a signal came while held (whatever handles the signals now)."""
    return bool(_received)


def ignore() -> None:
    """For once the gateway has stopped: the stop signals ignored while the process exits.

    Its event loop's close (or the interpreter's own exit, for a handler written in Python)
    gives them back their defaults, and a second signal then (an impatient operator, a
    supervisor's reminder) would turn a clean stop's status 0 into 143, 130 or 129.
    """
    for sig in _SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def release() -> None:
    """For commands other than `serve`: the handlers before `hold`, and a signal it
    recorded acted on now as it would have been then. Nothing when not held."""
    for sig, handler in _previous.items():
        signal.signal(sig, handler)
    _previous.clear()
    for sig in dict.fromkeys(_received):
        signal.raise_signal(sig)
    _received.clear()
