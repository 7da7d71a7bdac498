"""The edge of every RPC: admission and error mapping, wrapped once at startup.

Each servicer method is wrapped when the server is built rather than through a
per-call interceptor, which costs an extra coroutine on every call. The wrapper admits
the call (or sheds it with RESOURCE_EXHAUSTED at once), and turns any exception into a
gRPC status with `google.rpc` details via `errors.to_rpc_status`. It also opens the
RPC's server span (continuing the caller's trace context) and ends every call, success
or failure, with the `llm-gateway-overhead-ms` trailer: the time not spent upstream.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import functools
import inspect
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Collection, Iterator, Sequence
from typing import Any, Literal, NoReturn, TypeAlias

import grpc
from google.protobuf import message_factory
from grpc_status import rpc_status

from service.auth import DEFAULT_TENANT, Principal
from service.caller_gate import CallerGate, UndecodableRequest, current_tenant
from service.errors import (
    INTERNAL_ERROR_REASON,
    CallerStalled,
    DeadlineExceeded,
    FieldViolation,
    GatewayError,
    InvalidRequest,
    Overloaded,
    ShuttingDown,
    internal_error_status,
    pushback_trailer,
    retry_elsewhere_trailer,
    to_rpc_status,
)
from service.telemetry import RpcScope
from service.telemetry import active as telemetry
from service.tenant_limits import NO_SLOT, CallSlot

log = logging.getLogger("llm_gateway.rpc")

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
UnaryHandler: TypeAlias = Callable[[Any, Context], Awaitable[Any]]
StreamHandler: TypeAlias = Callable[[Any, Context], AsyncGenerator[Any, None]]
# Raises what a request would be refused with before any upstream call; returns the
# tokens the tenant's tokens_per_minute counts when the call sends less than its request
# holds, else None (`CallerGate.admit`).
RequestCheck: TypeAlias = Callable[[Any], int | None]


# What `Admission.enter` hands out and `leave` takes back: the call's task (None only
# outside a task), so that `leave` need not look it up again.
CallTicket: TypeAlias = "asyncio.Task[Any] | None"
# How a call is ended from outside its task (`Admission.tell_cut_off`): its context and
# its RPC's scope.
CallEnding: TypeAlias = "tuple[Context, RpcScope] | None"


class Admission:
    """Bounds calls in flight and calls queued for a slot; refuses the rest immediately.

    Up to `max_in_flight` calls run; up to `max_queued` more wait (first come, first
    served) for one of them to finish; a call beyond both is shed at once with
    `Overloaded` (RESOURCE_EXHAUSTED, RetryInfo, `grpc-retry-pushback-ms`), never after
    a timeout. A queued call still honours its own deadline and cancellation.

    It also knows each admitted or queued call's task, and each still `arriving` (its
    caller being authenticated, before it asks for a slot), so that a stopping server
    waits for them and can end the calls still running as its grace runs out (`cut_off`)
    with a status that says why, rather than grpc's bare UNAVAILABLE. Once it stops
    (`begin_stopping`) no call queues.
    """

    def __init__(self, *, max_in_flight: int, retry_after_s: float, max_queued: int = 0) -> None:
        self.max_in_flight = max_in_flight
        self.max_queued = max_queued
        self.retry_after_s = retry_after_s
        self.in_flight = 0
        self.arriving = 0
        # Each queued call's slot: True once handed a slot, False if refused (stopping).
        self._queue: collections.deque[asyncio.Future[bool]] = collections.deque()
        self._calls: dict[asyncio.Task[Any], CallEnding] = {}
        self._cut_off: dict[asyncio.Task[Any], CallEnding] = {}
        self._telling: set[asyncio.Future[None]] = set()  # `tell_cut_off`'s
        self.is_stopping = False

    @property
    def queued(self) -> int:
        """Calls waiting for a slot."""
        return len(self._queue)

    @property
    def is_idle(self) -> bool:
        """Whether no call is arriving, running or queued."""
        return not (self.in_flight or self.queued or self.arriving)

    @contextlib.contextmanager
    def arriving_call(self, ending: CallEnding = None) -> Iterator[None]:
        """The calling task's call is on its way to `enter` (its caller's key may take a
        key store's round trip): counted in `arriving` and ended by `cut_off` meanwhile.

        At most as many arrive at once as the server would hold (in flight and queued):
        beyond that, `Overloaded` at once, so a flood of made-up keys cannot open ever
        more key store lookups. A call without a key passes through without waiting.
        """
        if self.arriving >= self.max_in_flight + self.max_queued:
            raise Overloaded(retry_after_s=self.retry_after_s)
        task = asyncio.current_task()
        self.arriving += 1
        if task is not None:
            self._calls[task] = ending
        try:
            yield
        finally:
            self.arriving -= 1
            if task is not None:
                self._calls.pop(task, None)

    async def enter(self, ending: CallEnding = None) -> CallTicket:
        """Admit the calling task's call, queueing it while there is room, or raise
        `Overloaded`. Give the ticket back to `leave` once the call is done. `ending`:
        how a cut that its cleanup outlasts tells it (`tell_cut_off`).

        Raises:
            Overloaded: every slot is taken and the queue is full.
            ShuttingDown: the server is stopping (`begin_stopping`) and the call would
                queue, or it was queued as the server began to.
        """
        ticket = self.enter_at_once(ending)
        if ticket is not False:  # a slot came free since the caller found none
            return ticket
        task = asyncio.current_task()
        if self.is_stopping:
            raise ShuttingDown()
        if len(self._queue) >= self.max_queued:
            raise Overloaded(retry_after_s=self.retry_after_s)
        slot: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queue.append(slot)
        if task is not None:
            self._calls[task] = ending
        try:
            is_admitted = await slot
        except BaseException:
            if slot.done() and not slot.cancelled() and slot.result():
                self.leave(task)  # a slot was handed to us as we gave up: pass it on
            else:
                if task is not None:
                    self._calls.pop(task, None)
                with contextlib.suppress(ValueError):
                    self._queue.remove(slot)
            raise
        if not is_admitted:
            if task is not None:
                self._calls.pop(task, None)
            raise ShuttingDown()
        return task

    def enter_at_once(self, ending: CallEnding = None) -> CallTicket | Literal[False]:
        """`enter` for a call that finds a slot free, as most do: admitted without an
        await. False, admitting nothing, when every slot is taken or calls queue for one
        (a call entering now would queue, or be shed): `enter` then decides which."""
        if self.in_flight >= self.max_in_flight or self._queue:
            return False
        task = asyncio.current_task()
        self.in_flight += 1
        if task is not None:
            self._calls[task] = ending
        return task

    def begin_stopping(self) -> None:
        """The server is stopping: the calls queued for a slot are refused with
        `ShuttingDown` (UNAVAILABLE, the retry-elsewhere trailer), and so is any call that
        would queue from now on; one that finds a slot free still runs.

        None of them has started, and another replica may take them at once: queued on
        here, each would be handed the slot of a call that ends, then sent into the drain
        or cut at the grace's end.
        """
        self.is_stopping = True
        queued, self._queue = self._queue, collections.deque()
        for slot in queued:
            if not slot.done():
                slot.set_result(False)

    def answered(self) -> None:
        """The calling task's call has its answer (the upstream or the cache gave it):
        `cut_off` leaves it to finish.

        What remains is bookkeeping (the ledger row, the budget release, the reply), and
        a cut there would tell the caller to retry elsewhere a call already served, and
        paid for.
        """
        task = asyncio.current_task()
        if task is not None:
            self._calls.pop(task, None)

    def cut_off(self) -> int:
        """Cancel every admitted, queued or arriving call not cancelled or answered yet;
        returns how many.

        For a stopping server as its grace runs out: the boundary ends each call
        cancelled here with `ShuttingDown`, which callers may retry at once elsewhere.
        A call already being cancelled (by an earlier cut, or as its caller left or its
        deadline passed) is left to finish its cleanup, and stays what it was; so is a
        call that has its answer (`answered`).
        """
        cut = [(t, e) for t, e in self._calls.items() if not t.done() and not t.cancelling()]
        for task, ending in cut:
            self._cut_off[task] = ending
            task.cancel()
        return len(cut)

    def tell_cut_off(self) -> None:
        """Send `ShuttingDown` now to each call cut off that has not ended yet.

        A cut call records what it was billed, and gives back its tenant's slot, before
        it ends itself with that status: a hung Redis holds each of those for its
        timeout, past the grace, and grpc then ended the call with a bare UNAVAILABLE
        (no details, no retry-elsewhere trailer). Told here its status goes first, and
        its cleanup goes on; for the calls that end themselves in time, their order
        stays: released, then told."""
        for task, ending in self._cut_off.items():
            if ending is not None and not task.done():
                telling = asyncio.ensure_future(_told_shutting_down(*ending))
                self._telling.add(telling)
                telling.add_done_callback(self._telling.discard)

    async def told(self) -> None:
        """Return once every status `tell_cut_off` began is sent (or failed)."""
        await asyncio.gather(*self._telling, return_exceptions=True)

    def was_cut_off(self) -> bool:
        """Whether `cut_off` cancelled the calling task's call."""
        return bool(self._cut_off) and asyncio.current_task() in self._cut_off

    def leave(self, ticket: CallTicket) -> None:
        """The call `enter` gave `ticket` for finished: its slot goes to the oldest
        queued call."""
        if ticket is not None:
            self._calls.pop(ticket, None)
        while self._queue:
            slot = self._queue.popleft()
            if not slot.done():
                slot.set_result(True)  # in_flight is unchanged: the slot changes hands
                return
        self.in_flight -= 1


SERVICE = "llmgateway.v1.CompletionService"
_DEADLINE_EXCEEDED_CODE: int = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]

# Beyond its pending limit (calls waiting for the application; 1000 by default) grpc core
# cancels new calls: a bare CANCELLED, before any handler sees them, that no retry policy
# or proxy retries. The gateway's admission decides instead, with OVERLOADED: the limit
# holds every call it would take and room for a burst past them to reach it and be shed
# (3,000 calls opened at once on 2 cores outran the handlers by over 1,000).
_BURST_ROOM = 10_000
# gRPC channel arguments are C ints, and the hard limit is twice the soft one.
_GRPC_MAX_PENDING = (2**31 - 1) // 2


def pending_call_options(max_in_flight: int, max_queued: int) -> list[tuple[str, int]]:
    """gRPC server options that let every call reach admission: the calls it takes, and
    a burst of those it sheds."""
    pending = min(max_in_flight + max_queued + _BURST_ROOM, _GRPC_MAX_PENDING)
    return [
        ("grpc.server.max_pending_requests", pending),
        ("grpc.server.max_pending_requests_hard_limit", 2 * pending),
    ]


async def abort_with(
    context: Context, exc: BaseException, method: str, rpc: RpcScope | None = None
) -> NoReturn:
    """End the call with the status `exc` maps to."""
    if not isinstance(exc, GatewayError):
        # Unexpected: full detail goes to the server log only, never to the caller.
        log.error("rpc.unexpected_error", exc_info=exc, extra={"method": method})
    else:
        log.debug("rpc.failed", extra={"method": method, "reason": exc.reason})
    try:
        status = rpc_status.to_status(to_rpc_status(exc))
        trailers = (
            tuple(status.trailing_metadata)
            + pushback_trailer(exc, context.time_remaining())
            + retry_elsewhere_trailer(exc)
        )
        error_type = getattr(exc, "reason", "INTERNAL")
    except Exception as mapping_error:
        # A bug in the mapping itself (a detail that cannot be built): left to grpc, the
        # caller would get UNKNOWN with the Python exception's text.
        log.error(
            "rpc.error_mapping_failed",
            exc_info=mapping_error,
            extra={"method": method, "error_type": type(exc).__name__},
        )
        status = rpc_status.to_status(internal_error_status())
        trailers = tuple(status.trailing_metadata)
        error_type = INTERNAL_ERROR_REASON
    if rpc is not None:
        rpc.fail(status_code=status.code.value[0], error_type=error_type)
        trailers += tuple(rpc.trailers())
    await context.abort(status.code, status.details, trailing_metadata=trailers)
    raise AssertionError("context.abort always raises")  # pragma: no cover


class _Watched:
    """One stream `StalledStreams` watches: its messages, when its write began, and what
    to call once they are closed."""

    __slots__ = ("closing", "context", "items", "on_closed", "since")

    def __init__(
        self, items: AsyncGenerator[Any, None], on_closed: Callable[[], Awaitable[None]] | None
    ) -> None:
        self.items = items
        self.on_closed = on_closed
        self.context = contextvars.copy_context()  # the call's: its cleanup runs in it
        self.since: float | None = None  # a message handed to gRPC, not yet written
        self.closing: asyncio.Task[None] | None = None


class StalledStreams:
    """Closes what a streaming call holds once its caller has taken none of its messages
    for `timeout_s`, and ends the call as the caller reads on (`CallerStalled`).

    A caller that stops reading, without cancelling and without a deadline, leaves its
    call's next message waiting on gRPC's flow control for ever, and with it the upstream
    connection the call reads from: enough of them would take an upstream's every
    connection from all callers. The call's messages are closed as when a caller
    cancels (the upstream request ends and is charged as cut), and `on_closed` gives
    back the call's server slot and its tenant's `max_concurrent_calls` slot; the call
    itself waits on in gRPC until its caller reads or leaves, for only gRPC can end it,
    and it does so with no status when its task is cancelled. One sweep, a quarter of
    `timeout_s` apart while any stream runs, looks at the writes in progress, rather
    than a timer for each message; a timer, not a task, so that a stream starting costs
    no more than a dict entry on its way to its first token.

    A caller that stalled at the stream's last message (`is_last`), and then reads it,
    has the whole answer: the call ends as it would have, not `CallerStalled`.
    """

    def __init__(
        self, timeout_s: float, *, is_last: Callable[[Any], bool] = lambda message: False
    ) -> None:
        self.timeout_s = timeout_s
        self._is_last = is_last
        self._watched: dict[asyncio.Task[Any], _Watched] = {}
        self._sweep_timer: asyncio.TimerHandle | None = None

    async def aclose(self) -> None:
        """Stop sweeping (a stream started later starts it again)."""
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
            self._sweep_timer = None

    async def relay(
        self,
        items: AsyncGenerator[Any, None],
        on_closed: Callable[[], Awaitable[None]] | None = None,
    ) -> AsyncGenerator[Any, None]:
        """`items`, each handed on to the caller; or `CallerStalled` once they were closed
        (and `on_closed` called) for a caller that took none for `timeout_s`."""
        task = asyncio.current_task()
        watched = _Watched(items, on_closed)
        if task is not None:  # outside a task nothing waits on gRPC's flow control
            self._watched[task] = watched
            if self._sweep_timer is None:
                self._sweep_timer = asyncio.get_running_loop().call_later(
                    self.timeout_s / 4, self._sweep
                )
        try:
            async for item in items:
                watched.since = time.monotonic()
                yield item
                watched.since = None
                if watched.closing is not None:
                    # Shielded: a cancel now (the caller leaving, a shutdown's cut) must
                    # not cut the close short, and the `finally` below waits for it anyway.
                    await asyncio.shield(watched.closing)
                    if self._is_last(item):  # taken: nothing was to follow it
                        break
                    raise CallerStalled(self.timeout_s)
        finally:
            if task is not None:
                del self._watched[task]
            if watched.closing is not None:  # closing them now: not twice at once
                await asyncio.shield(watched.closing)
            await items.aclose()

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        since = time.monotonic() - self.timeout_s
        for watched in self._watched.values():
            if watched.closing is None and watched.since is not None and watched.since <= since:
                watched.closing = loop.create_task(
                    _closed(watched.items, watched.on_closed, self.timeout_s),
                    context=watched.context,
                )
        # Again while any stream runs; the next stream to start starts it otherwise.
        is_watching = bool(self._watched)
        self._sweep_timer = (
            loop.call_later(self.timeout_s / 4, self._sweep) if is_watching else None
        )


async def _closed(
    items: AsyncGenerator[Any, None],
    on_closed: Callable[[], Awaitable[None]] | None,
    timeout_s: float,
) -> None:
    """Close `items`, suspended at a message the caller did not take (in the call's
    context); a failure while closing is logged, as the caller that would hear it is gone."""
    log.warning("rpc.caller_stalled", extra={"tenant": current_tenant(), "timeout_s": timeout_s})
    try:
        await items.aclose()
    except Exception:
        log.exception("rpc.stalled_close_failed")
    finally:
        if on_closed is not None:
            await on_closed()


async def _enter(
    context: Context, method: str, rpc: RpcScope, admission: Admission, gate: CallerGate | None
) -> tuple[Principal | None, CallTicket]:
    """Authenticate the caller, then take a slot; or end the call.

    In this order so that a caller without a valid key is refused at once and never holds
    or queues for a slot that other callers wait for.
    """
    try:
        principal = None
        if gate is not None:
            with admission.arriving_call((context, rpc)):
                principal = await gate.authenticate(context)
            rpc.set_tenant(principal.tenant)  # on the span even if the call is then shed
        ticket = admission.enter_at_once((context, rpc))  # most calls: a slot at once
        if ticket is False:
            ticket = await _queued_for_slot(admission, context, rpc)
        return principal, ticket
    except asyncio.CancelledError:
        await _end_if_cut_off(context, method, rpc, admission)
        raise
    except Exception as exc:  # Unauthenticated, Overloaded, the key store down, a bug
        await abort_with(context, exc, method, rpc)


async def _queued_for_slot(admission: Admission, context: Context, rpc: RpcScope) -> CallTicket:
    """A slot of a full `admission` (or `Overloaded`): the wait for one in its queue is
    the call's queued time (`Timings.queued_ms`). Timed only when it queues."""
    queued_from = time.perf_counter()  # the clock `RpcScope` reads
    ticket = await admission.enter((context, rpc))
    rpc.queued_s += time.perf_counter() - queued_from
    return ticket


def _caller(
    request: Any,
    principal: Principal | None,
    gate: CallerGate | None,
    check: RequestCheck | None = None,
) -> contextlib.AbstractAsyncContextManager[CallSlot]:
    """Authorize and meter the authenticated call (see `service.caller_gate`); the call's
    slot of its tenant's concurrent calls is handed out."""
    if gate is not None and principal is not None:
        return gate.admit(request, principal, check=check)
    _refuse_undecodable(request)
    return contextlib.nullcontext(NO_SLOT)


def _refuse_undecodable(request: Any) -> None:
    """`InvalidRequest` for bytes that did not decode as the method's message."""
    if isinstance(request, UndecodableRequest):
        raise InvalidRequest([FieldViolation("request", "not a valid message")])


async def _end_if_cut_off(
    context: Context, method: str, rpc: RpcScope, admission: Admission
) -> None:
    """End a call that shutdown cancelled (`Admission.cut_off`) with `ShuttingDown`; any
    other cancellation (the caller's, grpc's) goes on as it is.

    grpc cancels a call whose deadline passed, and its caller gets DEADLINE_EXCEEDED:
    that is what the span and `llm_gateway.requests` record, not the caller's cancel.
    """
    if admission.was_cut_off():
        if context.done():  # told already, its cleanup outlasting the cut (`tell_cut_off`)
            return
        await abort_with(context, ShuttingDown(), method, rpc)
    _end_if_past_deadline(context, rpc)


async def _told_shutting_down(context: Context, rpc: RpcScope) -> None:
    """End the call of `context` with `ShuttingDown` from outside its task, unless it has
    ended already."""
    if context.done():
        return
    try:
        await abort_with(context, ShuttingDown(), rpc.method, rpc)
    except grpc.aio.AbortError:
        pass  # what `abort` raises once it sent the status
    except Exception:  # the caller gone meanwhile: there is nobody to tell
        log.debug("rpc.cut_off_untold", exc_info=True)


def _end_if_past_deadline(context: Context, rpc: RpcScope) -> None:
    """Record DEADLINE_EXCEEDED, as the caller is told, when the call's deadline passed."""
    if context.time_remaining() == 0:  # None: the call has no deadline
        rpc.fail(status_code=_DEADLINE_EXCEEDED_CODE, error_type=DeadlineExceeded.reason)


def _guard_unary(
    method: UnaryHandler,
    name: str,
    admission: Admission,
    gate: CallerGate | None = None,
    check: RequestCheck | None = None,
) -> UnaryHandler:
    @functools.wraps(method)
    async def guarded(request: Any, context: Context) -> Any:
        metadata = context.invocation_metadata() or ()
        with telemetry().rpc(service=SERVICE, method=name, metadata=metadata) as rpc:
            # No caller to authenticate and a slot free (most calls): `_enter` skipped.
            if gate is None and (ticket := admission.enter_at_once((context, rpc))) is not False:
                principal = None
            else:
                principal, ticket = await _enter(context, name, rpc, admission, gate)
            try:
                if gate is None:  # nothing to admit (see `guard_servicer`): no `async with`
                    if isinstance(request, UndecodableRequest):  # checked here: a frame less
                        _refuse_undecodable(request)
                    if rpc.is_recording:  # the tenant is for the span: not named for none
                        # No caller authenticated: `default`, as `current_tenant()` reads
                        # then, without its two calls.
                        rpc.set_tenant(DEFAULT_TENANT)
                    response = await method(request, context)
                else:
                    async with _caller(request, principal, gate, check):
                        if principal is None and rpc.is_recording:
                            rpc.set_tenant(DEFAULT_TENANT)  # no caller authenticated
                        response = await method(request, context)
            except asyncio.CancelledError:
                await _end_if_cut_off(context, name, rpc, admission)
                raise
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await abort_with(context, exc, name, rpc)
            finally:
                admission.leave(ticket)
            context.set_trailing_metadata(rpc.trailers())
            return response

    return guarded


class _ServerSlot:
    """A stream's slot of `Admission`, given back once: when the call ends, or earlier,
    with its tenant's slot (`let_go`), when `StalledStreams` has closed what it held."""

    __slots__ = ("admission", "is_held", "tenant_slot", "ticket")

    def __init__(self, admission: Admission, ticket: CallTicket) -> None:
        self.admission = admission
        self.ticket = ticket
        self.is_held = True
        self.tenant_slot = NO_SLOT  # the call's, once the gate admitted it

    def leave(self) -> None:
        if self.is_held:
            self.is_held = False
            self.admission.leave(self.ticket)

    async def let_go(self) -> None:
        """Give back the server's slot and the tenant's, each once: the call holds
        neither while it waits on for its stalled caller."""
        self.leave()
        await self.tenant_slot.give_back()


def _guard_stream(
    method: StreamHandler,
    name: str,
    admission: Admission,
    gate: CallerGate | None = None,
    check: RequestCheck | None = None,
    *,
    stalls: StalledStreams | None = None,
) -> StreamHandler:
    @functools.wraps(method)
    async def guarded(request: Any, context: Context) -> AsyncGenerator[Any, None]:
        metadata = context.invocation_metadata() or ()
        with telemetry().rpc(service=SERVICE, method=name, metadata=metadata) as rpc:
            # No caller to authenticate and a slot free (most calls): `_enter` skipped.
            if gate is None and (ticket := admission.enter_at_once((context, rpc))) is not False:
                principal = None
            else:
                principal, ticket = await _enter(context, name, rpc, admission, gate)
            slot = _ServerSlot(admission, ticket)
            try:
                async with _caller(request, principal, gate, check) as tenant_slot:
                    slot.tenant_slot = tenant_slot
                    if principal is None and rpc.is_recording:
                        rpc.set_tenant(DEFAULT_TENANT)  # no caller authenticated
                    # Closed here, not by the garbage collector, however the call ends.
                    messages = method(request, context)
                    if stalls is not None:
                        messages = stalls.relay(messages, on_closed=slot.let_go)
                    async with contextlib.aclosing(messages) as items:
                        async for item in items:
                            yield item
            except asyncio.CancelledError:
                await _end_if_cut_off(context, name, rpc, admission)
                raise
            except GeneratorExit:
                # grpc cancelled its own write (its caller not reading) and closes this
                # generator after its handler ended: at the deadline, that is what it was.
                _end_if_past_deadline(context, rpc)
                raise
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await abort_with(context, exc, name, rpc)
            finally:
                slot.leave()
            context.set_trailing_metadata(rpc.trailers())

    return guarded


def guard_servicer(
    servicer: object,
    method_names: list[str],
    admission: Admission,
    gate: CallerGate | None = None,
    check: RequestCheck | None = None,
    *,
    stalls: StalledStreams | None = None,
) -> None:
    """Wrap each named RPC method of `servicer` in place (before it is registered).

    `check` goes to the gate (`CallerGate.admit`); `stalls` ends streams whose caller
    stopped reading.
    """
    for name in method_names:
        method = getattr(servicer, name)
        if inspect.isasyncgenfunction(method):
            guarded = _guard_stream(method, name, admission, gate, check, stalls=stalls)
            setattr(servicer, name, guarded)
        else:
            setattr(servicer, name, _guard_unary(method, name, admission, gate, check))


def _tolerant_parser(message_class: Any) -> Callable[[bytes], Any]:
    """`message_class.FromString`, except that undecodable bytes become a stand-in.

    gRPC would answer a request that fails to parse (invalid UTF-8 in a string field,
    a corrupt wire format) with UNKNOWN and the parser's exception text; the stand-in
    lets the boundary answer INVALID_ARGUMENT with a `BadRequest` instead.
    """
    full_name = message_class.DESCRIPTOR.full_name

    def parse(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except Exception:  # DecodeError and friends: the bytes are the caller's problem
            return UndecodableRequest(full_name)

    return parse


def add_service(
    server: grpc.aio.Server,
    servicer: object,
    service: Any,
    *,
    registered: Collection[str] | None = None,
) -> None:
    """Register every method of `service` (a ServiceDescriptor) on `servicer`.

    Does what the generated `add_*Servicer_to_server` does, except that request
    parsing is `_tolerant_parser`'s, and that only the methods named in `registered`
    (all of them when None) go on grpc's registered-method path; the others are found
    through the generic handler, as `GenericOnly` leaves a service's.
    """
    handlers = {}
    for method in service.methods:
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        factory = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = factory(
            getattr(servicer, method.name),
            request_deserializer=_tolerant_parser(request_class),
            response_serializer=response_class.SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    if registered is not None:
        handlers = {name: handlers[name] for name in registered}
    server.add_registered_method_handlers(service.full_name, handlers)


class GenericOnly:
    """A server as a generated `add_*Servicer_to_server` sees it, that registers the
    service's methods with the generic handler only, not on grpc's registered-method path.

    grpc.aio's server waits for its next call with `asyncio.wait` over one pending task
    per registered method, and one for everything else, and sets that wait up again
    after every call it accepts: each registered method costs every call about nine
    Python calls (the wait's checks, done callbacks added and removed), whichever
    method the call is for. A method called now and then (health, reflection) is
    found through the generic handler as quickly as it needs to be.
    """

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Sequence[Any]) -> None:
        self._server.add_generic_rpc_handlers(generic_rpc_handlers)

    def add_registered_method_handlers(self, service_name: str, handlers: Any) -> None:
        """Left to the generic handler the same call registers."""
