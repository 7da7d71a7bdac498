"""The request pipeline: validate → fit the context window → route → price.

Knows neither Protobuf nor HTTP: it takes a `ChatRequest` and returns a `Completion`
(or, for streams, `Delta`s then a `Completion`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import math
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast

from service.budgets import CALLS_IN_FLIGHT_RETRY_S, BudgetHold, Budgets, HeldByCallsInFlight
from service.calibration import TokenCalibration
from service.clock import Deadline
from service.config import GatewayConfig, RequestDefaults
from service.context_window import (
    answer_reserve,
    default_answer_room_advice,
    fit_messages,
    holds_prompt_and_answer,
    max_tokens_refused_advice,
    prompt_in_count_with_answer,
)
from service.domain import (
    FOLDED_EVERY,
    CacheMode,
    ChatRequest,
    Completion,
    Delta,
    FinishReason,
    Timings,
    ToolCall,
    Usage,
    assemble_tool_calls,
)
from service.errors import (
    GatewayError,
    InvalidRequest,
    ModelNotFound,
    ShuttingDown,
    UpstreamContextExceeded,
    ended_unsent,
    mark_unsent,
)
from service.ledger import Ledger, MemoryLedger, UsageEntry
from service.limits import LimitExceeded
from service.memo import BoundedMemo
from service.pool import AttemptLog, UpstreamPool
from service.pricing import PriceList
from service.telemetry import active as telemetry
from service.tokens import estimate_output_tokens
from service.upstream.types import StreamEnd, StreamEvent, TextChunk, fold_chunks, joined_chunks
from service.validation import chat_request_violations

if TYPE_CHECKING:  # only annotated here; the server builds the cache and passes it in
    from service.cache import ResponseCache

_MS = 1000.0
_DEFAULT_CONTEXT_WINDOW = 8192

RepeatKey = tuple[str, bytes]
"""A caller's tenant and the exact bytes of its request message (deterministic encoding),
made only for messages up to REPEATABLE_MAX_BYTES."""
# Requests remembered for `Pipeline.repeat`: at most this many, each at most this long.
REPEATABLE_REQUESTS = 256
REPEATABLE_MAX_BYTES = 16 * 1024
# Between a call's turns in its upstream's line (`complete_in_turn`): a limit that refuses
# at once (`max_limit_wait_s: 0`) must not have it spin. (A budget held by calls in flight
# is waited for until one of them ends: `Pipeline._next_turn`.)
_REQUEUE_PAUSE_S = 0.1


# A wait at an upstream's limits at least this long, its length known, is waited out of
# a paced call's turn (`complete_in_turn`): a shorter one would hand the slot back and
# take it again (a script each on Redis) for about as long as the wait.
_OUT_OF_TURN_S = 1.0


class TakenTurn(Protocol):
    """What a batch item's or a Summarize part's turn took of its tenant's limits
    (`BatchPacer.turn`)."""

    async def give_back_rate(self) -> None:
        """Give back the per-minute units the turn took, for a call never sent."""
        ...


class Pace(Protocol):
    """Takes one upstream call's turn under its tenant's limits (`BatchPacer.turn`)."""

    def __call__(
        self, tokens: int, deadline: Deadline, *, requests: int = 1
    ) -> contextlib.AbstractAsyncContextManager[TakenTurn]: ...


# One try's turn of a batch item or a Summarize part, given whether an earlier try of it
# was sent (its per-minute units spent).
Turn = Callable[[bool], contextlib.AbstractAsyncContextManager[TakenTurn | None]]


def unpaced(was_sent: bool) -> contextlib.AbstractAsyncContextManager[TakenTurn | None]:
    """The turn of a call its tenant's limits do not pace: nothing to take."""
    return contextlib.nullcontext()


def paced(pace: Pace, tokens: int, deadline: Deadline, *, requests: int = 1) -> Turn:
    """A call's turns under `pace`: its first (or every one while none of its tries was
    sent) takes its `requests` and `tokens`, a later one only a call slot."""

    def turn(was_sent: bool) -> contextlib.AbstractAsyncContextManager[TakenTurn | None]:
        if was_sent:
            return pace(0, deadline, requests=0)
        return pace(tokens, deadline, requests=requests)

    return turn


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """A request validated and fitted to its model's window, its prompt estimated once."""

    request: ChatRequest
    dropped: int  # messages the truncation dropped
    prompt_tokens: int  # the estimate of the messages sent (before calibration)
    calibration: float  # its tenant's calibration factor for its model, fitted with
    asked: ChatRequest  # the request before fitting, to fit it again


@dataclass(slots=True)
class _Owed:
    """An answer the upstream gave for a caller, until the caller records it.

    With the cache the upstream call runs in a shared flight's task, and its caller may
    leave after the answer came but before it was handed the answer (still relaying the
    deltas of a stream the upstream finished): the caller then records it on its way out.
    """

    completion: Completion | None = None


@dataclass(frozen=True, slots=True)
class _Output:
    """What an upstream generated for one call (all of it, or what a cut stream sent)."""

    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    reasoning: str = ""


def _short_prompt_advice(estimated_tokens: int, window: int, max_tokens: int | None) -> str:
    """What to tell a caller whose prompt an upstream refused as over the window, saying
    no count, when the prompt is too short to be (`_learn_uncounted_refusal`)."""
    prompt = f"the prompt ({estimated_tokens} tokens by the gateway's estimate"
    if max_tokens is None:
        return f"{prompt}) is far inside the model's window of {window}: the upstream's is smaller"
    return (
        f"its window holds {prompt}, far inside the model's {window}) but not the max_tokens "
        f"asked with it ({max_tokens}): lower max_tokens"
    )


def _past_the_factor_advice(refusal: UpstreamContextExceeded, window: int) -> str:
    """What to tell a caller whose prompt an upstream refused with a count past what the
    calibration can follow (`TokenCalibration.refused_as_too_long`): fitted again, under
    KEEP_RECENT too, it would be sent over the upstream's count again."""
    why = "the upstream counts it at more than the gateway's fitting can make up for"
    limit = refusal.window_tokens
    if limit is not None and limit < window:
        what = "limit on the prompt" if refusal.is_input_limit else "window"
        why = (
            f"the upstream's {what} ({limit} tokens) is far smaller than the model's window "
            f"in the gateway's catalog ({window}), more than its fitting can make up for"
        )
    return f"shorten it: {why}, and TRUNCATION_MODE_KEEP_RECENT would send it over again"


def _believed(reported: Usage, output: _Output) -> Usage:
    """`reported`, flagged estimated where a count of 0 cannot be true, so that it is
    estimated as a count left out is: a prompt is never read in 0 tokens (every call sends
    one, in a chat template), nor is any output written in 0. A 0 for no output stands."""
    has_output = bool(output.content or output.tool_calls or output.reasoning)
    if reported.input_tokens and (reported.output_tokens or not has_output):
        return reported
    return dataclasses.replace(reported, is_estimated=True)


def _relayed_output(chunks: Sequence[TextChunk]) -> _Output:
    """What a stream relayed, its tool calls assembled from their pieces."""
    whole = joined_chunks(chunks)
    return _Output(whole.content, assemble_tool_calls(whole.tool_calls), whole.reasoning)


@dataclass(frozen=True, slots=True)
class _Repeatable:
    """A prepared request the cache reads, as `Pipeline.repeat` finds it again."""

    prepared: PreparedRequest
    store_key: str


class Pipeline:
    """Runs chat completions through the gateway's policies to an upstream."""

    def __init__(
        self,
        config: GatewayConfig,
        pool: UpstreamPool,
        prices: PriceList,
        *,
        ledger: Ledger | None = None,
        wall_clock: Callable[[], float] = time.time,
        cache: ResponseCache | None = None,
        on_answered: Callable[[], None] = lambda: None,
    ) -> None:
        """`on_answered` is called, in the caller's task, once a call has its answer:
        a stopping server lets such calls finish (`Admission.answered`)."""
        self._cache = cache
        self._on_answered = on_answered
        self._config = config
        self._pool = pool
        # The models the pool serves (its routes by model, made with it and never changed).
        self._served = pool.models
        self._prices = prices
        self.calibration = TokenCalibration()
        self.ledger: Ledger = ledger if ledger is not None else MemoryLedger(config.ledger)
        self._budgets = Budgets(
            config.budgets, ledger=self.ledger, prices=prices, wall_clock=wall_clock
        )
        self._repeatable: BoundedMemo[RepeatKey, _Repeatable] = BoundedMemo(REPEATABLE_REQUESTS)
        # Whether `repeat` can ever answer: a cache that can recall its recent reads.
        self.takes_repeats = cache is not None and cache.recalls
        # Set once the server stops: a batch or a summary starts no new upstream call.
        self.is_stopping = False
        # The waits for a turn (`in_turn`, and `complete_in_turn`'s pause between turns at
        # an upstream's limits) that `begin_stopping` ends.
        self._turn_waits: set[asyncio.Timeout] = set()

    def begin_stopping(self) -> None:
        """The server is stopping: no batch item or Summarize part starts from now on, and
        those waiting for their turn (`in_turn`, `complete_in_turn`) stop waiting; so does
        every call waiting at its upstream's limits or in a retry's back-off, a plain
        `Complete` or stream as much as an item or a part (`UpstreamPool.begin_stopping`)."""
        self.is_stopping = True
        now = asyncio.get_running_loop().time()
        for wait in self._turn_waits:
            wait.reschedule(now)
        self._pool.begin_stopping()

    @contextlib.asynccontextmanager
    async def _ended_by_drain(
        self, *, last_error: GatewayError | None = None, is_unsent: bool = False
    ) -> AsyncIterator[None]:
        """The body, a wait of a call the gateway queued itself, ended with `ShuttingDown`
        (naming `last_error`, the failure it waited to try again after; `is_unsent`: no
        try of the call was begun) as the server begins stopping; at its first pause when
        it already has, so that a body that need not wait still goes on."""
        try:
            async with asyncio.timeout(None) as wait:
                if self.is_stopping:
                    wait.reschedule(asyncio.get_running_loop().time())
                self._turn_waits.add(wait)
                try:
                    yield
                finally:
                    self._turn_waits.discard(wait)
        except TimeoutError:
            if wait.expired():
                raise ShuttingDown(last_error=last_error, is_unsent=is_unsent) from None
            raise

    @contextlib.asynccontextmanager
    async def in_turn(
        self, turn: contextlib.AbstractAsyncContextManager[TakenTurn | None]
    ) -> AsyncIterator[None]:
        """`turn` (a batch item's or a Summarize part's, under its tenant's limits) held
        for the body: the item's or the part's upstream call. One refused before any try
        of it was sent (its tenant's budget; its upstreams' limits, open breakers) gives
        the turn's per-minute units back (`GatewayError.is_unsent`), as a plain call does,
        and so does one cancelled (its caller, its deadline, its Summarize's failed part)
        while it waited so (a cancel marked unsent: `ended_unsent`).

        Raises:
            ShuttingDown: the server began stopping before the turn came. Its wait is
                given up, having taken none of the tenant's limits: it can last a minute,
                which would hold the call open past the items or parts running, to the
                end of the grace, and take the tenant's rate for a call never made. A
                turn that came as the server began stopping goes back whole: its slot,
                and the per-minute units it took (`TakenTurn.give_back_rate`), and so do
                the units of one the drain ended before any try of it was begun
                (`ShuttingDown.is_unsent`).
        """
        if self.is_stopping:
            raise ShuttingDown()
        async with contextlib.AsyncExitStack() as held:
            async with self._ended_by_drain():
                taken = await held.enter_async_context(turn)
            if self.is_stopping:  # it began as the turn came
                if taken is not None:
                    await taken.give_back_rate()
                raise ShuttingDown(is_unsent=True)
            try:
                yield
            except (GatewayError, asyncio.CancelledError) as ended:
                if ended_unsent(ended) and taken is not None:
                    await taken.give_back_rate()
                raise

    @property
    def config(self) -> GatewayConfig:
        """The gateway's configuration."""
        return self._config

    def context_window(self, model: str) -> int:
        """The model's context window from the catalog (a safe default when unlisted)."""
        return self._prices.context_window(model, _DEFAULT_CONTEXT_WINDOW)

    async def account(
        self, request: ChatRequest, completion: Completion, *, admitted_s: float | None = None
    ) -> None:
        """Record a finished call on the RPC span, the cost metrics and the usage ledger.

        Every path that produces a `Completion` (unary, stream, cache hit, batch) calls
        this once, so all of them are priced and counted identically. `admitted_s`: when
        its budget admitted it (`BudgetHold.admitted_s`), the period it is spent in.
        """
        telemetry().record_completion(request, completion)
        await self.ledger.record(
            UsageEntry(
                tenant=request.tenant,
                model=request.model,
                upstream=completion.upstream,
                labels=request.labels,
                usage=completion.usage,
                cost_usd=completion.cost_usd,
                admitted_s=admitted_s,
                is_cache_hit=completion.is_cache_hit,
                saved_cost_usd=completion.saved_cost_usd,
            )
        )

    @property
    def pool(self) -> UpstreamPool:
        """The upstream pool this pipeline routes to."""
        return self._pool

    @property
    def limits(self) -> RequestDefaults:
        """Request limits and defaults from the config."""
        return self._config.defaults

    @property
    def prices(self) -> PriceList:
        """The pricing catalog."""
        return self._prices

    @property
    def cache(self) -> ResponseCache | None:
        """The response cache, if any."""
        return self._cache

    def prepare(self, request: ChatRequest) -> PreparedRequest:
        """Validate `request`, fit it to its model's window and estimate its prompt.

        The one place a call's prompt is estimated: budgets, the upstream's token limiter
        and usage all take the figure from here.
        """
        defaults = self._config.defaults
        # `validate_chat_request` written out: a frame on every call prepared.
        violations = chat_request_violations(request, defaults)
        if violations:
            raise InvalidRequest(violations)
        model, params = request.model, request.params
        if model not in self._served:  # `pool.routes` written out: a frame on every call
            raise ModelNotFound(model)
        if model in self._pool.toolless:
            # Refused here, before the cache, the budgets and the tenant's limits see it.
            self._pool.toolless_upstreams(request)
        calibration = self.calibration.factor(model, request.tenant)
        fitted = fit_messages(
            request.messages,
            tools=request.tools,
            response_format=params.response_format,
            # `self.context_window`, written out: a frame less on every call.
            context_window=self._prices.context_window(model, _DEFAULT_CONTEXT_WINDOW),
            max_tokens=params.max_tokens,
            mode=request.truncation or defaults.truncation,
            calibration=calibration,
        )
        asked = request
        if fitted.dropped:
            request = dataclasses.replace(request, messages=fitted.messages)
        return PreparedRequest(request, fitted.dropped, fitted.prompt_tokens, calibration, asked)

    def _prepared(self, request: ChatRequest | PreparedRequest) -> PreparedRequest:
        """`request` prepared: again, unless it was prepared with its tenant's calibration
        for its model as it is now (the caller gate's check prepares a metered call before
        it waits for its tenant's limits; nothing else changes what preparing finds)."""
        if not isinstance(request, PreparedRequest):
            return self.prepare(request)
        return request if self._is_current(request) else self.prepare(request.asked)

    def _is_current(self, prepared: PreparedRequest) -> bool:
        """Whether preparing `prepared`'s request now would fit it alike: its tenant's
        calibration for its model is the one it was fitted with."""
        asked = prepared.asked
        return prepared.calibration == self.calibration.factor(asked.model, asked.tenant)

    def _learn_refusal(self, prepared: PreparedRequest, refusal: UpstreamContextExceeded) -> None:
        """Teach the calibration that an upstream refused `prepared`'s prompt as over its
        model's window: its own count was over the room the prompt was fitted into, and
        was the count its refusal says, where it says it and the window."""
        request = prepared.request
        window = self.context_window(request.model)
        max_tokens = request.params.max_tokens
        room = window - answer_reserve(window, max_tokens)
        if refusal.window_tokens is None or refusal.prompt_tokens is None:
            self._learn_uncounted_refusal(prepared, refusal, window=window, room=room)
            return
        prompt_tokens = refusal.prompt_tokens
        if refusal.counts_answer:
            # Moonshot's count is of the prompt and the max_tokens sent (or its own default)
            # together: taken for the prompt's, it raised the factor by the max_tokens.
            prompt_alone = prompt_in_count_with_answer(prompt_tokens, max_tokens)
            if prompt_alone is None:
                # Read less the gateway's own reserve, it was over the prompt's by the rest
                # of Moonshot's default, and raised the factor for all the tenant's prompts.
                refusal.advise(default_answer_room_advice(refusal.window_tokens, prompt_tokens))
                return
            prompt_tokens = prompt_alone
        if refusal.is_input_limit:
            upstream_room = refusal.window_tokens  # a limit on the prompt alone
        elif holds_prompt_and_answer(refusal.window_tokens, prompt_tokens):
            # Its max_tokens was refused, not the prompt: the count is one as an
            # answer's usage reports. Taken for the prompt's, it raised the tenant's
            # factor to the ceiling, refusing its other prompts a quarter the window.
            self.calibration.observe(
                request.model,
                request.tenant,
                estimated_tokens=prepared.prompt_tokens,
                reported_tokens=prompt_tokens,
            )
            if refusal.counts_answer and prompt_tokens > 0:
                refusal.advise(max_tokens_refused_advice(refusal.window_tokens, prompt_tokens))
            return
        else:
            upstream_room = refusal.window_tokens - answer_reserve(
                refusal.window_tokens, max_tokens
            )
        is_followed = self.calibration.refused_as_too_long(
            request.model,
            request.tenant,
            estimated_tokens=prepared.prompt_tokens,
            room_tokens=room,
            counted=(prompt_tokens, upstream_room),
        )
        if not is_followed:
            refusal.advise(_past_the_factor_advice(refusal, window))

    def _learn_uncounted_refusal(
        self,
        prepared: PreparedRequest,
        refusal: UpstreamContextExceeded,
        *,
        window: int,
        room: int,
    ) -> None:
        """`_learn_refusal` for a refusal that says no count ("context length exceeded"):
        only a prompt that may be over the window teaches the calibration; a shorter one's
        max_tokens was refused (or the upstream's window is smaller than the catalog's)."""
        request = prepared.request
        estimated = prepared.prompt_tokens
        # The rule: it may be over when its estimate at the ceiling (4x) and the default
        # answer room are over the window. Raised for a shorter one, the factor refused the
        # tenant's other prompts a quarter the window long, and left the max_tokens at fault.
        if holds_prompt_and_answer(window, math.ceil(estimated * self.calibration.ceiling)):
            refusal.advise(_short_prompt_advice(estimated, window, request.params.max_tokens))
            return
        self.calibration.refused_as_too_long(
            request.model, request.tenant, estimated_tokens=estimated, room_tokens=room
        )

    def _usage(self, prepared: PreparedRequest, output: _Output, reported: Usage | None) -> Usage:
        """The usage as reported; else estimated, or, where the upstream reported one
        count and not the other (`is_estimated` then, the missing one 0), or a count no
        call can have (`_believed`), the other estimated beside it."""
        if reported is not None:
            self.calibration.observe(
                prepared.request.model,
                prepared.request.tenant,
                estimated_tokens=prepared.prompt_tokens,
                reported_tokens=reported.input_tokens,
            )
            reported = _believed(reported, output)
            if not reported.is_estimated:
                return reported
            input_tokens = reported.input_tokens or self._billed_prompt_tokens(prepared)
            return dataclasses.replace(
                reported,
                input_tokens=input_tokens,
                output_tokens=reported.output_tokens
                or self._output_estimate(prepared, output, input_tokens),
                cached_input_tokens=min(reported.cached_input_tokens, input_tokens),
            )
        input_tokens = self._billed_prompt_tokens(prepared)
        return Usage(
            input_tokens=input_tokens,
            output_tokens=self._output_estimate(prepared, output, input_tokens),
            is_estimated=True,
        )

    def _billed_prompt_tokens(self, prepared: PreparedRequest) -> int:
        """The prompt tokens billed where the upstream reported none: the estimate as
        the tenant's calibration for the model counts it now (answers since the call was
        prepared may have moved it), never below the plain estimate. What an upstream
        call's budget reservation and its upstream's tokens-per-minute limit count too,
        looked up once for both: the limit models the provider's own count."""
        request = prepared.request
        return self.calibration.billed_tokens(
            request.model, request.tenant, estimated_tokens=prepared.prompt_tokens
        )

    def _output_estimate(
        self, prepared: PreparedRequest, output: _Output, input_tokens: int
    ) -> int:
        # The model wrote at most `max_tokens`, and no more than its window leaves after
        # the prompt (the window holds both), whatever the characters suggest. The prompt
        # is taken as charged (`input_tokens`), so that a call is never charged more than a
        # whole window in all. The text's own estimate may pass that room, but the room
        # still bounds it: the estimate runs over the real count (up to 2x), and the text
        # the model wrote fit the room. Never below 0: a prompt the upstream took can be
        # estimated past the window. The cap also bounds how much of a long answer is read:
        # estimating holds the event loop (about 0.1 s a MB), and streams cut together
        # by their deadlines would hold it for all their text.
        request = prepared.request
        room = max(self.context_window(request.model) - input_tokens, 0)
        limit = request.params.max_tokens
        limit = room if limit is None else min(limit, room)
        return estimate_output_tokens(
            output.content, output.tool_calls, output.reasoning, limit=limit
        )

    async def complete(
        self,
        request: ChatRequest | PreparedRequest,
        *,
        deadline: Deadline,
        repeat_key: RepeatKey | None = None,
        waiting_since: float | None = None,
        is_rerun: bool = False,
    ) -> Completion:
        """One unary completion, from the cache when it has it.

        With `repeat_key` (the caller's tenant and request bytes), a request the cache
        reads is remembered so that `repeat` can answer the same bytes again.
        `waiting_since`: when (`time.monotonic()`) a call the gateway queued itself began
        waiting for its turn; its timings count from then, the wait as queued time.
        `is_rerun`: the call runs again one that failed (`AttemptLog.is_rerun`).
        """
        started = time.monotonic()
        # `_prepared` of a request not prepared yet (most) written out: a frame on every miss.
        if isinstance(request, ChatRequest):
            prepared = self.prepare(request)
        else:
            prepared = self._prepared(request)
        request = prepared.request
        # A cache miss reserves its expected cost against the tenant's budget; it is released
        # only after account() (or on failure), so the cost always counts, reserved or spent.
        async with self._budgets.holding() as hold:
            owed = _Owed()
            log = AttemptLog(is_rerun=is_rerun)
            fetch = functools.partial(
                self._complete, prepared, hold, owed, deadline, started, log=log
            )
            try:
                cache = self._cache
                if cache is None or (mode := cache.mode_for(request)) is CacheMode.BYPASS:
                    completion = await fetch()  # it told `on_answered`, in this task
                else:
                    key = None
                    if repeat_key is not None:
                        key = self._remember(repeat_key, prepared, mode)
                    completion = await cache.complete(
                        request,
                        fetch=fetch,
                        deadline=deadline,
                        key=key,
                        sent_nothing=log.sent_nothing,
                    )
                    _count_shared_wait(completion)
                    completion = _with_dropped(completion, prepared.dropped)
                    self._on_answered()
                # Accounted per caller: a cache hit or a coalesced call records 0 cost.
                owed.completion = None
                if waiting_since is not None:
                    completion = _queued_before(completion, (started - waiting_since) * _MS)
                await self.account(request, completion, admitted_s=hold.admitted_s)
            finally:
                if owed.completion is not None:  # a frame less for most calls: none owed
                    await self._account_owed(request, owed, hold)
        return completion

    async def complete_in_turn(
        self,
        request: ChatRequest,
        *,
        deadline: Deadline,
        waiting_since: float | None = None,
        is_rerun: bool = False,
        turn: Turn = unpaced,
        was_sent: bool = False,
        within: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext,
    ) -> Completion:
        """`complete`, for a call the gateway queued itself (a batch's item, a Summarize's
        part), in its `turn` (`in_turn`; `was_sent`: an earlier try of it was, its units
        spent) and `within` that: one its upstreams' own limits (concurrency, per-minute
        rates) kept waiting past `resilience.max_limit_wait_s` goes back in line rather
        than fail, and so does one its tenant's budget refused only for what calls in
        flight hold: most often its own batch's or summary's other calls, which would
        otherwise refuse it on every run. That bound is for a caller who would rather be
        told at once; these calls are their caller's queue, and wait their turn until its
        deadline: their timings count from `waiting_since` (else now), every turn they
        waited as queued time. `is_rerun`: the call runs again one that failed after the
        pool's own tries (a Summarize part's next try), held to the retry budget as
        retries are.

        A paced call whose upstream's limits hold it a known while (a rate, a pause its
        429 asked for: `_OUT_OF_TURN_S` or more) waits that out of its turn, giving its
        units and its slot back, and takes its turn again: its tenant's other calls may
        use the slot meanwhile. Shorter waits, and waits for an upstream's slot (when one
        frees is not known: its refusal says 0.1 s), go back in line in the turn, without
        churning it.

        Raises:
            ShuttingDown: the server began stopping while the call waited at its upstream's
                limits (or for its next turn there): it took none of them and was not sent
                (`is_unsent`, unless a try of it was begun before, and failed over).
        """
        if waiting_since is None:
            waiting_since = time.monotonic()
        is_paced = turn is not unpaced
        while True:
            try:
                async with self.in_turn(turn(was_sent)):
                    with within():
                        return await self._complete_in_line(
                            request,
                            deadline=deadline,
                            waiting_since=waiting_since,
                            is_rerun=is_rerun,
                            is_paced=is_paced,
                        )
            except LimitExceeded as refusal:  # unsent: its turn gave its units back
                wait_s = _out_of_turn_s(refusal, deadline) if is_paced else None
                if wait_s is None:
                    raise
            await self.pause(wait_s, is_unsent=not was_sent)

    async def _complete_in_line(
        self,
        request: ChatRequest,
        *,
        deadline: Deadline,
        waiting_since: float,
        is_rerun: bool,
        is_paced: bool,
    ) -> Completion:
        """`complete_in_turn` within one turn: `LimitExceeded` for a wait the call takes
        out of its turn (`is_paced`, `_out_of_turn_s`)."""
        while True:
            try:
                return await self.complete(
                    request,
                    deadline=deadline,
                    waiting_since=waiting_since,
                    is_rerun=is_rerun,
                )
            except (LimitExceeded, HeldByCallsInFlight) as exc:
                left = deadline.remaining_s()
                if left is not None and left <= (exc.retry_after_s or 0.0):
                    raise  # its turn would come after the deadline: said now, with when
                if is_paced and isinstance(exc, LimitExceeded) and _out_of_turn_s(exc, deadline):
                    raise
                refusal = exc
            # Its tries so far were all refused before any was begun (`_sooner_limit`).
            try:
                async with self._ended_by_drain(is_unsent=True):
                    await self._next_turn(request.tenant, refusal)
            except asyncio.CancelledError as cancel:
                mark_unsent(cancel)
                raise

    async def _next_turn(self, tenant: str, refusal: LimitExceeded | HeldByCallsInFlight) -> None:
        """Wait for a refused call's next try. Refused for what its tenant's calls in
        flight hold: until this process releases one of the tenant's reservations or the
        refusal's retry comes (other replicas' releases are not seen here), whichever is
        first, not a budget check (on Redis, a script) every pause. Refused at an
        upstream's limits: the pause."""
        if not isinstance(refusal, HeldByCallsInFlight):
            await asyncio.sleep(_REQUEUE_PAUSE_S)
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(refusal.retry_after_s or CALLS_IN_FLIGHT_RETRY_S):
                await self._budgets.released(tenant, since=refusal.releases_seen)

    async def pause(
        self,
        seconds: float,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        last_error: GatewayError | None = None,
        is_unsent: bool = False,
    ) -> None:
        """Wait `seconds` with `sleep` (a `Clock`'s, where the caller has one injected)
        before a call the gateway queued itself tries again: a batch item's next try,
        once its upstream's restart should answer; a Summarize part's, after its back-off.

        Raises:
            ShuttingDown: the server began stopping before, or while, it waited; its
                message names `last_error`, the failure the next try was for, and it says
                `is_unsent`: no try of the call was begun before.
        """
        if self.is_stopping:
            raise ShuttingDown(last_error=last_error, is_unsent=is_unsent)
        try:
            async with self._ended_by_drain(last_error=last_error, is_unsent=is_unsent):
                await sleep(seconds)
        except asyncio.CancelledError as cancel:  # cut as it waited: unsent as a refusal
            mark_unsent(cancel, is_unsent=is_unsent)
            raise

    def _remember(
        self, repeat_key: RepeatKey, prepared: PreparedRequest, mode: CacheMode
    ) -> str | None:
        """Remember a request the cache reads (in `mode`) for `repeat`; its store key,
        else None."""
        cache = self._cache
        request = prepared.request
        if cache is None or not mode.reads:
            return None
        store_key = cache.key_for(request)
        self._repeatable.put(repeat_key, _Repeatable(prepared, store_key))
        return store_key

    def prepared_before(self, repeat_key: RepeatKey) -> PreparedRequest | None:
        """What `complete` prepared of these very bytes for this tenant lately, with the
        tenant's calibration for the model as it is now (preparing them again would find
        them valid, and fit them alike), else None."""
        known = self._repeatable.get(repeat_key) if self._cache is not None else None
        return known.prepared if known is not None and self._is_current(known.prepared) else None

    async def repeat(self, repeat_key: RepeatKey) -> Completion | None:
        """A cache hit for a request the same tenant sent moments ago, or None.

        Callers hit a hot entry by sending the very same request again, and converting,
        validating, fitting and keying it again was a third of a hit's CPU. Here the same
        bytes find the request `complete` prepared (if the tenant's calibration for the
        model has not moved since), and `ResponseCache.recall` its answer, if a store read
        returned it in the last second. Otherwise None, and the caller takes `complete`.
        """
        if self._cache is None:
            return None
        known = self._repeatable.get(repeat_key)
        if known is None:
            return None
        prepared = known.prepared
        asked = prepared.asked
        # `_is_current` written out: a frame on every repeated request.
        if prepared.calibration != self.calibration.factor(asked.model, asked.tenant):
            return None
        request = prepared.request
        completion = self._cache.recall(known.store_key)
        if completion is None:
            return None
        if completion.dropped_messages != prepared.dropped:  # a frame less when equal
            completion = _with_dropped(completion, prepared.dropped)
        self._on_answered()
        await self.account(request, completion)
        return completion

    def _completion(
        self,
        prepared: PreparedRequest,
        log: AttemptLog,
        *,
        completion_id: str,
        model: str,
        output: _Output,
        finish_reason: FinishReason,
        reported: Usage | None,
        timings: Timings,
    ) -> Completion:
        """An upstream call's answer with its usage (as reported, else estimated), its
        cost and where it ran: one place for unary calls, streams and cut streams, which
        puts the usage on the token metric too, once for each upstream call."""
        usage = self._usage(prepared, output, reported)
        telemetry().record_token_usage(log.span, usage)
        return Completion(
            id=completion_id,
            model=model,
            content=output.content,
            finish_reason=finish_reason,
            usage=usage,
            cost_usd=self._prices.cost_usd(prepared.request.model, usage),
            upstream=log.upstream,
            attempts=log.attempts,
            timings=timings,
            dropped_messages=prepared.dropped,
            tool_calls=output.tool_calls,
            reasoning=output.reasoning,
        )

    async def _complete(
        self,
        prepared: PreparedRequest,
        hold: BudgetHold,
        owed: _Owed,
        deadline: Deadline,
        started: float,
        *,
        log: AttemptLog,
    ) -> Completion:
        """The upstream call behind a cache miss, its attempts told in `log`; budgets are
        checked and reserved only here."""
        request = prepared.request
        # `_billed_prompt_tokens` written out: a Python call less on every miss.
        prompt_tokens = self.calibration.billed_tokens(
            request.model, request.tenant, estimated_tokens=prepared.prompt_tokens
        )
        # Handed over inside: a call whose caller left is recorded before its reservation
        # is released, so its cost counts all along, reserved or spent.
        async with hold.reserving(request, prompt_tokens=prompt_tokens):
            try:
                try:
                    reply = await self._pool.complete(
                        request,
                        prompt_tokens=prompt_tokens,
                        deadline=deadline,
                        log=log,
                    )
                except UpstreamContextExceeded as refusal:
                    self._learn_refusal(prepared, refusal)
                    raise
                except BaseException:
                    if log.is_cut_after_sending:
                        # What a unary call read as a stream generated before the cut.
                        await self._account_cut(prepared, _relayed_output(log.output), log, hold)
                    raise
                self._on_answered()  # before a cache write, when this runs in the caller's task
                upstream_ms, queued_ms = log.upstream_s * _MS, log.queued_s * _MS
                completion = self._completion(
                    prepared,
                    log,
                    completion_id=reply.id or f"gw-{uuid.uuid4().hex}",
                    model=reply.model,
                    output=_Output(reply.content, reply.tool_calls, reply.reasoning),
                    finish_reason=reply.finish_reason,
                    reported=reply.usage,
                    timings=Timings(
                        total_ms=(time.monotonic() - started) * _MS,
                        upstream_ms=upstream_ms,
                        # As a stream's: from the call's start, its waits included.
                        time_to_first_token_ms=upstream_ms + queued_ms,
                        queued_ms=queued_ms,
                    ),
                )
                await self._hand_over(hold, owed, request, completion)
            finally:
                if log.lost:
                    await self._account_lost(prepared, log, owed, hold)
        return completion

    async def _account_owed(self, request: ChatRequest, owed: _Owed, hold: BudgetHold) -> None:
        """Record the answer still owed to a caller that left before it was handed over;
        taken first, so whichever of the caller and the upstream call gets here first
        records it, once."""
        if owed.completion is not None:
            completion, owed.completion = owed.completion, None
            await self.account(request, completion, admitted_s=hold.admitted_s)

    async def _hand_over(
        self, hold: BudgetHold, owed: _Owed, request: ChatRequest, completion: Completion
    ) -> None:
        """Leave the upstream's answer for its caller to record, or record it now if the
        caller left while others still followed the call (a shared flight).

        The followers record what they were served as cache hits, at no cost; without this
        the upstream's charge for the call would be recorded for no one.
        """
        if hold.caller_has_left:
            await self.account(request, completion, admitted_s=hold.admitted_s)
        else:
            owed.completion = completion

    async def _account_cut(
        self, prepared: PreparedRequest, output: _Output, log: AttemptLog, hold: BudgetHold
    ) -> None:
        """Record a call that ended without its `Completion` after the upstream had it:
        a stream after some output, or any call its caller cut once its request was sent.

        The upstream bills the prompt it received and what it generated, even when the
        answer never came back, so the call is recorded once, for its caller's tenant:
        with the usage its stream reported before the cut (`AttemptLog.usage`), as the
        same usage is billed uncut; else estimated, the prompt as input
        (`_billed_prompt_tokens`), the `output` sent (text, reasoning and partial tool
        calls) as output. Called inside `hold.reserving`, so that its cost counts all
        along, reserved or spent.
        """
        request = prepared.request
        completion = self._completion(
            prepared,
            log,
            completion_id="",
            model="",  # no answer said which model answered
            output=output,
            finish_reason=FinishReason.UNKNOWN,
            reported=log.usage,
            timings=_cut_timings(log),
        )
        await self.account(request, completion, admitted_s=hold.admitted_s)

    async def _account_lost(
        self, prepared: PreparedRequest, log: AttemptLog, owed: _Owed, hold: BudgetHold
    ) -> None:
        """Record each attempt the upstream most likely billed but whose answer was lost
        (`AttemptLog.lose`): timed out at the upstream's `timeout_s` once sent, or failed
        after a success status.

        One row each, for the caller's tenant and the attempt's upstream: the usage its
        stream reported before it was lost (`LostAttempt.usage`), as a cut stream's; else
        the prompt's estimate as input (`_billed_prompt_tokens`), as output the estimate of
        what it streamed (a unary call read as a stream; else none), estimated. Not a request:
        `requests` stays the number of calls, and the call's answer (if any) keeps its own
        usage and cost. Called inside `hold.reserving`, once the call's answer (if any) is
        handed over, in the upstream call's task, so once per upstream call even when a
        shared flight serves several callers.

        A cancel while they are recorded (the caller's, or every caller of a shared call
        leaving) stops none of them, and the answer still `owed` to a caller is recorded
        here too, before the reservation is released: the upstream billed it all.
        """
        request = prepared.request
        lost, log.lost = log.lost, ()
        entries = []
        for attempt in lost:
            usage = self._usage(prepared, _relayed_output(attempt.output), attempt.usage)
            cost_usd = self._prices.cost_usd(request.model, usage)
            telemetry().record_token_usage(attempt.span, usage)
            telemetry().record_lost_attempt(request, cost_usd)
            entries.append(
                UsageEntry(
                    tenant=request.tenant,
                    model=request.model,
                    upstream=attempt.upstream,
                    labels=request.labels,
                    usage=usage,
                    cost_usd=cost_usd,
                    is_request=False,
                    admitted_s=hold.admitted_s,
                )
            )
        try:
            await self._record_each(entries)
        except BaseException:
            await self._account_owed(request, owed, hold)
            raise

    async def _record_each(self, entries: list[UsageEntry]) -> None:
        """Record every entry, each even when the task is cancelled while an earlier one is
        (the cancel is raised once all are recorded)."""
        if entries:
            try:
                await self.ledger.record(entries[0])
            finally:
                await self._record_each(entries[1:])

    async def stream(
        self, request: ChatRequest | PreparedRequest, *, deadline: Deadline
    ) -> AsyncGenerator[Delta | Completion, None]:
        """One streamed completion: deltas as they arrive, then the `Completion`."""
        started = time.monotonic()
        prepared = self._prepared(request)
        request = prepared.request
        async with self._budgets.holding() as hold:  # released after account(), as in complete()
            owed = _Owed()
            log = AttemptLog()
            fetch = functools.partial(
                self._stream, prepared, hold, owed, deadline, started, log=log
            )
            events = (
                fetch()
                if self._cache is None
                else self._cache.stream(
                    request, fetch=fetch, deadline=deadline, sent_nothing=log.sent_nothing
                )
            )
            try:
                async with contextlib.aclosing(events):
                    async for event in events:
                        if isinstance(event, Completion):
                            self._on_answered()
                            _count_shared_wait(event)
                            owed.completion = None
                            completion = _with_dropped(event, prepared.dropped)
                            await self.account(request, completion, admitted_s=hold.admitted_s)
                            yield completion
                        else:
                            yield event
            finally:
                await self._account_owed(request, owed, hold)

    async def _stream(
        self,
        prepared: PreparedRequest,
        hold: BudgetHold,
        owed: _Owed,
        deadline: Deadline,
        started: float,
        *,
        log: AttemptLog,
    ) -> AsyncGenerator[Delta | Completion, None]:
        """The upstream stream behind a cache miss, its attempts told in `log`; budgets are
        checked and reserved only here."""
        request = prepared.request
        relayed: list[TextChunk] = []
        unfolded = 0  # chunks in `relayed` since it was last folded (`FOLDED_EVERY`)
        end: StreamEnd | None = None
        prompt_tokens = self.calibration.billed_tokens(  # `_billed_prompt_tokens`, inline
            request.model, request.tenant, estimated_tokens=prepared.prompt_tokens
        )
        async with hold.reserving(request, prompt_tokens=prompt_tokens):
            # Closed here, at once, when this stream is: not later by a GC hook's own task.
            upstream = cast(
                AsyncGenerator[StreamEvent, None],
                self._pool.stream(request, prompt_tokens=prompt_tokens, deadline=deadline, log=log),
            )
            try:
                try:
                    async with contextlib.aclosing(upstream):
                        async for event in upstream:
                            if isinstance(event, TextChunk):
                                relayed.append(event)
                                unfolded += 1
                                if unfolded == FOLDED_EVERY:
                                    fold_chunks(relayed, FOLDED_EVERY)
                                    unfolded = 0
                                yield Delta(event.content, event.tool_calls, event.reasoning)
                            else:
                                end = event
                except UpstreamContextExceeded as refusal:  # before any text
                    self._learn_refusal(prepared, refusal)
                    raise
                except BaseException:
                    # Cut by the upstream, the caller or its deadline: the output sent was
                    # billed, and the prompt was once the upstream had it.
                    if relayed or log.is_cut_after_sending:
                        await self._account_cut(prepared, _relayed_output(relayed), log, hold)
                    raise
                if end is None:  # the pool always ends a stream with StreamEnd or raises
                    raise RuntimeError("stream ended without its end event")
                self._on_answered()
                first_token_s = log.first_token_s or log.upstream_s + log.queued_s
                completion = self._completion(
                    prepared,
                    log,
                    completion_id=end.id or f"gw-{uuid.uuid4().hex}",
                    model=end.model,
                    output=_relayed_output(relayed),
                    finish_reason=end.finish_reason,
                    reported=end.usage,
                    timings=Timings(
                        total_ms=(time.monotonic() - started) * _MS,
                        upstream_ms=log.upstream_s * _MS,
                        time_to_first_token_ms=first_token_s * _MS,
                        queued_ms=log.queued_s * _MS,
                    ),
                )
                await self._hand_over(hold, owed, request, completion)  # inside, as in _complete
            finally:
                if log.lost:
                    await self._account_lost(prepared, log, owed, hold)
        yield completion


def _out_of_turn_s(refusal: LimitExceeded, deadline: Deadline) -> float | None:
    """How long a paced call refused unsent at its upstream's limits waits out of its
    turn (`complete_in_turn`): the refusal's known wait, if `_OUT_OF_TURN_S` or more and
    the deadline leaves room for it; else None (it stays in line, in its turn)."""
    wait_s = refusal.retry_after_s
    if not refusal.is_unsent or wait_s is None:
        return None
    left = deadline.remaining_s()
    if wait_s < _OUT_OF_TURN_S or (left is not None and left <= wait_s):
        return None
    return wait_s


def _cut_timings(log: AttemptLog) -> Timings:
    """What a cut call's RPC span can say of its timings: its first token, if any came
    (else 0, none, as a response says it), and its wait in upstreams' limiters."""
    return Timings(
        time_to_first_token_ms=(log.first_token_s or 0.0) * _MS, queued_ms=log.queued_s * _MS
    )


def _count_shared_wait(completion: Completion) -> None:
    """Leave a coalesced follower's wait on another caller's upstream call out of its
    overhead, as that caller's own is: its `upstream_ms` and the `queued_ms` its shared
    call spent in its upstream's limiter (read before a batch item's turn is added)."""
    if completion.is_cache_hit:
        waited_ms = completion.timings.upstream_ms + completion.timings.queued_ms
        if waited_ms:  # 0 for an answer read from the store
            telemetry().waited_on_upstream(waited_ms / _MS)


def _queued_before(completion: Completion, waited_ms: float) -> Completion:
    """`completion` as its caller saw it: after `waited_ms` queued before the pipeline
    took it up (a batch item's turn), in its total, its time to first token and its
    queued time."""
    timings = completion.timings
    return dataclasses.replace(
        completion,
        timings=Timings(
            total_ms=timings.total_ms + waited_ms,
            upstream_ms=timings.upstream_ms,
            time_to_first_token_ms=timings.time_to_first_token_ms + waited_ms,
            queued_ms=timings.queued_ms + waited_ms,
        ),
    )


def _with_dropped(completion: Completion, dropped: int) -> Completion:
    # A cached answer may come from a request that dropped a different number of messages.
    if completion.dropped_messages == dropped:
        return completion
    return dataclasses.replace(completion, dropped_messages=dropped)
