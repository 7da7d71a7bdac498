"""A one-line progress bar for stderr: items, failures, tokens, cost, rate and ETA."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO

_BAR_WIDTH = 24
_TTY_REFRESH_S = 0.1
_LOG_REFRESH_S = 5.0


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def _count(value: int) -> str:
    if value >= 1_000_000:
        return f"{value / 1_000_000:.1f}M"
    if value >= 10_000:
        return f"{value / 1000:.1f}k"
    return str(value)


class Progress:
    """Counts finished items and redraws one status line.

    On a terminal the line is redrawn in place at most ten times a second; otherwise
    (a log file, CI) a fresh line is written every few seconds, so logs stay readable.
    """

    def __init__(
        self,
        total: int,
        *,
        stream: TextIO,
        clock: Callable[[], float] = time.monotonic,
        is_enabled: bool = True,
    ) -> None:
        self.total = total
        self.done = 0
        self.failed = 0
        self.tokens = 0
        self.cost_usd = 0.0
        self._stream = stream
        self._clock = clock
        self._is_enabled = is_enabled
        self._is_tty = stream.isatty()
        self._started = clock()
        self._drawn_at = float("-inf")

    def advance(self, *, is_failure: bool, tokens: int = 0, cost_usd: float = 0.0) -> None:
        """One more item finished."""
        self.done += 1
        self.failed += int(is_failure)
        self.tokens += tokens
        self.cost_usd += cost_usd
        self._draw(force=False)

    def note(self, text: str) -> None:
        """Write `text` on a line of its own (even with the bar off), the bar below it."""
        if self._is_enabled and self._is_tty:
            self._stream.write("\r\x1b[2K")
        self._stream.write(text + "\n")
        self._stream.flush()
        self._draw(force=True)

    def line(self) -> str:
        """The status line as it would be drawn now."""
        elapsed = max(self._clock() - self._started, 1e-9)
        rate = self.done / elapsed
        share = self.done / self.total if self.total else 1.0
        filled = round(_BAR_WIDTH * share)
        bar = "#" * filled + "-" * (_BAR_WIDTH - filled)
        left = self.total - self.done
        eta = _duration(left / rate) if rate > 0 and left > 0 else "-"
        return (
            f"{self.done}/{self.total} [{bar}] {share:4.0%}  failed {self.failed}  "
            f"tokens {_count(self.tokens)}  ${self.cost_usd:.4f}  {rate:.1f}/s  ETA {eta}"
        )

    def _draw(self, *, force: bool) -> None:
        if not self._is_enabled:
            return
        now = self._clock()
        every = _TTY_REFRESH_S if self._is_tty else _LOG_REFRESH_S
        if not force and now - self._drawn_at < every:
            return
        self._drawn_at = now
        if self._is_tty:
            self._stream.write("\r\x1b[2K" + self.line())
        else:
            self._stream.write(self.line() + "\n")
        self._stream.flush()

    def close(self) -> None:
        """Draw the final state and end the line."""
        self._draw(force=True)
        if self._is_enabled and self._is_tty:
            self._stream.write("\n")
            self._stream.flush()
