"""The upstreams that serve each model, and the retry/failover loop that calls them.

For each call the pool orders the model's routes (smooth weighted round-robin over the
upstreams whose circuit breaker lets calls through and whose limiter starts the call now,
else those it would wait in least), then runs a visible loop: take the next route, wait
as the retry policy says, pass the breaker, the retry budget and the upstream's limiter,
make one attempt. A retryable failure fails over to an upstream the call has not tried
(the first in the plan's order that starts it now, else the one it would wait in least)
or, once it has tried them all, waits and tries one again; a rejected key rules that
upstream out for the call and opens its breaker. Policy lives in `service.retry`,
`service.breaker` and `service.limits`; this module only sequences it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Container, Mapping, Sequence
from dataclasses import dataclass, field

from service.breaker import (
    BreakerChange,
    BreakerSettings,
    BreakerState,
    CircuitBreaker,
    RouteBreaker,
    RouteProbe,
)
from service.clock import SYSTEM_CLOCK, Clock, Deadline
from service.config import ResilienceConfig
from service.domain import FOLDED_EVERY, ChatRequest, Role, Usage
from service.errors import (
    DeadlineExceeded,
    GatewayError,
    ModelNotFound,
    ShuttingDown,
    ToolsUnsupported,
    UpstreamAuthRejected,
    UpstreamError,
    UpstreamLacksModel,
    UpstreamNotOpenAI,
    UpstreamRateLimited,
    UpstreamTemplateRefused,
    UpstreamTimeout,
    UpstreamUnavailable,
    attempt_failure,
    mark_unsent,
    stream_interrupted,
)
from service.limits import LimitExceeded, UpstreamLimiter
from service.machine_turns import MachineTurnLimiter, MachineTurns
from service.pool_hooks import AttemptRecord, PoolCounters, PoolHooks, RetryDecision
from service.rejected_keys import RejectedKeyWatch
from service.retry import (
    LACKING_MODEL_MEMORY_S,
    BackoffPolicy,
    RetryBudget,
    backoff_s,
    describe,
    failure_scope,
    is_failover_only,
    is_retryable,
)
from service.shared_limits import SharedLimits
from service.telemetry import active as telemetry
from service.telemetry.core import AttemptSpan
from service.upstream.client import UpstreamClient
from service.upstream.http import wrote_nothing
from service.upstream.openai_json import request_body
from service.upstream.types import (
    RateLimitHints,
    StreamEnd,
    StreamEvent,
    StreamTally,
    TextChunk,
    UpstreamCall,
    UpstreamReply,
    fold_chunks,
)

log = logging.getLogger("llm_gateway.pool")

_DEFAULT_MAX_TOKENS = 256  # tokens reserved for the answer when the request sets none
# Why a call skips an upstream that is down with a restart due (`UpstreamPool.set_down`).
RESTARTING = "restarting"
# Why a call that uses tools skips an upstream with `takes_tools: false`.
TAKES_NO_TOOLS = "takes no tools"
# Why a call skips an upstream whose own circuit breaker is open (every model it serves).
CIRCUIT_OPEN = "circuit open"
# Why a call skips an upstream whose breaker for the call's model is open (the upstream
# still serves its other models): one model failing there, not the provider down.
MODEL_CIRCUIT_OPEN = "circuit open for this model"
# Why a call skips an upstream that answered it has no such model (`UpstreamLacksModel`).
LACKS_MODEL = "model not served there"
# Why a call skips an upstream whose chat template refused its messages
# (`UpstreamTemplateRefused`).
TEMPLATE_REFUSED = "messages its chat template refuses"
# Why an upstream will not serve the call later either: a retry is not for it.
_NOT_SERVED_THERE = frozenset({LACKS_MODEL, TEMPLATE_REFUSED})
# The failures that say so (`_why_ruled_out`).
_NotServedThere = UpstreamLacksModel | UpstreamTemplateRefused


# An upstream timeout this close to the caller's deadline was the deadline's doing: both
# timers fire together, and whichever the loop runs first must not change the answer.
_DEADLINE_SLACK_S = 0.05


def upstream_idempotency_key(tenant: str, key: str) -> str:
    """The `Idempotency-Key` sent upstream: the caller's key scoped to its tenant.

    Every tenant reaches a provider with the gateway's one API key, so a provider that
    de-duplicates by this header would hand tenant B the answer to tenant A's request if
    both chose the same key. A hash of tenant and key keeps each tenant's retries
    de-duplicated and the tenants apart, and tells the provider neither.
    """
    return hashlib.sha256(f"{tenant}\0{key}".encode()).hexdigest()


def _tool_field(request: ChatRequest) -> str | None:
    """The first field of `request` that uses tools (`tools`, an assistant message's
    `tool_calls`, a tool result's `tool_call_id`), or None when none does."""
    if request.tools:
        return "tools"
    for i, message in enumerate(request.messages):
        if message.tool_calls:
            return f"messages[{i}].tool_calls"
        if message.role is Role.TOOL:
            return f"messages[{i}].tool_call_id"
    return None


def _hit_callers_deadline(exc: BaseException, deadline: Deadline) -> bool:
    """Whether `exc` is a timeout caused by the caller's deadline, not the upstream."""
    left = deadline.remaining_s()
    return isinstance(exc, UpstreamTimeout) and left is not None and left < _DEADLINE_SLACK_S


@dataclass(frozen=True, slots=True)
class LostAttempt:
    """An attempt the upstream most likely billed though its answer was never used."""

    upstream: str
    # Its span, whose metric attributes its tokens are recorded under.
    span: AttemptSpan | None
    # What it streamed before it was lost (a unary call read as a stream), else nothing.
    output: tuple[TextChunk, ...] = ()
    # The usage its stream reported before it was lost (`AttemptLog.usage`), if any.
    usage: Usage | None = None


@dataclass(slots=True)
class AttemptLog:
    """What the pool did for one call: filled in as it goes, read by the pipeline."""

    attempts: int = 0
    upstream: str = ""
    upstream_s: float = 0.0
    # Its waits in upstreams' limiters: the gateway's own queue, apart from `upstream_s`.
    queued_s: float = 0.0
    first_token_s: float | None = None
    retry_wait_s: float = 0.0
    # What each failed attempt failed with, as its caller is told it (`attempt_failure`).
    errors: list[str] = field(default_factory=list)
    records: list[AttemptRecord] = field(default_factory=list)
    # Whether the last attempt's request reached the upstream whole (`HttpPool.request`).
    is_sent: bool = False
    # The last attempt's HTTP status, once its answer began (`UpstreamClient`).
    status: int | None = None
    # Whether the caller (cancelled, or its deadline) cut the last attempt after it was sent
    # and before its answer: the upstream has the prompt, and may bill it.
    is_cut_after_sending: bool = False
    # Each attempt the gateway gave up on after the upstream most likely billed it
    # (`lose`), whatever came of the call: its answer was never used.
    lost: tuple[LostAttempt, ...] = ()
    # The last attempt's span: the pipeline records the call's tokens under its metric
    # attributes once it knows its usage, reported or estimated.
    span: AttemptSpan | None = None
    # What the last attempt generated so far, when a unary call is read as a stream
    # (`stream_unary_calls`): billed with its prompt should the attempt be cut.
    output: list[TextChunk] = field(default_factory=list)
    unfolded: int = 0  # chunks in `output` since it was last folded (`FOLDED_EVERY`)
    # The usage the last attempt's stream reported, once it ended: a stream cut after its
    # usage event (before `[DONE]`) is billed as reported, not estimated.
    usage: Usage | None = None
    # The call runs again one that failed after the pool's own tries (a Summarize part's
    # next try): every attempt of it is a retry to the retry budget, not a new request.
    is_rerun: bool = False

    def begin(self, upstream: str) -> None:
        """Another attempt starts, to `upstream`: nothing of it is sent or answered yet."""
        self.attempts += 1
        self.upstream = upstream
        self.is_sent = self.is_cut_after_sending = False
        self.status = None
        self.span = None
        self.output = []
        self.unfolded = 0
        self.usage = None

    def sent_nothing(self) -> bool:
        """Whether nothing of the call was sent yet: no attempt of it was begun. Asked by
        a caller that leaves a call it shares (the cache's single flight), in its own task,
        where the pool cannot mark its cancel (`mark_unsent`)."""
        return self.attempts == 0

    def reported(self, usage: Usage) -> None:
        """The last attempt's stream ended having reported `usage`."""
        self.usage = usage

    def streamed(self, chunk: TextChunk) -> None:
        """The last attempt, a unary call read as a stream, generated `chunk`."""
        self.output.append(chunk)
        self.unfolded += 1
        if self.unfolded == FOLDED_EVERY:
            fold_chunks(self.output, FOLDED_EVERY)
            self.unfolded = 0

    def sent(self) -> None:
        """The last attempt's request reached the upstream whole."""
        self.is_sent = True

    def answered(self, status: int) -> None:
        """The last attempt's answer began with `status`."""
        self.status = status

    @property
    def is_accepted(self) -> bool:
        """Whether the last attempt's answer came with a success status: the upstream
        took the call."""
        return self.status is not None and 200 <= self.status < 300

    @property
    def is_refused(self) -> bool:
        """Whether it came with an error status: the upstream refused the call, and bills
        nothing for it."""
        return self.status is not None and not self.is_accepted

    def cut(self) -> None:
        """The caller cut the last attempt: recorded only if its request had been sent, and
        not refused."""
        self.is_cut_after_sending = self.is_sent and not self.is_refused

    def lose(self, upstream: str, exc: UpstreamError) -> None:
        """The last attempt, to `upstream`, failed with `exc` before any of its answer was
        used: noted as lost when the upstream most likely billed it anyway.

        That is when it timed out (at the upstream's own `timeout_s`) after its request was
        sent whole, or when its answer failed after a success status (malformed, cut or
        reset): a provider sends that status for a call it took, and for a non-streamed
        answer only once it has generated all of it. An error status is not billed, even
        when its body times out, and a call refused or reset before any answer most likely
        never ran; nor is a success status whose answer is no OpenAI answer at all
        (`UpstreamNotOpenAI`: some other server, a login page, took the call).
        """
        timed_out = self.is_sent and not self.is_refused and isinstance(exc, UpstreamTimeout)
        if (self.is_accepted and not isinstance(exc, UpstreamNotOpenAI)) or timed_out:
            lost = LostAttempt(upstream, self.span, tuple(self.output), self.usage)
            self.lost = (*self.lost, lost)


def _mark_if_unsent(cancel: BaseException, log_: AttemptLog) -> None:
    """Mark `cancel`, which cut the call's first attempt before any byte of its request
    was written (`wrote_nothing`: connecting, or waiting for a connection), unsent
    (`mark_unsent`), as a cancel before any attempt was begun is."""
    if log_.attempts == 1 and wrote_nothing(cancel):
        mark_unsent(cancel)


@dataclass(slots=True)
class _Progress:
    """How one call's attempts went so far: the last failure and where it happened."""

    last_error: UpstreamError | None = None
    last_route: Route | None = None

    def failed(self, exc: UpstreamError, route: Route) -> None:
        """An attempt on `route` failed with `exc`, which becomes the last failure unless it
        is an upstream's lack of the model (or its chat template's refusal of the messages)
        after a failure time may mend (a 5xx): that one says why the call failed, and its
        upstream is where a retry goes, not the lack."""
        if isinstance(exc, _NotServedThere) and self.last_error is not None:
            return
        self.last_error, self.last_route = exc, route


@dataclass(frozen=True, slots=True)
class Route:
    """One upstream able to serve a model, the model's name there, and the breakers a call
    to it passes: the upstream's and that model's there."""

    client: UpstreamClient
    upstream_model: str
    breaker: RouteBreaker


class UpstreamState:
    """Everything the pool keeps about one upstream: breakers (its own and one per model it
    serves, by the model's name there), limiter, retry budget."""

    def __init__(
        self,
        client: UpstreamClient,
        settings: ResilienceConfig,
        clock: Clock,
        hooks: PoolHooks,
        shared_limits: SharedLimits | None = None,
        *,
        machine_turns: MachineTurns | None = None,
    ) -> None:
        self.client = client
        breaker_settings = BreakerSettings(
            consecutive_failures=settings.breaker_consecutive_failures,
            failure_ratio=settings.breaker_failure_ratio,
            min_calls=settings.breaker_min_calls,
            window_s=settings.breaker_window_s,
            cool_down_s=settings.breaker_cool_down_s,
            key_rejected_cool_down_s=settings.key_rejected_cool_down_s,
        )
        self._hooks = hooks
        self.breaker = CircuitBreaker(
            client.name, breaker_settings, clock=clock, on_change=self._breaker_changed
        )
        # Models come from the config, never from callers: their number stays bounded.
        self.model_breakers = {
            model: CircuitBreaker(
                client.name,
                breaker_settings,
                clock=clock,
                on_change=self._model_breaker_changed,
                model=model,
            )
            for model in dict.fromkeys(client.config.models.values())
        }
        self.key_watch = RejectedKeyWatch(client.name, clock)
        config = client.config
        # The longest a call waits for its limits (read here once, not at every attempt).
        self.max_limit_wait_s = config.limit_wait_s(settings.max_limit_wait_s)
        if shared_limits is not None and config.shared_limits:
            self.limiter = shared_limits.limiter(config, clock)
        elif machine_turns is not None:
            self.limiter = MachineTurnLimiter(
                client.name, machine_turns, max_concurrency=config.max_concurrency, clock=clock
            )
        else:
            self.limiter = UpstreamLimiter(
                client.name,
                max_concurrency=config.max_concurrency,
                requests_per_minute=config.requests_per_minute,
                tokens_per_minute=config.tokens_per_minute,
                clock=clock,
            )
        self.budget = RetryBudget(
            ratio=settings.retry_budget_ratio,
            window_s=settings.retry_budget_window_s,
            min_retries=settings.retry_budget_min_retries,
            clock=clock,
        )

    def _breaker_changed(self, change: BreakerChange) -> None:
        """The upstream's own breaker changed: told to the hooks. Open, it keeps every model
        off: a model's probe sent before it opened is overtaken, so that the upstream's
        next probe probes the model too rather than wait for an answer to older news."""
        if change.new is BreakerState.OPEN:
            for breaker in self.model_breakers.values():
                breaker.overtake_probe()
        self._hooks.breaker_changed(change)

    def _model_breaker_changed(self, change: BreakerChange) -> None:
        """A model's breaker changed: told to the hooks. Opened on fresh failures (it was
        closed) while another model's breaker here is failing too, it opens the upstream's
        own: two models down at once read as the upstream down for every model (a
        reseller whose backend is down answers 5xx for all), so its models not yet failed
        are kept off it too, not each sent its own run of failures. One model failing
        alone keeps that model off and no other."""
        self._hooks.breaker_changed(change)
        if change.old is not BreakerState.CLOSED or change.new is not BreakerState.OPEN:
            return
        if not self.breaker.is_closed:
            return
        failing = [name for name, breaker in self.model_breakers.items() if breaker.is_failing()]
        if len(failing) >= 2:
            self.breaker.trip(f"{len(failing)} models failing: {', '.join(failing)}")

    def route_breaker(self, upstream_model: str) -> RouteBreaker:
        """The breakers a call to `upstream_model` here passes."""
        return RouteBreaker(self.breaker, self.model_breakers[upstream_model])

    def reset_breakers(self, reason: str) -> None:
        """The upstream is known to be back (a restart answered): every breaker of it
        forgets its failures."""
        self.breaker.reset(reason)
        for breaker in self.model_breakers.values():
            breaker.reset(reason)

    def record_success(self, route: Route, *, probe: RouteProbe | None) -> None:
        """`route`'s model answered: tell its breakers (`probe` as `RouteBreaker.release`'s),
        and the key watch unless the upstream's breaker took the answer for older news
        than its opening (a call sent before the key was rejected, ending after)."""
        if route.breaker.record_success(probe=probe):
            self.key_watch.accepted()


class _WeightedRoundRobin:
    """Smooth weighted round-robin (nginx's): deterministic, and evenly interleaved."""

    def __init__(self, count: int) -> None:
        self._current = [0] * count

    def pick(self, weights: Sequence[int], allowed: Sequence[bool]) -> int:
        """The index of the next route among the allowed ones (0 when none is)."""
        candidates = [i for i, ok in enumerate(allowed) if ok]
        if not candidates:
            return 0
        total = sum(weights[i] for i in candidates)
        for i in candidates:
            self._current[i] += weights[i]
        best = max(candidates, key=lambda i: (self._current[i], -i))
        self._current[best] -= total
        return best


class _CallPlan:
    """The routes of one call in the order to try them, and those ruled out for it.

    `toolless`: upstreams that take no tools, left out of a call that uses them: never
    tried, but named among those ruled out.
    """

    def __init__(
        self, routes: Sequence[Route], first: int, *, toolless: Container[str] = ()
    ) -> None:
        self.order = [*routes[first:], *routes[:first]]
        self.excluded: dict[str, str] = {}  # upstream name -> why
        if toolless:
            self.excluded = {
                r.client.name: TAKES_NO_TOOLS for r in routes if r.client.name in toolless
            }
            self.order = [r for r in self.order if r.client.name not in toolless]

    def exclude(self, route: Route, why: str) -> None:
        self.excluded[route.client.name] = why

    def first_route(self) -> Route | None:
        """The first usable route: where the call's first attempt goes."""
        for route in self.order:  # `is_usable` written out: every call runs this
            if route.client.name not in self.excluded:
                breaker = route.breaker
                # Both closed: allowed, without a call.
                if (breaker.upstream.is_closed and breaker.model.is_closed) or breaker.allows():
                    return route
        return None

    def is_usable(self, route: Route) -> bool:
        """Whether `route` may take an attempt: not ruled out, and its breakers allow."""
        return route.client.name not in self.excluded and route.breaker.allows()

    def usable_routes(self, *, skipping: Container[str]) -> list[Route]:
        """The usable routes in the plan's order, but those whose upstream is in `skipping`."""
        return [r for r in self.order if r.client.name not in skipping and self.is_usable(r)]

    def route_after(self, after: Route) -> Route | None:
        """The first usable route after `after`, `after` itself last."""
        at = self.order.index(after)
        for route in self.order[at + 1 :] + self.order[: at + 1]:
            if self.is_usable(route):
                return route
        return None

    def route_to(self, upstream: str) -> Route | None:
        """The plan's route to `upstream`, if it has one."""
        return next((r for r in self.order if r.client.name == upstream), None)


def _why_ruled_out(exc: UpstreamError) -> str:
    """Why a failover-only error (`is_failover_only`) rules its upstream out of the call."""
    if isinstance(exc, UpstreamLacksModel):
        return LACKS_MODEL
    if isinstance(exc, UpstreamTemplateRefused):
        return TEMPLATE_REFUSED
    return "not an OpenAI server" if isinstance(exc, UpstreamNotOpenAI) else "key rejected"


def _is_circuit_open(why: str) -> bool:
    """Whether `why` a call skipped an upstream is an open breaker (its own or the model's)."""
    return why in (CIRCUIT_OPEN, MODEL_CIRCUIT_OPEN)


def _circuit_open(breaker: RouteBreaker) -> str:
    """Which open circuit keeps a call off `breaker`'s route: the upstream's own when it
    refuses (it keeps every model off), else the model's."""
    return CIRCUIT_OPEN if not breaker.upstream.allows() else MODEL_CIRCUIT_OPEN


def _restarting(plan: _CallPlan) -> str:
    """The upstreams `plan` left out as restarting (`ErrorInfo` `restarting`), by comma."""
    return ",".join(name for name, why in plan.excluded.items() if why == RESTARTING)


def _breaker_wait_s(breaker: CircuitBreaker) -> float | None:
    """Seconds until `breaker` lets a call through: an open one's cool-down, or while its
    probe runs, until that probe may be overtaken (it has answered by then, or hangs);
    None when it lets one now or nothing is known.

    Not the first backoff while a probe runs: a probe that hangs holds the breaker
    half-open up to its upstream's `timeout_s` (minutes), and callers told to come back
    after a backoff hammered the gateway all that while."""
    cool_down = breaker.retry_after_s()
    return cool_down if cool_down is not None else breaker.probe_due_s()


def _route_wait_s(breaker: RouteBreaker) -> float | None:
    """Seconds until both of a route's breakers let a call through (`_breaker_wait_s`):
    the later of the two; None when both let one now or nothing is known."""
    waits = [
        wait
        for wait in (_breaker_wait_s(breaker.upstream), _breaker_wait_s(breaker.model))
        if wait is not None
    ]
    return max(waits) if waits else None


def _sooner_limit(last_error: UpstreamError | None, exc: LimitExceeded) -> UpstreamError:
    """What a call skipping a route for the gateway's own limit (`exc`) ends with, should
    no attempt follow: an upstream's own failure, else the limit that frees first, so that
    the caller's RetryInfo is the shortest wait of the upstreams all at their limits. An
    upstream's lack of the model yields to the limit of one that may serve it.

    That refusal is replica-local when any of those limits is: another replica has its
    own slots (and in-memory buckets) for the upstream this one was full at.
    """
    if isinstance(last_error, LimitExceeded):
        is_sooner = (exc.retry_after_s or 0.0) < (last_error.retry_after_s or 0.0)
        sooner = exc if is_sooner else last_error
        sooner.is_replica_local = exc.is_replica_local or last_error.is_replica_local
        return sooner
    if isinstance(last_error, UpstreamLacksModel):
        return exc
    return last_error or exc


def _deadline_at_limit(refusal: LimitExceeded) -> DeadlineExceeded:
    """What a call none of whose attempts was begun ends with when its deadline ended its
    wait in line at `refusal`'s limit: the deadline's doing, not the limit's, which had not
    refused it (a wait it reckons longer than the deadline is refused, RESOURCE_EXHAUSTED
    with its wait). After a failed attempt the call ends with that failure instead, cut
    short by the deadline, as one whose back-off the deadline leaves no room for does."""
    return DeadlineExceeded(
        f"the caller's deadline passed while the call waited at upstream "
        f"{refusal.upstream!r}'s {refusal.what} limit",
        is_unsent=True,
    )


def _waited_on_upstream(log_: AttemptLog, seconds: float) -> None:
    """The call was held back `seconds` by an upstream (a retry's backoff or its
    Retry-After): upstream time, not the gateway's overhead."""
    if seconds > 0:
        log_.upstream_s += seconds
        telemetry().waited_on_upstream(seconds)


def _queued_for_upstream(log_: AttemptLog, seconds: float) -> None:
    """The call waited `seconds` in an upstream's limiter (its rate, its concurrency cap,
    a pause it asked for): the gateway's queue, so `queued_s`, not `upstream_s`; but on
    the upstream's account, so not the gateway's overhead either."""
    if seconds > 0:
        log_.queued_s += seconds
        telemetry().waited_on_upstream(seconds)


class UpstreamPool:
    """Routes each model to the upstreams that serve it, with retries and failover."""

    def __init__(
        self,
        clients: Sequence[UpstreamClient],
        *,
        settings: ResilienceConfig | None = None,
        clock: Clock = SYSTEM_CLOCK,
        rng: random.Random | None = None,
        hooks: PoolHooks | None = None,
        shared_limits: SharedLimits | None = None,
        machine_turns: Mapping[str, MachineTurns] | None = None,
    ) -> None:
        """`shared_limits`: the rates of the upstreams with `shared_limits: true`;
        `machine_turns`: by upstream name, the turn its calls take with the other processes
        of the machine (the local model's, under `--workers N`)."""
        self.clients = tuple(clients)
        self.settings = settings or ResilienceConfig()
        self.hooks = hooks or PoolHooks()
        self.counters = PoolCounters().attach(self.hooks)
        self._clock = clock
        self._rng = rng or random.Random()
        self._backoff = BackoffPolicy(
            base_s=self.settings.backoff_base_s,
            cap_s=self.settings.backoff_cap_s,
            max_retry_after_s=self.settings.max_retry_after_s,
        )
        self._states = {
            c.name: UpstreamState(
                c,
                self.settings,
                clock,
                self.hooks,
                shared_limits,
                machine_turns=(machine_turns or {}).get(c.name),
            )
            for c in clients
        }
        self._routes: dict[str, list[Route]] = {}
        for client in self.clients:
            state = self._states[client.name]
            for model, upstream_model in client.config.models.items():
                route = Route(client, upstream_model, state.route_breaker(upstream_model))
                self._routes.setdefault(model, []).append(route)
        self._balancers = {m: _WeightedRoundRobin(len(r)) for m, r in self._routes.items()}
        # The models some of whose upstreams take no tools, with those upstreams: a call to
        # any other model never looks at its tools (nor makes a Python call to decide).
        self.toolless: dict[str, frozenset[str]] = {}
        for model, routes in self._routes.items():
            toolless = frozenset(r.client.name for r in routes if not r.client.config.takes_tools)
            if toolless:
                self.toolless[model] = toolless
        # By (upstream, the model's name there): when an upstream found lacking that model
        # may be tried for it again (`_remember_lack`). Bounded: both come from the config.
        self._lacking: dict[tuple[str, str], float] = {}
        # Those the operator was told of (`pool.upstream_lacks_model`), once each.
        self._said_lacking: set[tuple[str, str]] = set()
        # Upstreams known to be down whatever their breakers say, with when a restart is
        # due to answer, if one is (`set_down`).
        self._down: dict[str, float | None] = {}
        # Set when the upstream is next known to be down: ends the retries' back-offs.
        self._went_down: dict[str, asyncio.Event] = {}
        # Set once the server stops (`begin_stopping`): no retry waits out a back-off.
        self.is_stopping = False
        # The back-offs under way, each resolved by `begin_stopping`.
        self._back_offs: set[asyncio.Future[None]] = set()

    @property
    def models(self) -> Mapping[str, Sequence[Route]]:
        """Every model served, with its routes in configured order."""
        return self._routes

    def routes(self, model: str) -> Sequence[Route]:
        """The routes for `model`; raises `ModelNotFound` when none serves it."""
        routes = self._routes.get(model)
        if not routes:
            raise ModelNotFound(model)
        return routes

    def state(self, upstream: str) -> UpstreamState:
        """The breaker, limiter and budget of one upstream, by name."""
        return self._states[upstream]

    def breaker(self, upstream: str, model: str) -> RouteBreaker:
        """The breakers a call to `model` on `upstream` passes; raises `ModelNotFound` when
        none serves it, `KeyError` when `upstream` does not."""
        return self._route(upstream, model).breaker

    def _route(self, upstream: str, model: str) -> Route:
        """The route to `model` on `upstream`; raises as `breaker` does."""
        for route in self.routes(model):
            if route.client.name == upstream:
                return route
        raise KeyError(upstream)

    def begin_stopping(self) -> None:
        """The server is stopping: no call waits at an upstream's limits from now on
        (`UpstreamLimiter.begin_stopping`), whatever kind of call it is, nor in a retry's
        back-off (`_back_off`)."""
        self.is_stopping = True
        for stopped in self._back_offs:
            if not stopped.done():
                stopped.set_result(None)
        for state in self._states.values():
            state.limiter.begin_stopping()

    def set_down(self, upstream: str, *, is_down: bool, retry_at: float | None = None) -> None:
        """Say whether `upstream` is known to be down (the local model's server, from its
        exit until a restart answers): its breaker, closed until calls fail, cannot tell.
        No call is sent to it meanwhile; `retry_at` (on this pool's clock): when its
        restart is due to answer, which the calls refused meanwhile are told to wait for."""
        if is_down:
            self._down[upstream] = retry_at
            went_down = self._went_down.pop(upstream, None)
            if went_down is not None:
                went_down.set()
        else:
            self._down.pop(upstream, None)

    def _why_down(self, upstream: str) -> str:
        return RESTARTING if self._down.get(upstream) is not None else "down"

    def health(self, upstream: str, model: str | None = None) -> tuple[BreakerState, int]:
        """An upstream's breaker state for `model` (its own breaker's and that model's
        there together; its own alone without one), open while it is known to be down, and
        calls in flight to it (for ListModels)."""
        state = self._states[upstream]
        if upstream in self._down:
            breaker = BreakerState.OPEN
        elif model is None:
            breaker = state.breaker.state
        else:
            route = self._route(upstream, model)
            # Passed over for the model (`_lacking_upstreams`), else as its breakers say.
            breaker = BreakerState.OPEN if self._is_lacking(route) else route.breaker.state
        return breaker, state.limiter.in_flight

    def toolless_upstreams(self, request: ChatRequest) -> frozenset[str]:
        """The upstreams of `request`'s model it must not go to: those that take no tools
        (`upstreams[].takes_tools: false`), when it uses tools; else none.

        Raises `ToolsUnsupported` when it uses tools and none of them takes any.
        """
        toolless = self.toolless.get(request.model)
        if toolless is None:  # every upstream of the model takes tools
            return frozenset()
        field = _tool_field(request)
        if field is None:
            return frozenset()
        if len(toolless) == len(self._routes[request.model]):
            raise ToolsUnsupported(request.model, field)
        return toolless

    def _plan(self, request: ChatRequest, tokens: int) -> _CallPlan:
        model = request.model
        routes = self._routes.get(model)  # `routes` written out: a frame on every call
        if not routes:
            raise ModelNotFound(model)
        toolless = self.toolless_upstreams(request) if model in self.toolless else ()
        down = self._down
        if len(routes) == 1:
            plan = _CallPlan(routes, 0)  # nothing to choose between
        elif self._lacking:
            lacking = self._lacking_upstreams(routes, skipping=toolless)
            skipping = lacking.union(toolless)
            first = self._first_route(model, routes, tokens, skipping=skipping)
            plan = _CallPlan(routes, first, toolless=toolless)
            for route in plan.order:
                if route.client.name in lacking:
                    plan.exclude(route, LACKS_MODEL)
        else:
            first = self._first_route(model, routes, tokens, skipping=toolless)
            plan = _CallPlan(routes, first, toolless=toolless)
        if down:
            for route in plan.order:
                if route.client.name in down:
                    # Sent nothing: whatever answers its old address now is not its server.
                    plan.exclude(route, self._why_down(route.client.name))
        return plan

    def _lacking_upstreams(
        self, routes: Sequence[Route], *, skipping: Container[str]
    ) -> frozenset[str]:
        """The upstreams of `routes` (but those in `skipping`) that a call passes over as
        found lacking the model lately (`_remember_lack`): none when every one of them is,
        so that the caller hears an upstream's own answer, as with a single one."""
        now = self._clock.now()
        lacking: set[str] = set()
        has_others = False
        for route in routes:
            name = route.client.name
            if name in skipping:
                continue
            key = (name, route.upstream_model)
            until = self._lacking.get(key)
            if until is not None and until <= now:
                del self._lacking[key]  # tried again: access granted, a deployment created
                until = None
            if until is None:
                has_others = True
            else:
                lacking.add(name)
        return frozenset(lacking) if has_others else frozenset()

    def _is_lacking(self, route: Route) -> bool:
        """Whether `route`'s upstream was found lacking its model lately (for ListModels)."""
        until = self._lacking.get((route.client.name, route.upstream_model))
        return until is not None and until > self._clock.now()

    def _remember_lack(self, route: Route) -> None:
        """`route`'s upstream answered that it has no such model: passed over for it for
        `LACKING_MODEL_MEMORY_S` while another may serve it (`_lacking_upstreams`), and
        the operator told the first time, since a config mistake is likely."""
        key = (route.client.name, route.upstream_model)
        self._lacking[key] = self._clock.now() + LACKING_MODEL_MEMORY_S
        if key not in self._said_lacking:
            self._said_lacking.add(key)
            log.warning(
                "pool.upstream_lacks_model",
                extra={
                    "upstream": route.client.name,
                    "upstream_model": route.upstream_model,
                    "passed_over_s": LACKING_MODEL_MEMORY_S,
                },
            )

    def _first_route(
        self, model: str, routes: Sequence[Route], tokens: int, *, skipping: Container[str]
    ) -> int:
        """The index of the route a call of `tokens` tries first: the weighted round-robin's
        pick among the usable routes (not in `skipping`) whose limiter starts it now; when
        none does, among those it would wait in least (most often one)."""
        states = [self._states[r.client.name] for r in routes]
        allowed = [
            (
                (r.breaker.upstream.is_closed and r.breaker.model.is_closed)  # without a call
                or r.breaker.allows()
            )
            and r.client.name not in self._down
            and r.client.name not in skipping
            for r in routes
        ]
        ready = [
            ok and state.limiter.starts_now(tokens)
            for ok, state in zip(allowed, states, strict=True)
        ]
        if not any(ready) and any(allowed):
            waits = [
                state.limiter.expected_wait_s(tokens) if ok else math.inf
                for ok, state in zip(allowed, states, strict=True)
            ]
            shortest = min(waits)
            ready = [wait == shortest for wait in waits]
        # A route left out of a pick keeps its turn: back in, it is picked as it was due.
        weights = [r.client.config.weight for r in routes]
        return self._balancers[model].pick(weights, ready)

    def _failover_route(
        self, plan: _CallPlan, after: Route, log_: AttemptLog, *, tokens: int
    ) -> Route | None:
        """Where a call of `tokens` goes after its attempt on `after` failed: among the usable
        routes it has not tried (not down), the first in the plan's order whose limiter
        starts it now, else the one it would wait in least; once it has tried every usable
        one, the next after `after`, a retry (`_prepare_attempt`)."""
        tried = {record.upstream for record in log_.records}
        untried = plan.usable_routes(skipping=tried.union(self._down))
        if len(untried) <= 1:
            # Nothing to choose between: an untried upstream, however busy, goes before
            # trying a failed one again.
            return untried[0] if untried else plan.route_after(after)
        limiters = [self._states[r.client.name].limiter for r in untried]
        for route, limiter in zip(untried, limiters, strict=True):
            if limiter.starts_now(tokens):
                return route
        waits = [limiter.expected_wait_s(tokens) for limiter in limiters]
        return untried[waits.index(min(waits))]

    def _call(
        self, request: ChatRequest, route: Route, *, stream: bool, headers: dict[str, str]
    ) -> UpstreamCall:
        # One idempotency key per call, reused on every attempt and every upstream.
        if request.idempotency_key:
            headers["Idempotency-Key"] = upstream_idempotency_key(
                request.tenant, request.idempotency_key
            )
        config = route.client.config
        return UpstreamCall(
            upstream_model=route.upstream_model,
            body=request_body(
                request,
                upstream_model=route.upstream_model,
                stream=stream,
                extra=config.extra_body,
                max_tokens_field=config.max_tokens_field,
                seed_field=config.seed_field,
                json_schema_format=config.json_schema_format,
                reasoning_field=config.reasoning_field,
                system_messages=config.system_messages,
            ),
            headers=headers,
        )

    @staticmethod
    def _attempt_span(
        request: ChatRequest,
        route: Route,
        log: AttemptLog,
        headers: dict[str, str],
        deadline: Deadline,
    ) -> contextlib.AbstractContextManager[AttemptSpan]:
        """The CLIENT span of this attempt; it puts `traceparent` into `headers`, and
        itself into `log`."""
        span = telemetry().upstream_attempt(
            request,
            upstream=route.client.name,
            base_url=route.client.config.base_url,
            upstream_model=route.upstream_model,
            attempt=log.attempts,
            headers=headers,
            retry_wait_s=log.retry_wait_s if log.attempts > 1 else None,
            is_callers_cut=functools.partial(_hit_callers_deadline, deadline=deadline),
        )
        log.span = span
        return span

    # -- the steps of one attempt, shared by `complete` and `stream` ----------------

    async def _prepare_attempt(
        self,
        plan: _CallPlan,
        route: Route,
        *,
        request: ChatRequest,
        tokens: int,
        deadline: Deadline,
        log_: AttemptLog,
        last_error: UpstreamError | None,
        last_route: Route | None,
    ) -> tuple[float, RouteProbe | None] | None:
        """Wait and pass breakers, budget and limiter; the attempt's timeout and, when it is
        a half-open breaker's probe, which (`RouteBreaker.claimed_probe`; else None); or
        None to skip.

        Raises the last error when the caller's deadline leaves no room for the attempt.
        """
        state = self._states[route.client.name]
        wait = 0.0
        decision: RetryDecision | None = None
        # Back to an upstream this call has tried (A, B, then A again): a retry, which
        # waits and is held to that upstream's retry budget. Failing over to one not tried
        # yet is neither: it is that upstream's first attempt at the call, load it would
        # have had anyway, so a dead upstream's calls are not refused by a healthy one's
        # budget.
        retrying = last_error is not None and any(
            r.upstream == route.client.name for r in log_.records
        )
        if last_error is not None and last_route is not None:
            if route.client.name in self._down:
                # Died under the call (the local model's server): refused at once, as the
                # calls arriving while it restarts are, not after a retry's back-off.
                plan.exclude(route, self._why_down(route.client.name))
                return None
            if retrying:
                if not state.budget.can_retry():
                    plan.exclude(route, "retry budget exhausted")
                    log.debug("pool.retry_budget_exhausted", extra={"upstream": state.client.name})
                    return None
                # The failed attempt's Retry-After is its upstream's, and only its own
                # retry honours it (an upstream's pause also holds its limiter).
                wait = backoff_s(
                    log_.attempts - 1,
                    retry_after_s=last_error.retry_after_s if last_route is route else None,
                    rng=self._rng,
                    policy=self._backoff,
                )
            left = deadline.remaining_s()
            if left is not None and wait + self.settings.min_attempt_s > left:
                # Never sleep into the caller's deadline: tell them now what went wrong.
                last_error.is_cut_short_by_deadline = True
                raise self._final(last_error, deadline, log_, plan)
            decision = RetryDecision(
                upstream=route.client.name,
                failed_upstream=last_route.client.name,
                attempt=log_.attempts + 1,
                wait_s=wait,
                reason=describe(last_error),
            )
            log_.retry_wait_s = wait
            if wait > 0:
                waited_from = self._clock.now()
                await self._back_off(last_route.client.name, wait, last_error)
                # On the failed upstream's account.
                _waited_on_upstream(log_, self._clock.now() - waited_from)
            if route.client.name in self._down:
                plan.exclude(route, self._why_down(route.client.name))
                return None
        left = deadline.remaining_s()
        if left is not None and left < self.settings.min_attempt_s:
            if last_error is not None:
                last_error.is_cut_short_by_deadline = True
                raise self._final(last_error, deadline, log_, plan)
            # Never sent when it is the first (a queued call's deadline, spent waiting its
            # turn at the upstreams' limits): its tenant's units for it go back.
            raise DeadlineExceeded(
                "the caller's deadline passed before the upstream call",
                is_unsent=log_.attempts == 0,
            )
        breaker = route.breaker
        probe: RouteProbe | None = None
        if not (breaker.upstream.is_closed and breaker.model.is_closed):  # closed: acquired
            if not breaker.acquire():
                plan.exclude(route, _circuit_open(breaker))
                return None
            probe = breaker.claimed_probe()
        longest_wait = state.max_limit_wait_s
        max_wait = longest_wait
        if left is not None:
            max_wait = min(max_wait, left - self.settings.min_attempt_s)
        acquiring = self._clock.now()
        try:
            # Ends with `ShuttingDown` as the server begins stopping, taking nothing.
            waited_s = await state.limiter.acquire(
                tokens=tokens, max_wait_s=max_wait, tenant=request.tenant
            )
        except BaseException as exc:
            breaker.release(probe)
            if isinstance(exc, LimitExceeded):
                # A wait that ran out (the call fails over, or is refused) was on the
                # upstream's account as much as one that got the slot.
                _queued_for_upstream(log_, self._clock.now() - acquiring)
                if max_wait < longest_wait:
                    if exc.is_waited_out and log_.attempts == 0:
                        raise _deadline_at_limit(exc) from None
                    exc.is_cut_short_by_deadline = True
            raise
        if waited_s > 0:  # most calls start at once
            _queued_for_upstream(log_, waited_s)
        if route.client.name in self._down:
            # Down since this call's plan (it died under the call, which backs off or waited
            # its turn): whatever answers its old address now is not its server.
            state.limiter.give_back(tokens)
            breaker.release(probe)
            plan.exclude(route, self._why_down(route.client.name))
            return None
        if probe is not None or not (breaker.upstream.is_closed and breaker.model.is_closed):
            # A half-open it was to probe may have ended while it waited (an older call's
            # failure opened the breaker again, freeing the slot: judged as any call), and a
            # breaker may have opened meanwhile (the failures of the calls ahead of it): kept
            # off the upstream as a call planned now would be, or its probe once half-open,
            # else the calls queued behind a dead upstream's slots all go on.
            is_admitted, probe = breaker.reclaim(probe)
            if not is_admitted:
                state.limiter.give_back(tokens)
                plan.exclude(route, _circuit_open(breaker))
                return None
        # A retry follows an attempt of this call on this upstream that was sent and
        # failed; a route skipped before any was sent (the gateway's own limits, an open
        # circuit) leaves this a first attempt. A rerun's attempts are all retries: held to
        # the budget, a failing upstream is not sent each part's tries times the pool's.
        if retrying or log_.is_rerun:
            if not state.budget.can_retry():  # other calls spent it while this one waited
                state.limiter.give_back(tokens)  # never sent: its units are not spent
                breaker.release(probe)
                plan.exclude(route, "retry budget exhausted")
                return None
            state.budget.record_retry()
        else:
            state.budget.record_request()
        if decision is not None:
            # Told once the retry (or failover) is certain to be sent: one its breaker,
            # limiter or budget still refused after the wait is no retry.
            self.hooks.retry(decision)
        return deadline.bound(route.client.config.timeout_s), probe

    def _after_failure(
        self,
        state: UpstreamState,
        route: Route,
        exc: UpstreamError,
        *,
        is_callers_cut: bool,
        is_sent: bool,
        probe: RouteProbe | None,
    ) -> None:
        """Tell the breakers and limiter what the failure says about the upstream or its
        model (`failure_scope`); `is_callers_cut`: the caller's deadline caused it;
        `is_sent`: the request reached the upstream whole."""
        breaker = route.breaker
        if isinstance(exc, UpstreamLacksModel):
            self._remember_lack(route)
        if isinstance(exc, UpstreamAuthRejected):
            state.key_watch.rejected(http_status=exc.status)
            breaker.record_key_rejected(probe=probe)
        elif is_callers_cut:
            # The caller's deadline, not the upstream's fault.
            breaker.release(probe)
        else:
            scope = failure_scope(exc, is_sent=is_sent)
            if scope is None:
                breaker.release(probe)
            else:
                breaker.record_failure(scope, reason=describe(exc), probe=probe)
        if exc.retry_after_s is not None:
            # A 429 or 503 with Retry-After: no call goes to this upstream until then. The
            # caller is told no longer a wait than the gateway itself keeps.
            exc.cap_retry_after(self.settings.max_retry_after_s)
            state.limiter.pause(exc.retry_after_s or 0.0)

    def _after_success(
        self,
        state: UpstreamState,
        route: Route,
        hints: RateLimitHints,
        *,
        probe: RouteProbe | None,
        is_breaker_told: bool = False,
    ) -> None:
        """Tell the breakers (unless a probe's first output already did) and the limiter."""
        if not is_breaker_told and route.breaker.record_success(probe=probe):
            # `UpstreamState.record_success` written out: every call's success comes here.
            state.key_watch.accepted()
        if hints.remaining is not None:  # without rate-limit headers there is nothing to learn
            state.limiter.learn(hints, now_epoch_s=time.time())

    def _record(
        self,
        log_: AttemptLog,
        route: Route,
        request: ChatRequest,
        *,
        started: float,
        is_stream: bool,
        error: BaseException | None,
        deltas_sent: int = 0,
        is_callers_cut: bool = False,
        waited_s: float | None = None,
    ) -> None:
        """Record one attempt; `waited_s`, a unary answer's wait on its upstream, is the
        call's upstream time rather than the whole attempt, which includes the gateway's
        own encoding and parsing."""
        duration = time.monotonic() - started
        log_.upstream_s += duration if waited_s is None else waited_s
        record = AttemptRecord(
            number=log_.attempts,
            upstream=route.client.name,
            model=request.model,
            is_stream=is_stream,
            started_at=started,
            duration_s=duration,
            error=None if error is None else describe(error),
            deltas_sent=deltas_sent,
            is_callers_cut=is_callers_cut,
        )
        log_.records.append(record)
        if error is not None:
            failure = attempt_failure(error, is_callers_cut=is_callers_cut)
            log_.errors.append(f"{route.client.name}: {failure}")
        # Every subscriber told, here: a frame less on every attempt than a method of
        # `PoolHooks` doing it.
        for hook in self.hooks.on_attempt:
            try:
                hook(record)
            except Exception:  # a broken subscriber never fails a caller's request
                log.exception("pool.hook_failed")

    def _give_up(self, model: str, plan: _CallPlan, last_error: UpstreamError | None) -> Exception:
        """The error to raise when no attempt is left: the last failure, or why none ran."""
        if isinstance(last_error, _NotServedThere):
            if not self._kept_off_serving(plan):
                # Every upstream tried lacks the model (or refuses the messages): a
                # refusal, as from a single one.
                return last_error
            # One that may serve it is only kept off for now (its breaker, a restart):
            # the caller's retry may reach it, as after any call none of whose
            # upstreams could take it.
            last_error = None
        if last_error is not None:
            open_routes = [r for r in plan.order if not self._is_set_aside_for_key(r)]
            if open_routes:
                # Another upstream failed in a way time mends (a 5xx, its own limits, an
                # open breaker): the caller's retry can reach it, once it may.
                last_error.is_retry_futile = False
                # The retry goes to whichever upstream lets it through first, not
                # necessarily the one that failed last (its breaker may have just opened);
                # one left out of this call (its limits, its retry budget) says not when.
                usable = [r for r in open_routes if r.client.name not in plan.excluded]
                candidates = usable or open_routes
                last_error.suggest_retry_after(min(map(self._retry_delay_s, candidates)))
                # Nor sooner than one of them lets a call through: an upstream's Retry-After
                # shorter than the cool-down its failure opened sent the retry into the
                # gateway's own refusal ("circuit open").
                last_error.defer_retry_after(min(map(self._shut_for_s, candidates)))
                last_error.shut_for_s = self._every_shut_for_s(open_routes)
            last_error.restarting = _restarting(plan)
            return last_error
        why_left_out = dict(plan.excluded)
        for route in plan.order:  # no attempt ran: its breaker turned each of these away
            why = self._why_breaker_refuses(route)
            if why is not None:
                why_left_out.setdefault(route.client.name, why)
        reasons = ", ".join(f"{name} ({why})" for name, why in sorted(why_left_out.items()))
        names = ",".join(r.client.name for r in plan.order)
        set_aside = {r.client.name for r in plan.order if self._is_set_aside_for_key(r)}
        if len(set_aside) == len(plan.order):
            # Each is set aside for rejecting the key (or account) on an earlier call:
            # the same as the call that found it, and as futile to retry.
            return UpstreamAuthRejected(
                f"every upstream serving model {model!r} rejected the gateway's key or "
                "account; an operator must mend it",
                upstream=names,
            )
        # The caller's retry is for the others: a rejected key's cool-down is not its wait;
        # one whose probe is running says when by that probe (`_breaker_wait_s`). One whose
        # breaker opened as the call waited its turn there (left out as `circuit open`) says
        # when by its cool-down, as one found open does: left out, every upstream was, and
        # the caller was told the first backoff while each stayed open for its cool-down.
        retry_delays = [
            self._retry_delay_s(r)
            for r in plan.order
            if _is_circuit_open(plan.excluded.get(r.client.name, CIRCUIT_OPEN))
            and r.client.name not in set_aside
        ]
        error = UpstreamUnavailable(
            f"no upstream for model {model!r} is available" + (f": {reasons}" if reasons else ""),
            upstream=names,
            retry_after_s=min(retry_delays) if retry_delays else None,
        )
        error.restarting = _restarting(plan)
        error.shut_for_s = self._every_shut_for_s(
            [r for r in plan.order if r.client.name not in set_aside]
        )
        return error

    def _kept_off_serving(self, plan: _CallPlan) -> bool:
        """Whether an upstream of `plan` not known to lack the model (or to refuse the
        messages) was kept off the call (ruled out, or its breaker refusing calls): one
        that may serve it later."""
        for route in plan.order:
            why = plan.excluded.get(route.client.name) or self._why_breaker_refuses(route)
            if why is not None and why not in _NOT_SERVED_THERE:
                return True
        return False

    def _every_shut_for_s(self, routes: Sequence[Route]) -> float | None:
        """Seconds until the first of `routes` takes a call again, when none takes one
        now (each open, probing or restarting: `_shut_for_s`); None when one does, or for
        an upstream kept off for another reason (down with no restart due, its limits)."""
        shut_s = min(map(self._shut_for_s, routes), default=0.0)
        return shut_s if shut_s > 0 else None

    def _why_breaker_refuses(self, route: Route) -> str | None:
        """Why `route`'s breakers let no call through now (the upstream's own first);
        None when they let one."""
        breaker = route.breaker.upstream
        if breaker.allows():
            breaker = route.breaker.model
            if breaker.allows():
                return None
            if breaker.state is BreakerState.OPEN:
                return MODEL_CIRCUIT_OPEN
            return "circuit half-open for this model, its probe running"
        if breaker.is_key_rejected:
            return "rejected the gateway's key"
        if breaker.state is BreakerState.OPEN:
            return CIRCUIT_OPEN
        return "circuit half-open, its probe running"

    async def _back_off(self, upstream: str, wait_s: float, last_error: UpstreamError) -> None:
        """Wait `wait_s` before a retry after `upstream` failed with `last_error`, or until
        `upstream` is known to be down: the local model's server that dies under a call is
        most often seen to exit just after the call saw its connection drop.

        Raises:
            ShuttingDown: the server is stopping, or began to as the call waited: the retry
                would be sent into the drain (or cut at its end), where another replica
                may take the call at once; nothing more of it was sent.
        """
        if self.is_stopping:
            raise ShuttingDown(last_error=last_error)
        went_down = self._went_down.setdefault(upstream, asyncio.Event())
        stopped = asyncio.get_running_loop().create_future()
        self._back_offs.add(stopped)
        sleeping = asyncio.ensure_future(self._clock.sleep(wait_s))
        watching = asyncio.ensure_future(went_down.wait())
        try:
            await asyncio.wait((sleeping, watching, stopped), return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._back_offs.discard(stopped)
            stopped.cancel()
            sleeping.cancel()
            watching.cancel()
            await asyncio.gather(sleeping, watching, return_exceptions=True)
        if self.is_stopping:
            raise ShuttingDown(last_error=last_error)

    def _is_set_aside_for_key(self, route: Route) -> bool:
        """Whether `route`'s breaker is open for a rejected key: once its cool-down has
        passed, a probe may find the key mended."""
        breaker = route.breaker.upstream
        return breaker.is_key_rejected and breaker.retry_after_s() is not None

    def _final(
        self, exc: UpstreamError, deadline: Deadline, log_: AttemptLog, plan: _CallPlan
    ) -> GatewayError:
        """What the call of `plan` ends with: `exc` with its attempts (and what each failed
        with) and, when it is UNAVAILABLE or a 429, a retry delay; or `DeadlineExceeded`
        when the caller's deadline caused it. With no attempt begun, it says so
        (`is_unsent`)."""
        exc.attempts = log_.attempts
        exc.attempt_failures = tuple(log_.errors)
        exc.is_unsent = log_.attempts == 0
        # Not a stream's timeout after its text (`StreamInterrupted`): only the upstream's
        # own bounds apply then, and a shared stream's followers outlive its first caller.
        if _hit_callers_deadline(exc, deadline):
            passed = DeadlineExceeded("the caller's deadline passed", is_unsent=exc.is_unsent)
            passed.attempt_failures = exc.attempt_failures  # the earlier ones' too
            return passed
        if isinstance(exc, UpstreamUnavailable | UpstreamTimeout | UpstreamRateLimited):
            route = plan.route_to(exc.upstream)
            delay_s = self.settings.backoff_base_s if route is None else self._retry_delay_s(route)
            exc.suggest_retry_after(delay_s)
        return exc

    def _held_off_s(self, route: Route) -> tuple[float | None, float | None]:
        """Seconds until `route`'s breakers let a call through (`_route_wait_s`), and until
        its upstream's restart is due to answer while it is down for one; None for either
        that does not hold it off."""
        cool_down = _route_wait_s(route.breaker)
        retry_at = self._down.get(route.client.name)
        return cool_down, None if retry_at is None else retry_at - self._clock.now()

    def _shut_for_s(self, route: Route) -> float:
        """Seconds until `route` may take a call again: its breakers' cool-down, its
        upstream's restart while it is down for one; 0 when it may now."""
        cool_down, restart_s = self._held_off_s(route)
        return max(cool_down or 0.0, restart_s or 0.0)

    def _retry_delay_s(self, route: Route) -> float:
        """When a caller may try again after the gateway's own retries failed, if the
        upstream did not say: once `route`'s breakers let a probe through (or, while a probe
        runs, once that has answered or another may go), else the first backoff; and not
        before its upstream's restart is due to answer, while it is down for one."""
        cool_down, restart_s = self._held_off_s(route)
        delay_s = cool_down if cool_down is not None else self.settings.backoff_base_s
        return delay_s if restart_s is None else max(delay_s, restart_s)

    async def _next_attempt(
        self,
        plan: _CallPlan,
        request: ChatRequest,
        deadline: Deadline,
        log: AttemptLog,
        progress: _Progress,
        *,
        tokens: int,
    ) -> tuple[Route, float, RouteProbe | None] | None:
        """The next route to try, its timeout and the breakers whose probe it is (None:
        neither's), once waits and admission passed.

        None when the attempts or the routes are used up; raises when the caller's
        deadline leaves no room for another attempt.
        """
        while log.attempts < self.settings.attempts:
            after = progress.last_route
            if after is None:
                route = plan.first_route()
            else:
                route = self._failover_route(plan, after, log, tokens=tokens)
            if route is None:
                return None
            try:
                admitted = await self._prepare_attempt(
                    plan,
                    route,
                    request=request,
                    tokens=tokens,
                    deadline=deadline,
                    log_=log,
                    last_error=progress.last_error,
                    last_route=progress.last_route,
                )
            except LimitExceeded as exc:
                plan.exclude(route, exc.what + " limit")
                progress.last_error = _sooner_limit(progress.last_error, exc)
                continue
            except ShuttingDown as exc:  # refused at its limits or its back-off by the drain
                exc.is_unsent = log.attempts == 0
                exc.attempt_failures = tuple(log.errors)
                raise
            except UpstreamError as exc:
                raise self._final(exc, deadline, log, plan) from None
            except asyncio.CancelledError as cancel:  # the caller left as the call waited
                if log.attempts == 0:  # at its limits, a breaker, a restart: none was sent
                    mark_unsent(cancel)
                raise
            if admitted is None:
                continue
            log.begin(route.client.name)
            return route, *admitted
        return None

    # -- the two call shapes ---------------------------------------------------------

    async def complete(
        self, request: ChatRequest, *, prompt_tokens: int, deadline: Deadline, log: AttemptLog
    ) -> UpstreamReply:
        """Send a unary completion, retrying and failing over as the policy allows.

        `prompt_tokens`: the prompt's estimate as its tenant's calibration counts it
        (never below the plain one), for the upstreams' token limits. A wait at an
        upstream's limits, or in a retry's back-off, as the server begins stopping ends
        the call with `ShuttingDown` (`begin_stopping`), the wait given up and nothing
        more taken or sent.
        """
        # What one attempt takes from the upstream's tokens-per-minute limit.
        tokens = prompt_tokens + (request.params.max_tokens or _DEFAULT_MAX_TOKENS)
        plan = self._plan(request, tokens)
        progress = _Progress()
        while attempt := await self._next_attempt(
            plan, request, deadline, log, progress, tokens=tokens
        ):
            route, timeout_s, probe = attempt
            state = self._states[route.client.name]
            started = time.monotonic()
            record = functools.partial(
                self._record, log, route, request, started=started, is_stream=False
            )
            headers: dict[str, str] = {}
            try:
                with self._attempt_span(request, route, log, headers, deadline) as span:
                    # Sent as a stream to an upstream that stops generating only when
                    # a stream's connection closes; the client reads it whole.
                    is_streamed = route.client.config.stream_unary_calls
                    reply = await route.client.complete(
                        self._call(request, route, stream=is_streamed, headers=headers),
                        timeout_s=timeout_s,
                        on_sent=log.sent,
                        on_status=log.answered,
                        on_output=log.streamed,
                        on_usage=log.reported,
                    )
                    span.finish(
                        response_id=reply.id,
                        response_model=reply.model,
                        finish_reason=str(reply.finish_reason),
                        usage=reply.usage,
                        content=reply.content,
                        tool_calls=reply.tool_calls,
                        waited_s=reply.waited_s,
                    )
            except UpstreamError as exc:
                is_callers_cut = _hit_callers_deadline(exc, deadline)
                if is_callers_cut:
                    log.cut()
                else:
                    log.lose(route.client.name, exc)
                self._after_failure(
                    state,
                    route,
                    exc,
                    is_callers_cut=is_callers_cut,
                    is_sent=log.is_sent,
                    probe=probe,
                )
                record(error=exc, is_callers_cut=is_callers_cut)
                if is_failover_only(exc):
                    plan.exclude(route, _why_ruled_out(exc))
                elif not is_retryable(exc) or deadline.has_expired:
                    raise self._final(exc, deadline, log, plan) from None
                progress.failed(exc, route)
                continue
            except BaseException as exc:  # cancelled: the caller went away
                log.cut()
                route.breaker.release(probe)
                record(error=exc, is_callers_cut=not isinstance(exc, Exception))
                _mark_if_unsent(exc, log)
                raise
            finally:
                state.limiter.release()
            self._after_success(state, route, reply.rate_limits, probe=probe)
            record(error=None, waited_s=reply.waited_s)
            return reply
        error = self._give_up(request.model, plan, progress.last_error)
        if isinstance(error, UpstreamError):
            raise self._final(error, deadline, log, plan)
        raise error

    async def stream(
        self, request: ChatRequest, *, prompt_tokens: int, deadline: Deadline, log: AttemptLog
    ) -> AsyncIterator[StreamEvent]:
        """Stream a completion; retried and failed over only until the first delta is sent.

        Once a delta has reached the caller a failure ends the stream with
        `StreamInterrupted` (UNAVAILABLE; RESOURCE_EXHAUSTED for a rate limit the upstream
        reported mid-stream), saying how many deltas were sent.
        """
        call_started = time.monotonic()
        # What one attempt takes from the upstream's tokens-per-minute limit.
        tokens = prompt_tokens + (request.params.max_tokens or _DEFAULT_MAX_TOKENS)
        plan = self._plan(request, tokens)
        progress = _Progress()
        while attempt := await self._next_attempt(
            plan, request, deadline, log, progress, tokens=tokens
        ):
            route, timeout_s, probe = attempt
            state = self._states[route.client.name]
            started = time.monotonic()
            deltas_sent = 0
            sent = StreamTally()  # counted by the client, which bounds it
            is_finished = is_breaker_told = False
            headers: dict[str, str] = {}
            try:
                with self._attempt_span(request, route, log, headers, deadline) as span:
                    # The client's stream is an async generator: close it on every exit path.
                    events = route.client.stream(
                        self._call(request, route, stream=True, headers=headers),
                        timeout_s=timeout_s,
                        on_sent=log.sent,
                        on_status=log.answered,
                        tally=sent,
                        on_usage=log.reported,
                    )
                    async with contextlib.aclosing(events):
                        async for event in events:
                            if isinstance(event, TextChunk):
                                if probe is not None:
                                    # A probe streaming its answer has shown the upstream
                                    # back: a long stream (a reasoning model's, minutes)
                                    # must not hold off every other call till its end.
                                    state.record_success(route, probe=probe)
                                    probe, is_breaker_told = None, True
                                if log.first_token_s is None:
                                    # From the start of the call: retries delay the first token.
                                    log.first_token_s = time.monotonic() - call_started
                                deltas_sent += 1
                                span.chunk(event.content, event.tool_calls)
                            elif isinstance(event, StreamEnd):
                                is_finished = True
                                span.finish(
                                    response_id=event.id,
                                    response_model=event.model,
                                    finish_reason=str(event.finish_reason),
                                    usage=event.usage,
                                )
                                self._after_success(
                                    state,
                                    route,
                                    event.rate_limits,
                                    probe=probe,
                                    is_breaker_told=is_breaker_told,
                                )
                                self._record(
                                    log,
                                    route,
                                    request,
                                    started=started,
                                    is_stream=True,
                                    error=None,
                                    deltas_sent=deltas_sent,
                                )
                            yield event
                return
            except UpstreamError as exc:
                # Once text flows the caller's deadline bounds no read of the stream (a
                # shared one outlives its first caller's): a timeout then is the upstream's.
                is_callers_cut = deltas_sent == 0 and _hit_callers_deadline(exc, deadline)
                if is_callers_cut:
                    log.cut()
                elif deltas_sent == 0:  # after text, the pipeline records the cut stream
                    log.lose(route.client.name, exc)
                self._after_failure(
                    state,
                    route,
                    exc,
                    is_callers_cut=is_callers_cut,
                    is_sent=log.is_sent,
                    probe=probe,
                )
                self._record(
                    log,
                    route,
                    request,
                    started=started,
                    is_stream=True,
                    error=exc,
                    deltas_sent=deltas_sent,
                    is_callers_cut=is_callers_cut,
                )
                if deltas_sent > 0:
                    # The caller already has part of the answer: a retry would repeat it.
                    interrupted = stream_interrupted(
                        exc, deltas_sent=deltas_sent, chars_sent=sent.chars
                    )
                    interrupted.__cause__ = exc
                    raise self._final(interrupted, deadline, log, plan) from exc
                if is_failover_only(exc):
                    plan.exclude(route, _why_ruled_out(exc))
                elif not is_retryable(exc) or deadline.has_expired:
                    raise self._final(exc, deadline, log, plan) from None
                progress.failed(exc, route)
                continue
            except BaseException as exc:  # cancelled, or the consumer stopped reading
                _mark_if_unsent(exc, log)
                route.breaker.release(probe)
                if not is_finished:
                    log.cut()
                    self._record(
                        log,
                        route,
                        request,
                        started=started,
                        is_stream=True,
                        error=exc,
                        deltas_sent=deltas_sent,
                        is_callers_cut=not isinstance(exc, Exception),
                    )
                raise
            finally:
                state.limiter.release()
        error = self._give_up(request.model, plan, progress.last_error)
        if isinstance(error, UpstreamError):
            raise self._final(error, deadline, log, plan)
        raise error


__all__ = ["AttemptLog", "LostAttempt", "Route", "UpstreamPool", "UpstreamState"]
