"""A FakeUpstream that picks each behaviour from the request and counts calls in flight."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aiohttp import web

from tests.fake_upstream import Behaviour, FakeUpstream


def user_text(body: dict[str, Any]) -> str:
    """The content of the last user message of a recorded chat-completions body."""
    users = [m.get("content", "") for m in body.get("messages", []) if m.get("role") == "user"]
    return str(users[-1]) if users else ""


def system_text(body: dict[str, Any]) -> str:
    """The content of the first system message of a recorded body."""
    systems = [m.get("content", "") for m in body.get("messages", []) if m.get("role") == "system"]
    return str(systems[0]) if systems else ""


class ScriptedUpstream(FakeUpstream):
    """Answers each request with `respond(body)` when set, and tracks concurrency.

    `in_flight` is how many requests are being answered now, `peak_in_flight` the most
    there ever were at once, and `finished` how many answers were completed. While
    `gate` is cleared every request is held (in flight) before it is answered.
    """

    def __init__(
        self, *, respond: Callable[[dict[str, Any]], Behaviour | None] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.respond = respond
        self.in_flight = 0
        self.peak_in_flight = 0
        self.finished = 0
        self._changed = asyncio.Event()
        self.gate = asyncio.Event()
        self.gate.set()

    async def wait_until(self, predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
        """Wait until `predicate()` holds after some request started or ended."""
        async with asyncio.timeout(timeout_s):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    async def _play(
        self, request: web.Request, body: dict[str, Any], behaviour: Behaviour
    ) -> web.StreamResponse:
        chosen = self.respond(body) if self.respond is not None else None
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        self._changed.set()
        try:
            await self._hold(body)
            response = await super()._play(request, body, chosen or behaviour)
            self.finished += 1
            return response
        finally:
            self.in_flight -= 1
            self._changed.set()

    async def _hold(self, body: dict[str, Any]) -> None:
        """Hold a request, in flight, until it may be answered."""
        await self.gate.wait()


class GatedUpstream(ScriptedUpstream):
    """Holds each request, in flight, until the gate named by its user text is set
    (`release`): a test orders when each call is answered by events, not delays."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gates: dict[str, asyncio.Event] = {}

    def release(self, text: str) -> None:
        """Let the request whose user text is `text` be answered (now or once it comes)."""
        self.gates.setdefault(text, asyncio.Event()).set()

    async def _hold(self, body: dict[str, Any]) -> None:
        await super()._hold(body)
        await self.gates.setdefault(user_text(body), asyncio.Event()).wait()
