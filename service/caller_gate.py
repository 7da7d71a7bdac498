"""The caller's side of every RPC: who is calling, may they, and do they have quota left.

The RPC boundary asks `CallerGate.authenticate` who is calling (bearer key or client
certificate) before the call takes one of the server's slots, so callers without a valid
key never hold or queue for one; once admitted, `CallerGate.admit` checks each requested
model against the tenant's allowed models and takes the tenant's quota, for the servicer
method's duration. The tenant is then available to
the servicer through `current_tenant()`, a context variable set for this call only
(each RPC runs in its own asyncio task, so the value never leaks into another call).

Requests arrive here as Protobuf messages; the gate reads only the fields that say what
is being asked for (model, text, items), by name, and never keeps the message.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import weakref
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from service.auth import (
    DEFAULT_TENANT,
    Authenticator,
    Principal,
    check_model_allowed,
)
from service.clock import Deadline
from service.config import TenantConfig
from service.errors import (
    DeadlineExceeded,
    FieldViolation,
    GatewayError,
    InvalidRequest,
    QuotaExceeded,
    Unauthenticated,
    ended_unsent,
)
from service.tenant_limits import (
    NO_SLOT,
    CallSlot,
    TenantLimiter,
    is_over_call_cap,
)
from service.tokens import PER_MESSAGE_OVERHEAD, estimate_text_tokens

log = logging.getLogger("llm_gateway.caller_gate")

_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "llm_gateway_principal", default=None
)
_pacer: contextvars.ContextVar[BatchPacer | None] = contextvars.ContextVar(
    "llm_gateway_batch_pacer", default=None
)


def current_pacer() -> BatchPacer | None:
    """Where the batch being served takes each item's share of its tenant's per-minute
    limits (None: no gate, or a tenant without them)."""
    return _pacer.get()


def current_principal() -> Principal | None:
    """The authenticated caller of the call being served (None outside a call)."""
    return _principal.get()


def caller_may_read_all_usage() -> bool:
    """Whether the current caller may read every tenant's usage (admin, or auth off)."""
    principal = _principal.get()
    return principal is None or principal.may_read_all_usage


def current_tenant() -> str:
    """The tenant of the call being served (`default` outside a call or without auth)."""
    principal = _principal.get()
    return principal.tenant if principal is not None else DEFAULT_TENANT


@dataclass(frozen=True, slots=True)
class UndecodableRequest:
    """Stands in for a request whose bytes are not a valid message (bad UTF-8, corrupt)."""

    message_type: str


class CallContext(Protocol):
    """The parts of `grpc.aio.ServicerContext` the gate reads."""

    def invocation_metadata(self) -> Any:
        """The caller's metadata."""
        ...

    def auth_context(self) -> Any:
        """The transport's authentication properties (TLS peer certificate)."""
        ...


@dataclass(frozen=True, slots=True)
class Demand:
    """What one RPC asks for: models, requests and an estimate of the tokens."""

    models: tuple[str, ...] = ()
    requests: int = 0
    tokens: int = 0
    # A batch: it holds no call slot, and each item takes its requests, tokens and slot
    # as it starts (`BatchPacer`), so a batch larger than a minute's allowance runs at the
    # rate, and the tenant's batches together run no more calls at once than its cap.
    is_paced: bool = False
    # A Summarize: it takes its request now, and each of its calls its tokens and slot as
    # it starts.
    paces_tokens: bool = False


def _text_tokens(texts: Iterable[str]) -> int:
    return sum(PER_MESSAGE_OVERHEAD + estimate_text_tokens(t) for t in texts)


def completion_tokens(request: Any, messages: Iterable[Any] | None = None) -> int:
    """The tokens a tenant's `tokens_per_minute` counts for one `CompleteRequest`; with
    `messages`, for those of its messages alone (what truncation left to send)."""
    # One pass over the messages (each text counted as `_text_tokens` counts it): every
    # call of a metered tenant estimates its request here.
    tokens = 0
    for m in request.messages if messages is None else messages:
        tokens += PER_MESSAGE_OVERHEAD + estimate_text_tokens(m.content)
        if m.reasoning:
            tokens += PER_MESSAGE_OVERHEAD + estimate_text_tokens(m.reasoning)
        if m.tool_calls:
            tokens += _text_tokens(f"{call.name} {call.arguments}" for call in m.tool_calls)
    if request.tools:
        tokens += _text_tokens(
            f"{tool.name} {tool.description} {tool.parameters}" for tool in request.tools
        )
    params = getattr(request, "params", None)
    if params is not None and params.response_format.json_schema:
        schema = params.response_format  # an answer's schema is prompt, as tools are
        tokens += _text_tokens((f"{schema.schema_name} {schema.json_schema}",))
    if params is not None and params.HasField("max_tokens"):
        tokens += max(0, params.max_tokens)
    return tokens


def _tokens_of(request: Any) -> int:
    """The tokens `tokens_per_minute` counts for a completion (else 0: a Summarize's
    calls take theirs as they start)."""
    if _kind_of(request) == "completion":
        return completion_tokens(request)
    return 0


RequestKind = Literal["batch", "summary", "completion", "other"]
_KINDS: dict[type, RequestKind] = {}


def _kind_of(request: Any) -> RequestKind:
    """What kind of call `request` asks for, by the fields its type has; remembered by
    type, as `hasattr` of a field a message lacks raises and catches an exception."""
    kind = _KINDS.get(type(request))
    if kind is None:
        if hasattr(request, "items"):
            kind = "batch"
        elif hasattr(request, "document"):
            kind = "summary"
        elif hasattr(request, "messages"):
            kind = "completion"
        else:
            kind = "other"
        _KINDS[type(request)] = kind
    return kind


def part_tokens(texts: Iterable[str], *, max_tokens: int) -> int:
    """The tokens `tokens_per_minute` counts for one of a Summarize's calls: its
    messages' `texts`, and the answer's `max_tokens`, as for a completion."""
    return _text_tokens(texts) + max_tokens


def demand_of(request: Any, *, estimate: bool = True) -> Demand:
    """What `request` asks for, read from its fields by name; its tokens only if
    `estimate` (else 0).

    A batch names no models: each item's is checked as it runs, and fails only that item
    (`CompleteBatch`); nor does it take requests or tokens here: each item takes its own
    as it starts (`BatchPacer`), and an item refused before it starts (its model, its
    fields) takes none; one the cache answers takes its share, as a unary call does.

    Raises:
        InvalidRequest: the request's bytes could not be decoded.
    """
    if isinstance(request, UndecodableRequest):
        raise InvalidRequest(
            [FieldViolation("request", f"not a valid {request.message_type} message")]
        )
    kind = _kind_of(request)
    if kind == "batch":
        return Demand(is_paced=True)
    if kind == "summary":
        return Demand(models=(request.model,), requests=1, paces_tokens=True)
    if kind == "completion":
        tokens = completion_tokens(request) if estimate else 0
        return Demand(models=(request.model,), requests=1, tokens=tokens)
    return Demand()


class BatchPacer:
    """Takes each upstream call of one batch or summary from its tenant's limits as it
    starts: a share of the per-minute buckets, waiting for them to refill, and one of the
    tenant's `max_concurrent_calls`, waiting for one to be given back. A batch then runs
    at its tenant's rate, however many items it holds, where taking them all up front
    would refuse any batch larger than a minute's allowance; and the tenant's batches,
    summaries and calls together never run more upstream calls at once than its cap,
    where a batch holding one slot for all its items let each batch run that many more.
    The batch itself holds no slot while it waits: N batches holding the cap's N slots
    would wait for ever for their items'."""

    def __init__(
        self,
        limiter: TenantLimiter,
        principal: Principal,
        *,
        leave_share: float = 0.0,
        line: asyncio.Lock | None = None,
    ) -> None:
        self._limiter = limiter
        self._principal = principal
        # Left to the tenant's other calls: taking each refill the moment it came, a batch
        # would refuse every unary call of its tenant for as long as it ran.
        self._leave_share = leave_share
        # Calls take their turn in order (`line`: shared by every batch and summary of the
        # tenant in this process), rather than every waiting call waking to race for each
        # refill or freed slot.
        self._turn = line if line is not None else asyncio.Lock()

    @property
    def tokens_per_minute(self) -> int:
        """The tenant's tokens_per_minute (0: none): no one call may take more."""
        return self._principal.limits.tokens_per_minute

    async def take(self, tokens: int, deadline: Deadline, *, requests: int = 1) -> CallSlot:
        """Take `requests` (one item's), `tokens` and a call slot, waiting as long as the
        buckets ask if `deadline` leaves the time, and for a slot until the deadline;
        the slot is held until given back.

        Raises:
            QuotaExceeded: the item cannot be taken before the deadline, or ever (more
                tokens than a whole minute's allowance).
            DeadlineExceeded: the deadline passed while the item waited for its turn.
        """
        tenant = self._principal.tenant
        async with self._turn:
            while True:
                if deadline.has_expired:  # taken now, it would be paid for and never sent
                    raise DeadlineExceeded("the caller's deadline passed before the item's turn")
                given_back = self._limiter.slots_given_back
                try:
                    return await self._taken_whole(tokens, requests)
                except QuotaExceeded as refusal:
                    left_s = deadline.remaining_s()
                    if is_over_call_cap(refusal):
                        # When a slot is given back is not known: wait for one until the
                        # deadline, then be refused for the cap; at once if one was given
                        # back since the take began (its wake-up came before this wait).
                        await self._limiter.await_slot(tenant, timeout_s=left_s, since=given_back)
                        if deadline.has_expired:
                            raise
                        continue
                    wait_s = refusal.retry_after_s
                    if wait_s is None or (left_s is not None and wait_s >= left_s):
                        raise
                    await deadline.clock.sleep(wait_s)

    async def _taken_whole(self, tokens: int, requests: int) -> CallSlot:
        """`take_turn` for `tokens` and `requests`, seen to its end even when cancelled
        (the drain ends the wait for a turn): what it took is then given back, slot and
        per-minute units, for a call that will never be sent."""
        principal = self._principal
        taking = asyncio.ensure_future(
            self._limiter.take_turn(
                principal.tenant,
                principal.limits,
                tokens=tokens,
                requests=requests,
                leave_share=self._leave_share,
            )
        )
        try:
            return await asyncio.shield(taking)
        except asyncio.CancelledError:
            # Shielded, not left to a refund script: Redis may run an admission whose
            # reply the cancel cut off, and only that reply says what it took to give back.
            await _given_back(taking, self._limiter, principal, tokens=tokens, requests=requests)
            raise

    @contextlib.asynccontextmanager
    async def turn(
        self, tokens: int, deadline: Deadline, *, requests: int = 1
    ) -> AsyncIterator[PacedTurn]:
        """`take`, and hold the call slot for the body (the upstream call); what was
        taken is handed out, for a call never sent to give its units back."""
        slot = await self.take(tokens, deadline, requests=requests)
        try:
            yield PacedTurn(
                self._limiter, self._principal, tokens=tokens, requests=requests, taken=slot
            )
        finally:
            await slot.give_back()


class PacedTurn:
    """What one upstream call's turn (`BatchPacer.turn`) took of its tenant's per-minute
    limits: `requests` and `tokens`, as `taken` (its take's `CallSlot`) says."""

    __slots__ = ("_limiter", "_principal", "requests", "taken", "tokens")

    def __init__(
        self,
        limiter: TenantLimiter,
        principal: Principal,
        *,
        tokens: int,
        requests: int,
        taken: CallSlot,
    ) -> None:
        self._limiter = limiter
        self._principal = principal
        self.tokens = tokens
        self.requests = requests
        self.taken = taken

    async def give_back_rate(self) -> None:
        """The call was never sent: its requests and tokens go back to its tenant's
        per-minute buckets (its slot goes back as its turn ends)."""
        principal = self._principal
        await self._limiter.give_back_rate(
            principal.tenant,
            principal.limits,
            tokens=self.tokens,
            requests=self.requests,
            taken=self.taken,
        )


async def _given_back(
    taking: asyncio.Future[CallSlot],
    limiter: TenantLimiter,
    principal: Principal,
    *,
    tokens: int,
    requests: int,
) -> None:
    """Once `taking` (a turn's admission whose caller was cancelled) ends, give back what
    it took: its slot, and its per-minute units (`tokens` and `requests`). Waited for
    through any further cancel, at most the limit store's command timeout: left behind, a
    lease it took would be renewed for as long as the process runs."""
    while not taking.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(taking)
    if taking.cancelled() or taking.exception() is not None:
        return  # refused (it took nothing), or the store did not answer (it took nothing known)
    slot = taking.result()
    turn = PacedTurn(limiter, principal, tokens=tokens, requests=requests, taken=slot)
    try:
        await turn.give_back_rate()
    finally:
        await slot.give_back()


def cert_common_name(context: CallContext) -> str | None:
    """The subject common name of the caller's verified TLS certificate, if any.

    Raises:
        Unauthenticated: the subject names more than one: grpc reports the first, other
            tools the last, so which tenant it means is not the gateway's to choose.
    """
    try:
        auth_context = context.auth_context()
        values = auth_context.get("x509_common_name") or []
        subjects = auth_context.get("x509_subject") or []
    except (AttributeError, TypeError, ValueError):
        return None
    if any(_common_names_in(_text(subject)) > 1 for subject in subjects):
        raise Unauthenticated(
            "the client certificate's subject names more than one common name (CN)"
        )
    for value in values:
        name = _text(value)
        if name:
            return name
    return None


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _common_names_in(subject: str) -> int:
    """How many CN attributes an RFC 2253 subject (grpc's `x509_subject`, such as
    `CN=a,O=b` or `CN=a+CN=b`) holds; a `,` or `+` after a backslash is in a value.
    By hand: the runtime has no X.509 library, and this is the one question asked."""
    count, start, index = 0, 0, 0
    while index <= len(subject):
        char = subject[index] if index < len(subject) else ","
        if char == "\\":
            index += 2
            continue
        if char in ",+":
            kind = subject[start:index].partition("=")[0].strip().upper()
            count += kind in ("CN", "2.5.4.3")
            start = index + 1
        index += 1
    return count


def _is_unmetered(limits: TenantConfig) -> bool:
    """Whether a tenant may use every model without any per-minute or concurrency limit."""
    return not (limits.allowed_models or limits.has_rate_limits)


class CallerGate:
    """Authenticates, authorizes and meters one call (see the module docstring)."""

    def __init__(
        self,
        authenticator: Authenticator,
        limiter: TenantLimiter,
        *,
        batch_leave_share: float = 0.0,
    ) -> None:
        self._authenticator = authenticator
        self._limiter = limiter
        self._batch_leave_share = batch_leave_share
        # Each tenant's line of batch items and summary calls waiting for its limits
        # (`BatchPacer`), kept while a call of the tenant paces its calls.
        self._lines: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    @property
    def limiter(self) -> TenantLimiter:
        """Where the tenants' rate limits and concurrent calls are counted."""
        return self._limiter

    @property
    def checks_nothing(self) -> bool:
        """Whether every call would pass as the anonymous `default` tenant, unlimited: the
        boundary can then skip the gate (auth off, no keys, no limits on `default`)."""
        authenticator = self._authenticator
        return authenticator.names_every_caller_default and _is_unmetered(
            authenticator.principal(DEFAULT_TENANT, is_authenticated=False).limits
        )

    async def authenticate(self, context: CallContext) -> Principal:
        """Who is calling, for this call (`current_tenant`), or raise a `GatewayError`
        (`Unauthenticated`; `UpstreamUnavailable` while the key store cannot answer)."""
        authenticator = self._authenticator
        # grpc builds the whole auth context anew on each call: ask only when it is used.
        common_name = cert_common_name(context) if authenticator.uses_certificates else None
        principal = await authenticator.authenticate(
            context.invocation_metadata() or (), cert_common_name=common_name
        )
        _principal.set(principal)
        return principal

    def _pace(self, principal: Principal) -> None:
        """Have this call's upstream calls take `principal`'s per-minute limits and call
        slots as they start (`current_pacer`), in the tenant's line; for this call only,
        as `_principal` (each RPC runs in a task of its own)."""
        line = self._lines.get(principal.tenant)
        if line is None:
            line = self._lines[principal.tenant] = asyncio.Lock()
        _pacer.set(
            BatchPacer(self._limiter, principal, leave_share=self._batch_leave_share, line=line)
        )

    @contextlib.asynccontextmanager
    async def admit(
        self,
        request: Any,
        principal: Principal,
        *,
        check: Callable[[Any], int | None] | None = None,
    ) -> AsyncIterator[CallSlot]:
        """Admit the authenticated call for the body of the `async with`, or raise a
        `GatewayError`; the call's slot of its tenant's concurrent calls is handed out,
        for a stalled stream to give back early.

        `check` raises what the call would be refused with before any upstream call (an
        invalid field, an unknown model): asked before the call takes any of its tenant's
        limits, as a batch's items are. It returns the tokens `tokens_per_minute` counts
        when the call sends less than its request holds (truncation dropped turns), else
        None.
        """
        if _is_unmetered(principal.limits) and not isinstance(request, UndecodableRequest):
            yield NO_SLOT  # nothing to check or count: skip estimating the request's tokens
            return
        # Estimated only once `check` passed: a request refused by its count (millions of
        # messages) would otherwise take seconds here, as though never refused at once.
        demand = demand_of(request, estimate=False)
        for model in demand.models:
            check_model_allowed(principal, model)
        limits = principal.limits
        sent_tokens = None
        if check is not None and (demand.is_paced or demand.requests):
            # Before any of its tenant's limits is taken: a refused call makes no upstream
            # call, so it takes no quota, and a bad field (or a batch refused as a whole) is
            # the caller's to fix, not a RESOURCE_EXHAUSTED for max_concurrent_calls or a
            # tokens_per_minute "never fits" to give up on.
            sent_tokens = check(request)
        if demand.is_paced:
            # No slot for the batch itself: each item takes its own (`BatchPacer`).
            if limits.has_rate_limits:
                self._pace(principal)
            yield NO_SLOT
            return
        if not demand.requests:
            yield NO_SLOT
            return
        if demand.paces_tokens:
            # A Summarize takes its request now, and no slot: each of its calls takes its
            # tokens and a slot as it starts, as a batch's items do; a document of more
            # than a minute's allowance then runs at the tenant's rate.
            taken = await self._limiter.take_rate(principal.tenant, limits, tokens=0, requests=1)
            if limits.tokens_per_minute or limits.max_concurrent_calls:
                self._pace(principal)
            try:
                yield NO_SLOT
            except (GatewayError, asyncio.CancelledError) as ended:
                # None of its calls was sent, refused or cancelled (`Summarizer.summarize`).
                if ended_unsent(ended):
                    await self._limiter.give_back_rate(
                        principal.tenant, limits, tokens=0, requests=1, taken=taken
                    )
                raise
            return
        # KEEP_RECENT sends what fits the window: a long history the caller keeps sending
        # would otherwise count in full, and once past a minute's tokens "never fit".
        tokens = _tokens_of(request) if sent_tokens is None else sent_tokens
        async with self._limiter.admit(
            principal.tenant, limits, tokens=tokens, requests=demand.requests
        ) as slot:
            try:
                yield slot
            except (GatewayError, asyncio.CancelledError) as ended:
                # Refused before any upstream call (its budget; the pool's limits, open
                # breakers, the drain), as a bad field is, or cancelled by its caller while
                # it waited there: the call takes none of its tenant's minute, nor answers a
                # retry with its rate's refusal. Unless its admission took none (the store's
                # cool-down, `NOTHING_TAKEN`): nothing is given back then.
                if ended_unsent(ended):
                    await self._limiter.give_back_rate(
                        principal.tenant,
                        limits,
                        tokens=tokens,
                        requests=demand.requests,
                        taken=slot,
                    )
                raise
