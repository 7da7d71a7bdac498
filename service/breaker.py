"""Circuit breakers, one per upstream and one per model there: closed → open → half-open → closed.

Closed lets every call through and counts failures. Too many consecutive failures, or
a failure ratio over a sliding window (once enough calls were seen), opens it: calls
skip the upstream until the cool-down passes. Then it is half-open and lets exactly one
probe through; the probe's success closes it, its failure opens it again. A probe still
running a cool-down after it was sent (an upstream that takes the request and hangs, up
to its `timeout_s`) lets one more through: a hung probe does not keep every call off a
mended upstream for minutes, and the upstream still gets one new call per cool-down.

A rejected key (401/403) or account (402) opens it at once for a longer cool-down:
retrying a bad key in a loop only burns quota and fills logs. Whether it is open for a
rejected key follows the probe's answer: a probe that fails otherwise reopens it as any
failure does.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from service.clock import SYSTEM_CLOCK, Clock
from service.retry import FailureScope

log = logging.getLogger("llm_gateway.breaker")

CONSECUTIVE_FAILURES = 10
FAILURE_RATIO = 0.5
MIN_CALLS = 20  # calls in the window before the ratio may open the breaker
WINDOW_S = 30.0  # seconds
COOL_DOWN_S = 15.0  # seconds open before a probe is let through
KEY_REJECTED_COOL_DOWN_S = 300.0  # seconds


class BreakerState(enum.Enum):
    """The breaker's view of an upstream's health."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    """Thresholds and cool-downs of one breaker."""

    consecutive_failures: int = CONSECUTIVE_FAILURES
    failure_ratio: float = FAILURE_RATIO
    min_calls: int = MIN_CALLS
    window_s: float = WINDOW_S
    cool_down_s: float = COOL_DOWN_S
    key_rejected_cool_down_s: float = KEY_REJECTED_COOL_DOWN_S


@dataclass(frozen=True, slots=True)
class BreakerChange:
    """One state transition, as hooks receive it."""

    upstream: str
    old: BreakerState
    new: BreakerState
    reason: str
    # The upstream's name of the model whose breaker it is; None for the upstream's own.
    model: str | None = None


class CircuitBreaker:
    """Decides whether a call may go to one upstream, or to one model there (`model`, the
    upstream's name of it); told the outcome of each call."""

    def __init__(
        self,
        upstream: str,
        settings: BreakerSettings = BreakerSettings(),
        *,
        clock: Clock = SYSTEM_CLOCK,
        on_change: Callable[[BreakerChange], None] | None = None,
        model: str | None = None,
    ) -> None:
        self.upstream = upstream
        self.model = model
        self.settings = settings
        self._clock = clock
        self._on_change = on_change
        self._state = BreakerState.CLOSED
        # Whether it is closed, read without a call: the pool asks on every attempt.
        self.is_closed = True
        self._opened_at = 0.0
        self._cool_down_s = settings.cool_down_s
        self._consecutive = 0
        self._outcomes: deque[tuple[float, bool]] = deque()  # (when, failed)
        self._probe_in_flight = False
        self._probe_sent_at = 0.0
        self.is_key_rejected = False
        # Times opened, and probes sent after one that ran a cool-down: a probe is the
        # current one while it is `episode`; one numbered from `_opening` on, a probe of
        # the current half-open, overtaken or not, whose answer shows the upstream back.
        self.episode = 0
        self._opening = 0
        # Reads the state when the cool-down ends, so that it turns half-open then (and
        # its hook tells the gauge) rather than at the next call: an idle upstream's
        # breaker read "open" on dashboards long after it would let a probe through.
        self._cool_down_timer: asyncio.TimerHandle | None = None

    @property
    def state(self) -> BreakerState:
        """The current state; an open breaker whose cool-down passed reads half-open."""
        if (
            self._state is BreakerState.OPEN
            and self._clock.now() - self._opened_at >= self._cool_down_s
        ):
            self._move(BreakerState.HALF_OPEN, "cool-down passed")
        return self._state

    def retry_after_s(self) -> float | None:
        """Seconds until an open breaker lets a probe through (None when not open)."""
        if self.state is not BreakerState.OPEN:
            return None
        return max(0.0, self._opened_at + self._cool_down_s - self._clock.now())

    def probe_due_s(self) -> float | None:
        """Seconds until a half-open breaker whose probe is running lets another through,
        should that probe not have answered by then (None when no probe holds it)."""
        if self.state is not BreakerState.HALF_OPEN or not self._probe_in_flight:
            return None
        return max(0.0, self._probe_sent_at + self.settings.cool_down_s - self._clock.now())

    def allows(self) -> bool:
        """Whether a call may be sent now (without claiming the half-open probe)."""
        if self._state is BreakerState.CLOSED:  # the usual answer; only OPEN changes as read
            return True
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        return state is BreakerState.HALF_OPEN and (
            not self._probe_in_flight or self._is_probe_overdue()
        )

    def acquire(self) -> bool:
        """Claim permission for one call; in half-open, only one probe at a time (another
        once the running one has gone a cool-down without an answer)."""
        if self._state is BreakerState.CLOSED:
            return True
        if not self.allows():
            return False
        if self._state is BreakerState.HALF_OPEN:
            if self._probe_in_flight:
                # Overtaken: its end frees nothing, its failure leaves the decision to the
                # new probe; its success still closes the breaker (`record_success`).
                self.episode += 1
            self._probe_in_flight = True
            self._probe_sent_at = self._clock.now()
        return True

    def _is_probe_overdue(self) -> bool:
        return self._clock.now() - self._probe_sent_at >= self.settings.cool_down_s

    def overtake_probe(self) -> None:
        """Take a running probe for overtaken (as `acquire` takes a hung one): its end frees
        nothing, its failure leaves the decision to the next probe, which may go at once;
        its success still closes the breaker."""
        if self._probe_in_flight:
            self.episode += 1
            self._probe_in_flight = False

    def release(self, *, probe: int | None) -> None:
        """A claimed call ended without an outcome that says anything about health.

        `probe`: the `episode` in which the call was claimed half-open, as the probe
        (None: it was not). Only the current probe's end frees the probe slot: a call sent
        before the breaker opened may end during the probe, and so may a probe of an
        earlier half-open that outlived it (the breaker opened again meanwhile).
        """
        if probe == self.episode:
            self._probe_in_flight = False

    def record_success(self, *, probe: int | None = None) -> None:
        """The upstream answered; `probe` as `release`'s."""
        if self._state is not BreakerState.CLOSED and (
            probe is None or probe < self._opening or self.state is BreakerState.OPEN
        ):
            # A call sent before the breaker opened (the probes alone are sent while it is
            # not closed): its answer is older news than the failures that opened it, so
            # the cool-down stands, and half-open the probe decides; closed by it, every
            # call went on beside the probe. (Closed, the usual case, is known without
            # the state property.) A probe overtaken by a later one still closes it: with
            # answers slower than the cool-down, each probe is overtaken before it answers.
            return
        self._probe_in_flight = False
        self._consecutive = 0
        self._note(failed=False)
        if self._state is not BreakerState.CLOSED:
            self.is_key_rejected = False
            self._move(BreakerState.CLOSED, "probe succeeded")

    def note_success(self, now: float) -> None:
        """Count a success of a closed breaker with no probe (`record_success`'s part that
        its probe and its opening leave aside), `now` on its clock."""
        self._consecutive = 0
        # `_note` written out: every call's success comes here.
        outcomes = self._outcomes
        outcomes.append((now, False))
        horizon = now - self.settings.window_s
        while outcomes[0][0] <= horizon:
            outcomes.popleft()

    def reset(self, reason: str) -> None:
        """The upstream is known to be back (a restart answered): forget its failures."""
        self._probe_in_flight = False
        self.is_key_rejected = False
        self._move(BreakerState.CLOSED, reason)  # which also clears the failures counted

    def record_failure(self, *, reason: str = "failure", probe: int | None = None) -> None:
        """The upstream failed in a way that says it is unhealthy.

        `probe`: as `release`'s. Half-open, only the current probe's failure opens the
        breaker again: any other call failing then was sent before it opened (a long
        stream, a call the upstream held), and its failure is no newer than the ones that
        opened it. Taken for the probe's, it reopened the breaker under a probe that went
        on to succeed, and an upstream back up stayed shunned another cool-down for each
        such call (with `timeout_s` of minutes and a cool-down of seconds, many).
        """
        if probe != self.episode and self.state is BreakerState.HALF_OPEN:
            return  # older news than the opening: the probe decides
        self._probe_in_flight = False
        self._consecutive += 1
        self._note(failed=True)
        if self._state is BreakerState.HALF_OPEN:
            # The latest answer was no rejected key: calls meanwhile are told to come
            # back, not "do not retry". (A failure while open is from a call sent before
            # the breaker opened, and says nothing newer.)
            self.is_key_rejected = False
            self._open(self.settings.cool_down_s, "probe failed: " + reason)
            return
        if self._state is not BreakerState.CLOSED:
            return
        if self._consecutive >= self.settings.consecutive_failures:
            self._open(self.settings.cool_down_s, f"{self._consecutive} consecutive failures")
            return
        calls = len(self._outcomes)
        failures = sum(1 for _, failed in self._outcomes if failed)
        if calls >= self.settings.min_calls and failures / calls >= self.settings.failure_ratio:
            self._open(self.settings.cool_down_s, f"{failures}/{calls} calls failed")

    def trip(self, reason: str) -> None:
        """Open a closed breaker for its cool-down on failures counted elsewhere (its
        upstream's models'); one not closed is left to its own cool-down and probe."""
        if self._state is BreakerState.CLOSED:
            self._open(self.settings.cool_down_s, reason)

    def is_failing(self) -> bool:
        """Whether it keeps calls off for failures seen lately: open, or half-open since an
        opening within `window_s` (its probe not answered yet). A half-open breaker that
        no call came to for longer says nothing of now."""
        if self.is_closed:
            return False
        if self.state is BreakerState.OPEN:
            return True
        return self._clock.now() - self._opened_at < self.settings.window_s

    def record_key_rejected(self) -> None:
        """The upstream rejected the gateway's key: open for the long cool-down."""
        self._probe_in_flight = False
        self._consecutive += 1
        self._note(failed=True)
        self.is_key_rejected = True
        self._open(self.settings.key_rejected_cool_down_s, "key rejected")

    def _note(self, *, failed: bool) -> None:
        now = self._clock.now()
        self._outcomes.append((now, failed))
        horizon = now - self.settings.window_s
        while self._outcomes and self._outcomes[0][0] <= horizon:
            self._outcomes.popleft()

    def _open(self, cool_down_s: float, reason: str) -> None:
        self.episode += 1
        self._opening = self.episode
        self._opened_at = self._clock.now()
        self._cool_down_s = cool_down_s
        self._move(BreakerState.OPEN, reason)
        if self._cool_down_timer is not None:
            self._cool_down_timer.cancel()
        with contextlib.suppress(RuntimeError):  # no loop running: read when asked, as ever
            loop = asyncio.get_running_loop()
            self._cool_down_timer = loop.call_later(cool_down_s, self._cool_down_passed)

    def _cool_down_passed(self) -> None:
        self._cool_down_timer = None
        self.state  # noqa: B018  # turns half-open if due (a reset or a reopening aside)

    def _move(self, new: BreakerState, reason: str) -> None:
        old = self._state
        self._state = new
        self.is_closed = new is BreakerState.CLOSED
        if new is BreakerState.CLOSED:
            self._outcomes.clear()
            self._consecutive = 0
        if old is new:
            return
        extra = {"upstream": self.upstream, "from": old.value, "to": new.value, "why": reason}
        if self.model is not None:
            extra["model"] = self.model
        log.info("breaker.state_changed", extra=extra)
        if self._on_change is not None:
            self._on_change(BreakerChange(self.upstream, old, new, reason, self.model))


# The episodes (`CircuitBreaker.episode`) of the upstream's and the model's breaker in
# which a call was let through as that breaker's half-open probe; None: not its probe.
RouteProbe = tuple[int | None, int | None]


class RouteBreaker:
    """The two breakers a call to one model on one upstream passes: the upstream's own,
    shared by every model it serves, and the model's there. A call goes through only when
    both let it; it may be the probe of either, or of both."""

    __slots__ = ("model", "upstream")

    def __init__(self, upstream: CircuitBreaker, model: CircuitBreaker) -> None:
        self.upstream = upstream
        self.model = model

    def allows(self) -> bool:
        """Whether a call may be sent now (without claiming a half-open probe)."""
        return self.upstream.allows() and self.model.allows()

    def acquire(self) -> bool:
        """Claim permission for one call of both breakers (each half-open one's probe), or
        of neither."""
        if not self.allows():
            return False
        self.upstream.acquire()
        self.model.acquire()
        return True

    def claimed_probe(self) -> RouteProbe | None:
        """After `acquire`: the breakers whose probe the call is; None when neither."""
        upstream = _probe_episode(self.upstream)
        model = _probe_episode(self.model)
        return None if upstream is None and model is None else (upstream, model)

    def reclaim(self, probe: RouteProbe | None) -> tuple[bool, RouteProbe | None]:
        """After the call waited its turn (`probe` claimed before): whether it may still go,
        and the breakers whose probe it is now. A probe of a half-open that ended meanwhile
        (the breaker opened again) is none; a breaker that is no longer closed is claimed
        again, as for a call planned now. Refused, it releases what it held."""
        upstream, model = probe or (None, None)
        if upstream is not None and upstream != self.upstream.episode:
            upstream = None
        if model is not None and model != self.model.episode:
            model = None
        claims_upstream = upstream is None and not self.upstream.is_closed
        claims_model = model is None and not self.model.is_closed
        if (claims_upstream and not self.upstream.allows()) or (
            claims_model and not self.model.allows()
        ):
            self.release((upstream, model))
            return False, None
        if claims_upstream:
            self.upstream.acquire()
            upstream = _probe_episode(self.upstream)
        if claims_model:
            self.model.acquire()
            model = _probe_episode(self.model)
        return True, None if upstream is None and model is None else (upstream, model)

    def release(self, probe: RouteProbe | None) -> None:
        """A claimed call ended without an outcome that says anything about health."""
        upstream, model = probe or (None, None)
        self.upstream.release(probe=upstream)
        self.model.release(probe=model)

    def record_success(self, *, probe: RouteProbe | None) -> bool:
        """The model answered; whether the upstream's own breaker is closed after it (for
        the upstream's key watch: not when it took the answer for older news)."""
        upstream, model = self.upstream, self.model
        if probe is None and upstream.is_closed and model.is_closed:
            # Both closed, the usual answer: counted without `record_success`'s frames
            # (every call's success path comes here). One reading of the clock serves both:
            # a route's two breakers are made on its pool's one clock.
            now = upstream._clock.now()
            upstream.note_success(now)
            model.note_success(now)
            return True
        upstream_probe, model_probe = probe or (None, None)
        upstream.record_success(probe=upstream_probe)
        model.record_success(probe=model_probe)
        return upstream.is_closed or upstream.state is BreakerState.CLOSED

    def record_failure(self, scope: FailureScope, *, reason: str, probe: RouteProbe | None) -> None:
        """The call failed in a way that says `scope` is unhealthy: a failure of the
        upstream itself counts against the upstream's breaker, one of the model against the
        model's alone, unless the call was the probe of the upstream's half-open breaker,
        whose failure of any kind opens it again (it was to show the upstream serving)."""
        upstream_probe, model_probe = probe or (None, None)
        if scope is FailureScope.UPSTREAM:
            self.upstream.record_failure(reason=reason, probe=upstream_probe)
            self.model.release(probe=model_probe)
            return
        if upstream_probe is not None and self._is_current_probe(upstream_probe):
            self.upstream.record_failure(reason=reason, probe=upstream_probe)
        self.model.record_failure(reason=reason, probe=model_probe)

    def _is_current_probe(self, upstream_probe: int) -> bool:
        """Whether `upstream_probe` is the probe of the upstream's breaker now half-open."""
        upstream = self.upstream
        return upstream_probe == upstream.episode and upstream.state is BreakerState.HALF_OPEN

    def record_key_rejected(self, *, probe: RouteProbe | None) -> None:
        """The upstream rejected the gateway's key: its own breaker opens, for every model."""
        self.upstream.record_key_rejected()
        self.model.release(probe=None if probe is None else probe[1])

    @property
    def state(self) -> BreakerState:
        """The route's state: open when either breaker is, else half-open when either is."""
        upstream, model = self.upstream.state, self.model.state
        if BreakerState.OPEN in (upstream, model):
            return BreakerState.OPEN
        if BreakerState.HALF_OPEN in (upstream, model):
            return BreakerState.HALF_OPEN
        return BreakerState.CLOSED


def _probe_episode(breaker: CircuitBreaker) -> int | None:
    """The episode of `breaker` when a call it just let through is its probe, else None."""
    return breaker.episode if breaker.state is BreakerState.HALF_OPEN else None


__all__ = [
    "BreakerChange",
    "BreakerSettings",
    "BreakerState",
    "CircuitBreaker",
    "FailureScope",
    "RouteBreaker",
    "RouteProbe",
]
