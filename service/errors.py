"""The gateway's exception tree and its single mapping to gRPC status.

    GatewayError
    ├── InvalidRequest            INVALID_ARGUMENT  (BadRequest field violations)
    │   ├── ContextWindowExceeded INVALID_ARGUMENT  (estimate and limit in the violation)
    │   └── ToolsUnsupported      INVALID_ARGUMENT  (tools to a model none of whose
    │                                                upstreams takes them)
    ├── ModelNotFound             NOT_FOUND         (ErrorInfo)
    ├── ServiceUnknown            NOT_FOUND         (ErrorInfo: a health Check's service)
    ├── Unauthenticated           UNAUTHENTICATED   (ErrorInfo)
    ├── PermissionDenied          PERMISSION_DENIED (ErrorInfo)
    ├── QuotaExceeded             RESOURCE_EXHAUSTED (QuotaFailure, RetryInfo, pushback trailer)
    │   ├── BudgetExceeded        RESOURCE_EXHAUSTED (QuotaFailure, RetryInfo, pushback trailer)
    │   └── Overloaded            RESOURCE_EXHAUSTED (RetryInfo, pushback trailer)
    ├── DeadlineExceeded          DEADLINE_EXCEEDED
    └── UpstreamError             UNAVAILABLE       (ErrorInfo naming upstream, RetryInfo, pushback)
        ├── UpstreamRateLimited   RESOURCE_EXHAUSTED (RetryInfo from Retry-After)
        ├── UpstreamUnavailable   5xx, reset, refused, malformed or cut stream
        │   └── UpstreamNotOpenAI a 200 that is no OpenAI answer at all, or a 404 for a path
        │                         the server does not route: a wrong base_url
        ├── UpstreamAuthRejected  401/402/403: the upstream's key or account, not the caller's
        ├── UpstreamRejected      INVALID_ARGUMENT: 400/404/422, the request itself, with
        │   │                     what the upstream said of it (`RelayedError`)
        │   ├── UpstreamLacksModel a 404 (or a 400 saying so): no such model there, failed over
        │   └── UpstreamTemplateRefused the local model's chat template refused the messages
        │                         (its HTTP 500): failed over
        ├── UpstreamTimeout       the upstream took longer than its timeout
        └── SummarizePartFailed   one part of a Summarize still failed after its retries

Errors carry fields, never formatted secrets: messages name upstreams by their
configured name only, never by URL or key.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Self

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

ERROR_DOMAIN = "llmgateway.v1"
INTERNAL_ERROR_REASON = "INTERNAL_ERROR"
RETRY_PUSHBACK_TRAILER = "grpc-retry-pushback-ms"
# Sent with a refusal another replica may not give (this one is full, stopping, or at its
# own limit for every upstream of the model), so a proxy in front of the replicas
# (deploy/envoy) retries only those on another one.
RETRY_ELSEWHERE_TRAILER = "llm-gateway-retry-elsewhere"
# What clients/service_config.json retries.
_RETRIED_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
# The longest wait pushed back to a call without a deadline; a longer one is "do not
# retry", and the caller gets the refusal, with its RetryInfo, at once.
MAX_PUSHBACK_S = 300.0
# A status travels in trailers, which gRPC clients refuse past 8-16 KiB by default (as
# RESOURCE_EXHAUSTED, the details lost): a status names at most this many violations,
# each described in at most this many characters.
MAX_REPORTED_VIOLATIONS = 10
_MAX_DESCRIPTION_CHARS = 300
# What a status repeats of a value the caller sent (a model name before it is validated).
_MAX_ECHOED_CHARS = 100
# A status names the failures of at most this many of a call's attempts, the first ones,
# then says how many more there were: a call may be retried hundreds of times.
MAX_REPORTED_ATTEMPTS = 5
# What a status says of one attempt's failure without an HTTP status: its message, cut.
_MAX_ATTEMPT_FAILURE_CHARS = 60


def clipped(value: str) -> str:
    """`value` cut to its first 100 characters, with "..." when it was longer."""
    return value if len(value) <= _MAX_ECHOED_CHARS else value[:_MAX_ECHOED_CHARS] + "..."


def quoted(value: str) -> str:
    """`value` quoted for an error message and cut like `clipped`: `'gpt-4o'`, `'aaaa'...`."""
    if len(value) <= _MAX_ECHOED_CHARS:
        return repr(value)
    return repr(value[:_MAX_ECHOED_CHARS]) + "..."


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One invalid request field: its path (e.g. `messages[2].role`) and what is wrong."""

    field: str
    description: str


class GatewayError(Exception):
    """Root of every error the gateway reports to a caller."""

    grpc_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL
    reason: ClassVar[str] = "INTERNAL"
    # No retry can mend it, however long it waits: only an operator can.
    is_retry_futile: bool = False
    # Said by this replica alone: another one may well take the call.
    is_replica_local: bool = False
    # Refused before any upstream attempt of the call was begun: no upstream can have it,
    # so the per-minute units its tenant's limits took for it go back (`CallerGate.admit`,
    # `Pipeline.in_turn`). False where one may have been sent. Set on an `UpstreamError`
    # by the pool (its limits, open breakers, every upstream ruled out; its
    # `DeadlineExceeded` too), by a batch's item or a Summarize's part none of whose tries
    # was, or by a Summarize none of whose calls was. Each caller sharing a call (single
    # flight) gets its own copy of the error (`__copy__`) to set it on.
    is_unsent: bool = False
    # What each upstream attempt of the call failed with, in order, as `upstream: failure`
    # (`attempt_failure`), set by the pool (a Summarize's part, by its tries): the status
    # says them all when there were several, the decisive one last, whatever ended the
    # call (an upstream's failure, the caller's deadline, the drain).
    attempt_failures: tuple[str, ...] = ()

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __copy__(self) -> Self:
        """The same error (its fields, cause and traceback) as an object of its own, whose
        flags (`is_unsent`) one caller may set without changing another's: each caller
        sharing an upstream call (single flight) gets one. Not through the constructor,
        whose arguments most subclasses do not keep."""
        clone = type(self).__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.args = self.args
        clone.__cause__ = self.__cause__
        clone.__context__ = self.__context__
        clone.__suppress_context__ = self.__suppress_context__
        return clone.with_traceback(self.__traceback__)

    @property
    def retry_after_s(self) -> float | None:
        """Seconds after which a retry may succeed, when the error knows."""
        return None


class InvalidRequest(GatewayError):
    """The request has one or more invalid fields."""

    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_REQUEST"

    def __init__(self, violations: list[FieldViolation], *, message: str | None = None) -> None:
        """`message`: the status message, in place of the fields' names alone."""
        if message is None:
            fields = ", ".join(v.field for v in violations[:MAX_REPORTED_VIOLATIONS])
            if len(violations) > MAX_REPORTED_VIOLATIONS:
                fields += f" and {len(violations) - MAX_REPORTED_VIOLATIONS} more"
            message = f"invalid request: {fields}"
        super().__init__(message)
        self.violations = violations


class ContextWindowExceeded(InvalidRequest):
    """The prompt does not fit the model's context window and truncation is off (or
    cannot help): the violation is on `messages`, or on `params.max_tokens` when that
    alone fills the window.

    Always found before the call is sent (`is_unsent`): the per-minute units a batch
    item's or a Summarize part's turn took for it go back (`Pipeline.in_turn`), as the
    part is split and its pieces take their own. Cleared by an item or a part an earlier
    try of which was sent.
    """

    reason = "CONTEXT_WINDOW_EXCEEDED"
    is_unsent = True

    def __init__(
        self,
        *,
        estimated_tokens: int,
        limit_tokens: int,
        max_tokens: int | None = None,
        is_answer_alone: bool = False,
        is_truncated: bool = False,
        kept_minimum_tokens: int | None = None,
    ) -> None:
        """`max_tokens`: the caller's, when it set one; `is_answer_alone`: that alone
        fills the window; `is_truncated`: KEEP_RECENT dropped all it may;
        `kept_minimum_tokens`: with truncation off, what KEEP_RECENT would keep at least
        (answer reserve included) when that is over the window too, so not a remedy."""
        # The caller's max_tokens takes its share of the window: lowering it is a remedy.
        or_lower = "" if max_tokens is None else f", or lower params.max_tokens ({max_tokens})"
        if is_answer_alone:
            violation = FieldViolation(
                "params.max_tokens",
                f"{max_tokens} tokens reserved for the answer leave no room for the prompt "
                f"in the model's context window of {limit_tokens}; lower it",
            )
        elif is_truncated:
            violation = FieldViolation(
                "messages",
                f"the system messages, tools and the last turn alone need about "
                f"{estimated_tokens} tokens (room for the answer included), over the model's "
                f"context window of {limit_tokens}; shorten them{or_lower}",
            )
        elif kept_minimum_tokens is not None:
            violation = FieldViolation(
                "messages",
                f"prompt needs about {estimated_tokens} tokens (room for the answer included), "
                f"over the model's context window of {limit_tokens}; TRUNCATION_MODE_KEEP_RECENT "
                f"would still need {kept_minimum_tokens}: shorten the last message or system "
                f"messages{or_lower}, or use Summarize for a long document",
            )
        else:
            violation = FieldViolation(
                "messages",
                f"prompt needs about {estimated_tokens} tokens (room for the answer included), "
                f"over the model's context window of {limit_tokens}; shorten it, use "
                f"TRUNCATION_MODE_KEEP_RECENT{or_lower}",
            )
        super().__init__([violation])
        self.estimated_tokens = estimated_tokens
        self.limit_tokens = limit_tokens


class ToolsUnsupported(InvalidRequest):
    """The request uses tools (declares them, or sends tool calls or results back) and no
    upstream of its model takes them (`upstreams[].takes_tools: false`): sent anyway, the
    model would answer as if it had none, its tool results dropped."""

    reason = "TOOLS_UNSUPPORTED"

    def __init__(self, model: str, field: str) -> None:
        """`field`: the first one using tools, `tools` or a message's."""
        description = (
            f"model {quoted(model)} takes no tools: its upstreams ignore them and drop tool "
            "calls and results; use a model that takes tools, or send none"
        )
        # The status message says why, not only where: most clients show nothing else.
        super().__init__(
            [FieldViolation(field, description)],
            message=f"invalid request: {field}: {description}",
        )
        self.model = model


class ModelNotFound(GatewayError):
    """No configured upstream serves the requested model."""

    grpc_code = grpc.StatusCode.NOT_FOUND
    reason = "MODEL_NOT_FOUND"

    def __init__(self, model: str) -> None:
        super().__init__(f"model {quoted(model)} is not served by any configured upstream")
        self.model = model


class ServiceUnknown(GatewayError):
    """A health Check named a service the gateway reports no status for (a typo in a
    probe's service name): NOT_FOUND, as the health protocol has it, saying which it knows.
    """

    grpc_code = grpc.StatusCode.NOT_FOUND
    reason = "SERVICE_UNKNOWN"

    def __init__(self, service: str, *, known: Sequence[str]) -> None:
        """`known`: the services Check answers for, "" (the whole server) among them."""
        super().__init__(f"health reports no service {quoted(service)}; it reports {_names(known)}")
        self.service = service
        self.known = tuple(known)


def _names(services: Sequence[str]) -> str:
    """Health service names as a message lists them: `'' (the server), 'a.B'`."""
    return ", ".join(repr(name) + (" (the server)" if not name else "") for name in services)


class Unauthenticated(GatewayError):
    """The caller sent no key, or one the gateway does not know."""

    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class PermissionDenied(GatewayError):
    """The caller's key may not do what it asked."""

    grpc_code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class QuotaExceeded(GatewayError):
    """A tenant limit or budget refused the call before any upstream work."""

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "QUOTA_EXCEEDED"

    def __init__(self, message: str, *, subject: str, retry_after_s: float | None) -> None:
        super().__init__(message)
        self.subject = subject
        self._retry_after_s = retry_after_s

    @property
    def retry_after_s(self) -> float | None:
        return self._retry_after_s


class BudgetExceeded(QuotaExceeded):
    """A tenant's budget refused the call, before any upstream call: the per-minute units
    its tenant's limits took for it go back (`CallerGate.admit`).

    `is_unsent`: cleared by a batch's item or a Summarize's part an earlier try of which
    in its turn was sent, so that its turn's units stay spent (`Pipeline.in_turn`).
    """

    is_unsent = True


class Overloaded(QuotaExceeded):
    """The server has too many calls in flight and queued to take another now."""

    reason = "OVERLOADED"
    is_replica_local = True

    def __init__(self, *, retry_after_s: float) -> None:
        super().__init__(
            "the gateway is overloaded; retry later", subject="server", retry_after_s=retry_after_s
        )


class CallerStalled(GatewayError):
    """The caller took none of a stream's messages for `server.stalled_stream_timeout_s`:
    the upstream request the call read from was closed, and its server slot and its
    tenant's call slot given back."""

    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "CALLER_STALLED"

    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"the caller read none of the stream's messages for {timeout_s:g} s")


class ShuttingDown(GatewayError):
    """The server is stopping and this call outlasted its grace period, or waited (at its
    limits, for a retry) as the drain began.

    Another replica can take the call at once, so the retry delay is zero.
    """

    grpc_code = grpc.StatusCode.UNAVAILABLE
    reason = "SHUTTING_DOWN"
    is_replica_local = True

    def __init__(self, *, last_error: GatewayError | None = None, is_unsent: bool = False) -> None:
        """`last_error`: what the call's last upstream attempt failed with, said in the
        message (a call stopped waiting to retry). `is_unsent`: no attempt of the call it
        ends was begun, so no upstream can have it (its tenant's units for it go back);
        False where one may have been sent."""
        message = "the gateway is shutting down; retry the call on another replica"
        if last_error is not None:
            restarting = getattr(last_error, "restarting", "")
            # It waited for that restart to try again.
            waited = f"it waited for the restart of {restarting}; " if restarting else ""
            message += f" ({waited}its last attempt failed: {last_error.message})"
        super().__init__(message)
        self.is_unsent = is_unsent
        # Whether the message names the last attempt's failure; one ended at a limit
        # (`Limiter.acquire`) does not, and its status names it (`to_rpc_status`).
        self.names_last_error = last_error is not None

    @property
    def retry_after_s(self) -> float:
        """Retry at once: this replica's connection is going away, not the service."""
        return 0.0


class DeadlineExceeded(GatewayError):
    """The caller's deadline passed before an answer was ready."""

    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"

    def __init__(self, message: str, *, is_unsent: bool = False) -> None:
        """`is_unsent`: no upstream attempt of the call was begun (it waited at its
        upstreams' limits till its deadline), so its tenant's units for it go back."""
        super().__init__(message)
        self.is_unsent = is_unsent


class NotImplementedYet(GatewayError):
    """The RPC exists in the contract but this server does not offer it yet."""

    grpc_code = grpc.StatusCode.UNIMPLEMENTED
    reason = "UNIMPLEMENTED"


class UpstreamError(GatewayError):
    """An upstream failed; `upstream` is its configured name, never its URL."""

    grpc_code = grpc.StatusCode.UNAVAILABLE
    reason = "UPSTREAM_ERROR"

    def __init__(
        self,
        message: str,
        *,
        upstream: str,
        status: int | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.upstream = upstream
        self.status = status
        self._retry_after_s = retry_after_s
        # Upstream attempts made for the call, set by the pool (0: refused before any was
        # sent); None for an error that did not come through it.
        self.attempts: int | None = None
        # The caller's deadline left no room for the retry (or the wait for an upstream's
        # limit) that might have mended it: a caller sharing the call (single flight) with
        # a later deadline may still try.
        self.is_cut_short_by_deadline = False
        # The upstreams (comma-separated) the call skipped for being down until a restart
        # answers (the local model's): the caller's retry waits for that restart.
        self.restarting = ""
        # Seconds until one of the model's upstreams takes a call again, set by the pool
        # when the call ended with none that would (open breakers, a probe running, a
        # restart): what a call the gateway tries again itself waits (`retry.reopen_wait_s`).
        self.shut_for_s: float | None = None

    @property
    def retry_after_s(self) -> float | None:
        return self._retry_after_s

    def suggest_retry_after(self, seconds: float) -> None:
        """The delay `RetryInfo` suggests, unless the upstream named one (Retry-After)."""
        if self._retry_after_s is None:
            self._retry_after_s = seconds

    def cap_retry_after(self, most_s: float) -> None:
        """Suggest at most `most_s`: the gateway itself waits no longer for the upstream."""
        if self._retry_after_s is not None:
            self._retry_after_s = min(self._retry_after_s, most_s)

    def defer_retry_after(self, least_s: float) -> None:
        """Suggest at least `least_s`: before then the gateway itself refuses the retry (every
        upstream it could go to has its circuit open), whatever the upstream's Retry-After."""
        if self._retry_after_s is not None:
            self._retry_after_s = max(self._retry_after_s, least_s)


class UpstreamRateLimited(UpstreamError):
    """The upstream answered 429."""

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "UPSTREAM_RATE_LIMITED"


class UpstreamUnavailable(UpstreamError):
    """5xx, reset, refused connection, or a malformed or truncated answer."""

    reason = "UPSTREAM_UNAVAILABLE"


class UpstreamNotOpenAI(UpstreamUnavailable):
    """A success status whose answer is no OpenAI answer at all (a login page, a captive
    portal, a proxy's error page): some other server than the provider answered, which
    bills nothing; or a 404 that names no missing model, for a path the server does not
    route (`openai_json.what_is_missing`). Either way the base_url is wrong. `content_type`
    is the answer's media type ("" when it sent none)."""

    def __init__(self, message: str, *, upstream: str, status: int, content_type: str) -> None:
        super().__init__(message, upstream=upstream, status=status)
        self.content_type = content_type


class UpstreamAuthRejected(UpstreamError):
    """The upstream rejected the gateway's key (401/403) or account (402: out of credit);
    the caller did nothing wrong."""

    reason = "UPSTREAM_AUTH"
    is_retry_futile = True  # the key stays rejected until an operator changes it


@dataclass(frozen=True, slots=True)
class RelayedError:
    """What an upstream's refusal of the request said of it, made safe to relay to the
    caller (`service/upstream/relay.py`): its error's message, and its `param` and `code`
    ("" when it named none)."""

    message: str
    param: str = ""
    code: str = ""


class UpstreamRejected(UpstreamError):
    """The upstream refused the request itself (400, 404, 422): retrying will not help.

    `relayed`, what the upstream said of it, ends the message: the caller cannot mend its
    request without it.
    """

    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "UPSTREAM_REJECTED_REQUEST"

    def __init__(
        self,
        message: str,
        *,
        upstream: str,
        status: int | None = None,
        retry_after_s: float | None = None,
        relayed: RelayedError | None = None,
    ) -> None:
        if relayed is not None:
            message = f"{message}: {relayed.message}"
        super().__init__(message, upstream=upstream, status=status, retry_after_s=retry_after_s)
        self.relayed = relayed


class UpstreamContextExceeded(UpstreamRejected):
    """The upstream refused the prompt as over the model's context window: the gateway's
    estimate (with its calibration) fitted it, the upstream's tokenizer did not.

    `window_tokens` and `prompt_tokens`: the window and the prompt's own count, where its
    refusal says them (llama.cpp's server, vLLM, OpenAI, Gemini, Anthropic and TGI do);
    else None. `is_input_limit`: `window_tokens` limits the prompt alone, the answer's
    room not in it (Gemini's, TGI's `--max-input-tokens`). `counts_answer`: `prompt_tokens`
    counts the prompt and the answer's room together (Moonshot's). `advice`, what the
    caller can do, follows `message`.
    """

    reason = "CONTEXT_WINDOW_EXCEEDED"

    def __init__(
        self,
        message: str,
        *,
        advice: str,
        upstream: str,
        status: int | None = None,
        relayed: RelayedError | None = None,
        window_tokens: int | None = None,
        prompt_tokens: int | None = None,
        is_input_limit: bool = False,
        counts_answer: bool = False,
    ) -> None:
        super().__init__(f"{message}; {advice}", upstream=upstream, status=status, relayed=relayed)
        self._said = message
        self.window_tokens = window_tokens
        self.prompt_tokens = prompt_tokens
        self.is_input_limit = is_input_limit
        self.counts_answer = counts_answer

    def advise(self, advice: str) -> None:
        """Give `advice` in place of the one it was made with: the pipeline knows the
        prompt's estimate and the model's window, which the upstream's client does not."""
        message = f"{self._said}; {advice}"
        if self.relayed is not None:
            message = f"{message}: {self.relayed.message}"
        self.message = message
        self.args = (message,)


class UpstreamLacksModel(UpstreamRejected):
    """The upstream has no such model (`openai_json.what_is_missing`): one provider
    dropped or renamed it, or never had it. Nothing is wrong with the request, and another
    upstream of the model may serve it: failed over, not retried there, and with no other
    upstream left the caller is told as for any refusal."""


class UpstreamTemplateRefused(UpstreamRejected):
    """The local model's chat template refused the request's messages (its
    `raise_exception`, which llama.cpp's server answers with HTTP 500): the caller's
    request, not the model, failed there. Another upstream of the model (a provider
    serving it beside the local one) may take the messages: failed over, as for an
    upstream lacking the model, never retried there, and with no other upstream left
    the caller is told this refusal."""


class UpstreamRefusedSilently(UpstreamRejected):
    """The upstream refused the request by ending its stream before the first event,
    saying not why (`empty_stream_is_refusal`): the same request unary says it."""


class UpstreamFailedMidStream(UpstreamUnavailable):
    """An upstream's stream reported an error (an `error` event) after its output began:
    the generation failed part-way, the request itself taken. `relayed`, what it said of
    the failure, ends the message; None when it said nothing a caller may be told."""

    def __init__(self, message: str, *, upstream: str, relayed: RelayedError | None) -> None:
        if relayed is not None:
            message = f"{message}: {relayed.message}"
        super().__init__(message, upstream=upstream)
        self.relayed = relayed


class UpstreamRateLimitedMidStream(UpstreamFailedMidStream):
    """An upstream's stream reported a rate limit (its code 429) after its output began:
    RESOURCE_EXHAUSTED, as a 429 is."""

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "UPSTREAM_RATE_LIMITED"


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer within its timeout."""

    reason = "UPSTREAM_TIMEOUT"


class StreamInterrupted(UpstreamUnavailable):
    """A stream failed after deltas had reached the caller, so it cannot be retried."""

    reason = "STREAM_INTERRUPTED"

    def __init__(self, cause: UpstreamError, *, deltas_sent: int, chars_sent: int) -> None:
        super().__init__(
            f"{cause.message}; the stream was cut after {deltas_sent} deltas "
            f"({chars_sent} characters) had been sent, so it was not retried",
            upstream=cause.upstream,
            status=cause.status,
            retry_after_s=cause.retry_after_s,
        )
        self.deltas_sent = deltas_sent
        self.chars_sent = chars_sent
        # What the upstream said of the failure, when it reported one mid-stream.
        self.relayed = cause.relayed if isinstance(cause, UpstreamFailedMidStream) else None


class RateLimitedStreamInterrupted(StreamInterrupted):
    """A stream ended by a rate limit after deltas had reached the caller."""

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED


def mark_unsent(cancel: BaseException, *, is_unsent: bool = True) -> None:
    """Mark `cancel` (the caller's `asyncio.CancelledError`) as ending a call before any
    upstream attempt of it was begun, as a `GatewayError` says it (`is_unsent`): the pool
    marks it on its way out, the caller gate reads it (`ended_unsent`). Set on the one
    exception rather than kept per call: nothing is added to a call that is not cut.
    `is_unsent=False` clears it, for a batch's item or a Summarize's part an earlier try
    of which was sent, as they clear a refusal's."""
    vars(cancel)["is_unsent"] = is_unsent


def ended_unsent(ended: BaseException) -> bool:
    """Whether `ended` (a `GatewayError`, or a cancel `mark_unsent` marked) ended its call
    before any upstream attempt of it was begun."""
    return getattr(ended, "is_unsent", False) is True


def stream_interrupted(
    cause: UpstreamError, *, deltas_sent: int, chars_sent: int
) -> StreamInterrupted:
    """The error of a stream `cause` ended after deltas had reached the caller, with the
    code the error table gives `cause`: RESOURCE_EXHAUSTED for a rate limit, else
    UNAVAILABLE."""
    if cause.grpc_code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return RateLimitedStreamInterrupted(cause, deltas_sent=deltas_sent, chars_sent=chars_sent)
    return StreamInterrupted(cause, deltas_sent=deltas_sent, chars_sent=chars_sent)


class SummarizePartFailed(UpstreamError):
    """A part of a Summarize call failed after its retries, so no summary is returned.

    Summarising the rest would silently leave part of the document out.
    """

    reason = "SUMMARIZE_PART_FAILED"

    def __init__(
        self, cause: UpstreamError, *, part: int, parts: int, level: int, attempts: int
    ) -> None:
        super().__init__(
            f"summarising part {part} of {parts} (level {level}) failed after {attempts} "
            f"attempt{'' if attempts == 1 else 's'}: {cause.message}; no partial summary is "
            "returned",
            upstream=cause.upstream,
            status=cause.status,
            retry_after_s=cause.retry_after_s,
        )
        self.part = part
        self.parts = parts
        self.level = level
        self.attempts = attempts
        self.is_retry_futile = cause.is_retry_futile
        self.restarting = cause.restarting


class SummarizePartRejected(UpstreamRejected):
    """The upstream refused a part of a Summarize call itself (a 400, its moderation):
    the caller's document, not time, is at fault, so no part is retried."""

    def __init__(self, cause: UpstreamRejected, *, part: int, parts: int, level: int) -> None:
        super().__init__(
            f"the upstream refused part {part} of {parts} (level {level}): {cause.message}",
            upstream=cause.upstream,
            status=cause.status,
        )
        self.relayed = cause.relayed  # already in the cause's message
        self.part = part
        self.parts = parts
        self.level = level


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


# google.protobuf.Duration's largest value (about 10,000 years). An upstream's Retry-After
# is the upstream's word, not ours: a larger one must not crash the status that carries it.
_MAX_RETRY_DELAY_S = 315_576_000_000


def _retry_delay_s(seconds: float) -> float:
    return min(max(0.0, seconds), _MAX_RETRY_DELAY_S)


def _duration(seconds: float) -> duration_pb2.Duration:
    seconds = _retry_delay_s(seconds)
    whole = math.floor(seconds)
    return duration_pb2.Duration(seconds=whole, nanos=int((seconds - whole) * 1e9))


def attempt_failure(error: BaseException, *, is_callers_cut: bool = False) -> str:
    """What a caller is told of one failed upstream attempt, short and secret-free:
    `HTTP 500`, `key rejected (HTTP 401)`, `rate limited (HTTP 429)`, else what its
    message says after the upstream's name (`dropped the connection`, `timed out`), cut
    to 60 characters, without what an upstream said (`RelayedError`): the decisive
    failure's message relays that already, once. `is_callers_cut`: the caller's deadline
    ended it (its timeout was the deadline's, not the upstream's)."""
    if is_callers_cut and isinstance(error, UpstreamError):
        return "cut by the caller's deadline"
    if not isinstance(error, UpstreamError):
        return "cancelled" if not isinstance(error, Exception) else type(error).__name__
    status = error.status
    if status is not None:
        if isinstance(error, UpstreamAuthRejected):
            what = "key rejected" if status in (401, 403) else "account refused"
            return f"{what} (HTTP {status})"
        if isinstance(error, UpstreamRateLimited):
            return f"rate limited (HTTP {status})"
        if isinstance(error, UpstreamNotOpenAI):
            return f"no OpenAI answer (HTTP {status})"
        if isinstance(error, UpstreamLacksModel):
            return f"model not served (HTTP {status})"
        if isinstance(error, UpstreamRejected):
            return f"request rejected (HTTP {status})"
        return f"HTTP {status}"
    said = error.message.removeprefix(f"upstream {error.upstream!r} ")
    relayed = getattr(error, "relayed", None)
    if isinstance(relayed, RelayedError):
        said = said.removesuffix(f": {relayed.message}")
    if len(said) > _MAX_ATTEMPT_FAILURE_CHARS:
        said = said[:_MAX_ATTEMPT_FAILURE_CHARS] + "..."
    return said


def attempts_said(failures: tuple[str, ...]) -> str:
    """The failures of a call's attempts as a status says them: `up0: HTTP 500; up1: key
    rejected (HTTP 401)`, the first `MAX_REPORTED_ATTEMPTS` of them, each cut like
    `clipped` (an upstream's name is the operator's to choose), then `and 3 more`."""
    said = "; ".join(clipped(failure) for failure in failures[:MAX_REPORTED_ATTEMPTS])
    if len(failures) > MAX_REPORTED_ATTEMPTS:
        said += f"; and {len(failures) - MAX_REPORTED_ATTEMPTS} more"
    return said


def _relayed_metadata(relayed: RelayedError) -> dict[str, str]:
    """`ErrorInfo` metadata for what an upstream said of a request it refused."""
    metadata = {"upstream_message": relayed.message}
    if relayed.param:
        metadata["upstream_param"] = relayed.param
    if relayed.code:
        metadata["upstream_code"] = relayed.code
    return metadata


def to_rpc_status(exc: BaseException) -> status_pb2.Status:
    """Map any exception to a `google.rpc.Status` with its details.

    Anything that is not a `GatewayError` becomes INTERNAL with a generic message, so
    no stack trace, path or key ever reaches a caller.
    """
    if not isinstance(exc, GatewayError):
        return status_pb2.Status(code=code_pb2.INTERNAL, message="internal error")
    details: list[any_pb2.Any] = []
    violations: list[FieldViolation] = []
    if isinstance(exc, InvalidRequest):
        violations = exc.violations[:MAX_REPORTED_VIOLATIONS]
    elif isinstance(exc, UpstreamContextExceeded):  # the same to a caller as the gateway's own
        violations = [FieldViolation("messages", exc.message)]
    if violations:
        details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=v.field, description=v.description[:_MAX_DESCRIPTION_CHARS]
                        )
                        for v in violations
                    ]
                )
            )
        )
    metadata: dict[str, str] = {}
    message = exc.message
    if isinstance(exc, ModelNotFound | ToolsUnsupported):
        metadata["model"] = clipped(exc.model)
    if isinstance(exc, ServiceUnknown):
        metadata["service"] = clipped(exc.service)
        metadata["known_services"] = ",".join(exc.known)
    if isinstance(exc, UpstreamError):
        metadata["upstream"] = exc.upstream
        if exc.status is not None:
            metadata["http_status"] = str(exc.status)
        if exc.attempts is not None:
            metadata["attempts"] = str(exc.attempts)
        if exc.restarting:
            metadata["restarting"] = exc.restarting
    if len(exc.attempt_failures) > 1:
        # The message names the decisive failure alone; a platform engineer debugging
        # an outage needs the others too (up0's 500 behind up1's rejected key).
        said = attempts_said(exc.attempt_failures)
        metadata["attempt_errors"] = said
        message = f"{message} (attempts: {said})"
    elif exc.attempt_failures and isinstance(exc, ShuttingDown) and not exc.names_last_error:
        # The drain's sentence alone (it ended a wait at a limit) would name no failure.
        message = f"{message} (after {attempts_said(exc.attempt_failures)})"
    if isinstance(exc, UpstreamNotOpenAI):
        metadata["content_type"] = exc.content_type
    if (
        isinstance(exc, UpstreamRejected | UpstreamFailedMidStream | StreamInterrupted)
        and exc.relayed is not None
    ):
        metadata.update(_relayed_metadata(exc.relayed))
    if isinstance(exc, ContextWindowExceeded):
        metadata["estimated_tokens"] = str(exc.estimated_tokens)
        metadata["limit_tokens"] = str(exc.limit_tokens)
    if isinstance(exc, SummarizePartFailed | SummarizePartRejected):
        metadata["part"] = str(exc.part)
        metadata["parts"] = str(exc.parts)
        metadata["level"] = str(exc.level)
    if isinstance(exc, SummarizePartFailed):
        metadata["attempts"] = str(exc.attempts)
    if isinstance(exc, StreamInterrupted):
        metadata["deltas_sent"] = str(exc.deltas_sent)
        metadata["chars_sent"] = str(exc.chars_sent)
    if not isinstance(exc, InvalidRequest) or metadata:
        details.append(
            _pack(
                error_details_pb2.ErrorInfo(
                    reason=exc.reason, domain=ERROR_DOMAIN, metadata=metadata
                )
            )
        )
    if isinstance(exc, QuotaExceeded) and not isinstance(exc, Overloaded):
        details.append(
            _pack(
                error_details_pb2.QuotaFailure(
                    violations=[
                        error_details_pb2.QuotaFailure.Violation(
                            subject=exc.subject, description=exc.message
                        )
                    ]
                )
            )
        )
    if exc.retry_after_s is not None:
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=_duration(exc.retry_after_s))))
    code = exc.grpc_code.value[0]
    return status_pb2.Status(code=code, message=message, details=details)


def internal_error_status() -> status_pb2.Status:
    """INTERNAL with an `ErrorInfo` `INTERNAL_ERROR` and nothing else.

    What a caller gets when mapping an error to its status failed: a gateway bug, about
    which the failed mapping cannot say anything reliable.
    """
    info = error_details_pb2.ErrorInfo(reason=INTERNAL_ERROR_REASON, domain=ERROR_DOMAIN)
    return status_pb2.Status(
        code=code_pb2.INTERNAL, message="internal error", details=[_pack(info)]
    )


def retry_elsewhere_trailer(exc: BaseException) -> tuple[tuple[str, str], ...]:
    """`llm-gateway-retry-elsewhere: true` for a refusal of this replica's own (overloaded,
    shutting down, an upstream's slots or in-memory rate here spent): the one kind a proxy
    should retry on another replica. Any other
    refusal would be the same there (a tenant's quota, a rejected key), or comes after the
    gateway's own retries and failover, which a proxy's retry would multiply."""
    if isinstance(exc, GatewayError) and exc.is_replica_local:
        return ((RETRY_ELSEWHERE_TRAILER, "true"),)
    return ()


def pushback_trailer(
    exc: BaseException, time_remaining_s: float | None = None
) -> tuple[tuple[str, str], ...]:
    """The `grpc-retry-pushback-ms` trailer that gRPC retry policies honour.

    Sent with the codes the shipped retry policy retries (UNAVAILABLE, RESOURCE_EXHAUSTED)
    when the gateway knows the wait (a quota's reset, an upstream's `Retry-After`, when
    its circuit breaker lets a probe through, the retry backoff): the gateway has already
    retried and failed over within the call, so the caller's retry waits that rather
    than its own 0.2 s backoff. Every upstream of the model rejecting the gateway's key is
    -1, gRPC's "do not retry": only an operator can mend it (`is_retry_futile`, which the
    pool clears when another upstream may serve a retry; so is a Summarize part failed by
    one).

    A wait the call's deadline (`time_remaining_s` from now) cannot outlast is sent as
    -1: a retry policy would otherwise sit it out until a bare DEADLINE_EXCEEDED, and the
    caller would never see this status or its details. So is a wait past
    `MAX_PUSHBACK_S` for a call without a deadline: it would hang until a spent budget's
    period resets, hours on, with nothing said.
    """
    # A draining replica's refusal keeps the caller's own jittered backoff: pushed back 0,
    # a channel to one address would spend every attempt on that replica within
    # milliseconds, before its load balancer has moved on.
    if (
        not isinstance(exc, GatewayError)
        or exc.grpc_code not in _RETRIED_CODES
        or isinstance(exc, ShuttingDown)
    ):
        return ()
    if exc.is_retry_futile:
        return ((RETRY_PUSHBACK_TRAILER, "-1"),)
    if exc.retry_after_s is None:
        return ()
    delay_s = _retry_delay_s(exc.retry_after_s)
    limit_s = MAX_PUSHBACK_S if time_remaining_s is None else time_remaining_s
    if delay_s >= limit_s:
        return ((RETRY_PUSHBACK_TRAILER, "-1"),)
    # Whole milliseconds, rounded up: a retry let go a fraction of one early finds the
    # quota still short and is refused again, spending one of the policy's attempts. (The
    # nanosecond is float noise: 0.1 s is 100.00000000000001 ms.)
    return ((RETRY_PUSHBACK_TRAILER, str(math.ceil(delay_s * 1000 - 1e-6))),)
