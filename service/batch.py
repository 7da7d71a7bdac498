"""CompleteBatch: many completions at bounded concurrency, each result as it finishes.

One item's failure is that item's result, never the batch's: every exception of an
item becomes its outcome (mapped to a status by the servicer). Cancelling the call
cancels the task group, and with it every upstream request still in flight.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from service.clock import Deadline
from service.config import BatchConfig
from service.domain import ChatRequest, Completion, Usage
from service.errors import (
    BudgetExceeded,
    ContextWindowExceeded,
    DeadlineExceeded,
    FieldViolation,
    GatewayError,
    InvalidRequest,
    ShuttingDown,
    UpstreamError,
    quoted,
)
from service.ledger import PICO, to_pico
from service.pipeline import Pace, Pipeline, PreparedRequest, Turn, paced, unpaced
from service.retry import reopen_wait_s, says_why
from service.validation import CALLER_ID_RULE, chat_request_violations, is_caller_id

_MS = 1000.0
log = logging.getLogger("llm_gateway.batch")


@dataclass(frozen=True, slots=True)
class BatchItem:
    """One item of a batch; `violations` are problems only visible on the wire,
    `refusal` why its caller may not run it (a model its tenant may not use), and
    `tokens` what its tenant's `tokens_per_minute` counts for it as prepared (the
    messages sent, when truncation dropped some): estimated only for an item that
    passed every check, as a refused one takes no tokens."""

    id: str
    request: ChatRequest
    violations: tuple[FieldViolation, ...] = ()
    refusal: GatewayError | None = None
    tokens: Callable[[PreparedRequest], int] = lambda prepared: 0


@dataclass(frozen=True, slots=True)
class ItemOutcome:
    """How one item ended: a completion, or the exception that failed it."""

    index: int
    id: str
    completion: Completion | None = None
    error: Exception | None = None


@dataclass(frozen=True, slots=True)
class BatchTotals:
    """The closing summary of a batch."""

    succeeded: int
    failed: int
    usage: Usage = field(default_factory=Usage)
    cost_usd: float = 0.0
    wall_ms: float = 0.0


class _Identified(Protocol):
    @property
    def id(self) -> str: ...


def check_batch(items: Sequence[_Identified], concurrency: int, limits: BatchConfig) -> int:
    """Validate the batch as a whole (its items as they came: nothing but their ids is
    read); return the concurrency to use.

    Problems of single items are not checked here: they fail only their item.
    """
    violations: list[FieldViolation] = []
    if len(items) > limits.max_items:
        violations.append(
            FieldViolation("items", f"at most {limits.max_items} items, got {len(items)}")
        )
    if concurrency > limits.max_concurrency:
        violations.append(
            FieldViolation("concurrency", f"at most {limits.max_concurrency}, got {concurrency}")
        )
    seen: set[str] = set()
    # Over the limit, 4 MB of empty items are two million: the first are enough to read.
    for index, item in enumerate(items[: limits.max_items + 1]):
        # Sent back with the item's result, for the caller's tools to match: one line.
        if not is_caller_id(item.id):
            violations.append(FieldViolation(f"items[{index}].id", CALLER_ID_RULE))
        elif item.id and item.id in seen:
            violations.append(
                FieldViolation(f"items[{index}].id", f"duplicate id {quoted(item.id)}")
            )
        seen.add(item.id)
    if violations:
        raise InvalidRequest(violations)
    return concurrency or limits.default_concurrency


async def run_batch(
    pipeline: Pipeline,
    items: Sequence[BatchItem],
    *,
    concurrency: int,
    deadline: Deadline,
    pace: Pace | None = None,
) -> AsyncGenerator[ItemOutcome | BatchTotals, None]:
    """Yield each item's outcome as it finishes, then the `BatchTotals`.

    At most `concurrency` items are in flight. Each try of a valid item runs within
    `pace` (its tokens, the deadline): its turn under its tenant's per-minute limits and
    one of its tenant's call slots, held until its upstream call ends (a try after one
    that was sent takes only a slot: the item's units are spent). Closing or cancelling
    the iterator cancels the items still running (their upstream requests are closed).

    Once the server is stopping no item starts: those running are yielded as they
    finish, then `ShuttingDown` is raised in place of the totals, for the caller to run
    the rest elsewhere (started, they would be cut at the end of the grace, paid for and
    never delivered).

    Raises:
        ShuttingDown: the server stopped before every item started.
    """
    started = time.monotonic()
    semaphore = asyncio.Semaphore(max(1, concurrency))
    # None: an item not started, as the server is stopping.
    finished: asyncio.Queue[ItemOutcome | None] = asyncio.Queue()
    # The drain's refusals of the items it stopped waiting, for the call's own (`_stopped`).
    stopped: list[ShuttingDown] = []
    limits = pipeline.limits

    async def run_one(index: int, item: BatchItem) -> None:
        # The slot is given back once the item's outcome is handed on (below), not as
        # the item ends: a caller that stops reading stops the batch `concurrency` results
        # later, where every item would otherwise run, be paid for and wait in memory.
        await semaphore.acquire()
        if pipeline.is_stopping:
            finished.put_nowait(None)
            return
        try:
            if item.refusal is not None:
                raise item.refusal
            if item.violations:
                raise InvalidRequest(
                    chat_request_violations(item.request, limits, prior=item.violations)
                )
            turn: Turn = unpaced
            if pace is not None:
                # Refuse an invalid item, or one for a model no upstream serves, before
                # it takes any of the tenant's limits: it makes no upstream call.
                turn = paced(pace, item.tokens(pipeline.prepare(item.request)), deadline)
            # Its timings count from the batch's start: its wait for its turn (the
            # batch's concurrency, its tenant's limits) is queued time.
            completion = await _complete_item(
                pipeline, item.request, deadline=deadline, waiting_since=started, turn=turn
            )
        except ShuttingDown as refused:  # it began while the item waited its turn
            stopped.append(refused)
            finished.put_nowait(None)
            return
        except Exception as exc:  # this item's outcome, not the batch's
            if not isinstance(exc, GatewayError):
                log.error("batch.item_unexpected_error", exc_info=exc, extra={"index": index})
            outcome = ItemOutcome(index, item.id, error=exc)
        else:
            outcome = ItemOutcome(index, item.id, completion=completion)
        finished.put_nowait(outcome)

    succeeded = failed = not_started = 0
    usage = Usage()
    # Summed as the ledger sums them, in integer pico-dollars: a float sum drifts.
    cost_pico = 0
    try:
        async with asyncio.TaskGroup() as group:
            for index, item in enumerate(items):
                group.create_task(run_one(index, item))
            for _ in items:
                outcome = await finished.get()
                if outcome is None:
                    not_started += 1
                    semaphore.release()
                    continue
                if outcome.completion is not None:
                    succeeded += 1
                    usage = usage + outcome.completion.usage
                    cost_pico += to_pico(outcome.completion.cost_usd)
                else:
                    failed += 1
                yield outcome  # back once the caller's stream took it
                semaphore.release()
    except BaseExceptionGroup as group_error:
        # Closed at `yield` (gRPC drops a stream cancelled while it sends a result, and
        # the generator is closed when collected): the group cancelled the items and
        # wrapped the GeneratorExit, which `aclose()` must get back as it is.
        closing, rest = group_error.split(GeneratorExit)
        if closing is None or rest is not None:
            raise
        raise GeneratorExit from None
    if not_started:
        raise _stopped(stopped)
    yield BatchTotals(
        succeeded=succeeded,
        failed=failed,
        usage=usage,
        cost_usd=cost_pico / PICO,
        wall_ms=(time.monotonic() - started) * _MS,
    )


def _stopped(refusals: Sequence[ShuttingDown]) -> ShuttingDown:
    """What a batch the drain stopped ends with: the first of its items' refusals that
    names what the item waited after (a restart, its tries' failures), as a Summarize
    names its stopped part's; else a bare one (they waited for their turn, or a limit)."""
    for refused in refusals:
        if refused.names_last_error or refused.attempt_failures:
            return refused
    return ShuttingDown()


async def _complete_item(
    pipeline: Pipeline,
    request: ChatRequest,
    *,
    deadline: Deadline,
    waiting_since: float,
    turn: Turn = unpaced,
) -> Completion:
    """One item's completion. An item refused as its upstream restarts (the local model,
    dead under it or before it), or failed with every upstream of its model kept off by
    its breaker (open, or its probe running), tries again once the restart should answer
    or the first breaker lets a call through (`reopen_wait_s`), as a Summarize part does:
    within the deadline and `resilience.attempts` tries, else it fails with the last
    failure that says why (`says_why`).

    Each try runs in a `turn` of its own (`Pipeline.complete_in_turn`): the wait between
    two, 15 s or more of a breaker's cool-down or a restart, holds none of its tenant's
    call slots, which its tenant's other calls may use meanwhile, and nor does a wait at
    its upstream's limits the length of which is known (a rate, a 429's pause).

    Raises:
        ShuttingDown: the server began stopping while the item waited its turn or for
            the restart.
    """
    attempts = pipeline.config.resilience.attempts
    telling: UpstreamError | None = None
    # Only a try that was sent makes the next a retry, held to the retry budget: the
    # items refused unsent while the model restarts would otherwise find it spent.
    was_sent = False
    # What each upstream attempt of every try failed with, in order: a refusal names them.
    failures: list[str] = []
    for attempt in range(1, attempts + 1):
        try:
            # A try that went back unsent gave its units back as it ended (`in_turn`).
            return await pipeline.complete_in_turn(
                request,
                deadline=deadline,
                waiting_since=waiting_since,
                is_rerun=was_sent,
                turn=turn,
                was_sent=was_sent,
            )
        # Refused before this try was sent: unsent only if no earlier try was, and
        # naming the earlier tries' failures with this one's.
        except (ShuttingDown, BudgetExceeded, DeadlineExceeded, ContextWindowExceeded) as refused:
            refused.is_unsent = refused.is_unsent and not was_sent
            refused.attempt_failures = (*failures, *refused.attempt_failures)
            raise
        except UpstreamError as exc:
            if says_why(exc):
                telling = exc
            failures.extend(exc.attempt_failures)
            waited_after = exc
            was_sent = was_sent or not exc.is_unsent
            wait_s = reopen_wait_s(exc)
            left = deadline.remaining_s()
            if wait_s is None or attempt == attempts or (left is not None and left <= wait_s):
                failure = exc if telling is None else telling
                # Refused unsent (its upstreams' limits, open breakers), as its tries were.
                failure.is_unsent = not was_sent
                if failure is exc:
                    raise
                raise failure from exc
        # Ended by the server's stop: the caller runs the item elsewhere, as one not
        # started (another replica's upstream is not restarting), told what it waited for.
        try:
            await pipeline.pause(wait_s, last_error=waited_after, is_unsent=not was_sent)
        except ShuttingDown as refused:
            refused.attempt_failures = tuple(failures)
            raise
    raise AssertionError("the retry loop always returns or raises")  # pragma: no cover


__all__ = ["BatchItem", "BatchTotals", "ItemOutcome", "check_batch", "run_batch"]
