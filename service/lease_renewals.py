"""Renewing the leases one replica holds in Redis, for as long as their calls run.

A call's tenant slot and its budget reservation are leases in Redis that lapse
`LEASE_TTL_S` after they were last renewed: a replica that dies mid-call (SIGKILL, an
OOM kill, a lost node) cannot give them back, and they then hold its tenants' slots and
budgets for that long at most. Its live calls' leases are renewed every third of the
TTL, so a lease lapses only after two renewals in a row went unanswered, and a call
longer than the TTL still counts to its end. One task renews every lease the replica
holds, in one script a round (one round trip, however many leases are held), rather
than a task or a round trip for each call; it ends once a round finds none held (it
lingers that long, so that calls coming and going do not each start one).

A renewal puts back a lease that lapsed (Redis unreachable past the TTL, or restarted
empty): its call still runs. It must not put back one its call gave back, yet a renewal
sent may run after the release (it timed out, or sat in a stalled server's input): the
release of a lease a renewal was sent for (`let_go` says so) also leaves a released
marker for the TTL, which the renewal script checks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from service.store_cooldown import StoreCooldown

log = logging.getLogger("llm_gateway.lease_renewals")

# A minute: a dead replica's leases free within it (a tenant refused for them is told to
# retry in a second), while a lease survives a Redis failover or a stalled event loop of
# some 40 s (two missed renewals) before it lapses, and one that lapsed is put back by
# the first renewal Redis answers. A renewal round every 20 s costs one round trip.
LEASE_TTL_S = 60

L = TypeVar("L")


class LeaseRenewals(Generic[L]):
    """Renews the leases held (`hold` to `let_go`), each described by an `L`, with
    `renew(leases)`: one script for them all, which puts back a lapsed lease unless it is
    marked released. `store` names them in the logs."""

    def __init__(
        self,
        store: str,
        *,
        ttl_s: float,
        renew: Callable[[list[L]], Awaitable[object]],
        cooldown: StoreCooldown,
        on_answered: Callable[[], None],
    ) -> None:
        self._store = store
        self._ttl_s = ttl_s
        self._renew = renew
        self._cooldown = cooldown
        # Redis answered a round: what waits for it (`LateReleases`) can go now.
        self._on_answered = on_answered
        # The leases of this replica's calls in progress, those a renewal was sent for,
        # and the task renewing them while any are held.
        self._held: dict[str, L] = {}
        self._renewed: set[str] = set()
        self._renewing: asyncio.Task[None] | None = None

    def hold(self, lease_id: str, lease: L) -> None:
        """Renew `lease` from now on, until `let_go(lease_id)`."""
        self._held[lease_id] = lease
        if self._renewing is None or self._renewing.done():
            self._renewing = asyncio.create_task(self._renew_held())

    def let_go(self, lease_id: str) -> bool:
        """Renew the lease no more; whether a renewal was sent for it (one that Redis may
        still run: its release must mark it released)."""
        self._held.pop(lease_id, None)
        is_renewed = lease_id in self._renewed
        self._renewed.discard(lease_id)
        return is_renewed

    async def aclose(self) -> None:
        """Stop renewing (before the Redis client closes)."""
        renewing, self._renewing = self._renewing, None
        # One of an earlier loop ended with it (and could not be awaited on this one).
        if renewing is not None and renewing.get_loop() is asyncio.get_running_loop():
            renewing.cancel()
            await asyncio.gather(renewing, return_exceptions=True)

    async def _renew_held(self) -> None:
        """Renew every lease held, every third of the TTL, until a round finds none. A
        round Redis does not answer is tried again at the next (the leases still count
        meanwhile, and one that lapsed is put back); a lease taken since the last round is
        a third of its TTL old at most."""
        while self._held:
            await asyncio.sleep(self._ttl_s / 3)
            if not self._held or self._cooldown.skips():
                continue
            self._renewed.update(self._held)
            try:
                await self._renew(list(self._held.values()))
            except Exception as exc:  # Redis down: the next round, or else the TTL
                if self._cooldown.failed(exc):
                    log.warning(
                        "lease_renewals.failed",
                        extra={"store": self._store, "error": type(exc).__name__},
                    )
            else:
                # Answered: the cool-down ends, or the next round's `skips()` would leave
                # the leases to lapse with nothing else asking that Redis.
                self._on_answered()
