"""Decoding the `google.rpc.Status` details the gateway attaches to every error."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

# Sent with a refusal of one replica's own (overloaded, shutting down, at its own limit for
# every upstream of the model): another replica may take the call.
RETRY_ELSEWHERE_TRAILER = "llm-gateway-retry-elsewhere"
# Where gRPC servers send a failed call's `google.rpc.Status`.
_DETAILS_TRAILER = "grpc-status-details-bin"
# A `google.rpc.Status` code's name, as `grpc.StatusCode` spells it.
_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


@dataclass(frozen=True, slots=True)
class ErrorDetails:
    """What a failed call said, beyond its status code."""

    code: str
    message: str
    field_violations: tuple[tuple[str, str], ...] = ()
    reason: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    retry_after_s: float | None = None
    quota_violations: tuple[tuple[str, str], ...] = ()
    # ErrorInfo's domain: a reason is the gateway's only with the domain `llmgateway.v1`.
    domain: str = ""
    # The `llm-gateway-retry-elsewhere: true` trailer: another replica may take the call.
    retry_elsewhere: bool = False
    # The type URLs of details this client does not know (a newer gateway's), or whose
    # bytes are not their type's: kept, so that nothing is lost without a word (the Node
    # client's `unknownTypeUrls`).
    unknown_type_urls: tuple[str, ...] = ()

    def describe(self) -> str:
        """A human-readable, multi-line description."""
        lines = [f"{self.code}: {self.message}"]
        lines += [f"  {name}: {why}" for name, why in self.field_violations]
        lines += [f"  quota {subject}: {why}" for subject, why in self.quota_violations]
        if self.reason:
            facts = ", ".join(f"{key}={value}" for key, value in sorted(self.metadata.items()))
            lines.append(f"  reason {self.reason}" + (f": {facts}" if facts else ""))
        if self.retry_after_s is not None:
            lines.append(f"  retry after {_seconds(self.retry_after_s)}s")
        lines += [f"  undecoded detail {url}" for url in self.unknown_type_urls]
        return "\n".join(lines)


def _seconds(value: float) -> str:
    """Seconds to the millisecond, without trailing zeros: `.3g` wrote an hour's wait as
    3.6e+03."""
    return f"{value:.3f}".rstrip("0").rstrip(".")


def error_details(error: grpc.aio.AioRpcError) -> ErrorDetails:
    """Unpack BadRequest, ErrorInfo, QuotaFailure and RetryInfo from a failed call, and
    its retry-elsewhere trailer, which is read apart from them (as the Node client does):
    details that do not decode leave it standing."""
    code = error.code()
    base = ErrorDetails(
        code=code.name if code else "UNKNOWN",
        message=error.details() or "",
        retry_elsewhere=_says_retry_elsewhere(error),
    )
    try:
        status = _trailer_status(error)
    except DecodeError:
        # The trailer is no `google.rpc.Status` (a proxy's garbage): the code and message
        # still say what failed.
        return base
    if status is None or code is None or status.code != code.value[0]:
        # The details are of another code than the call's: its deadline passed as the
        # gateway sent its error, and gRPC's DEADLINE_EXCEEDED won. They do not apply.
        return base
    # Of the call's code, they are read whatever its message: grpc_status's `from_call`
    # refused a status whose message was not the call's, so a proxy that rewrote the
    # message lost the caller its RetryInfo and ErrorInfo (the Node client checks the
    # code alone). The message is the call's own, as `error.details()` says it.
    details = status_details(status)
    return dataclasses.replace(
        details, code=base.code, message=base.message, retry_elsewhere=base.retry_elsewhere
    )


def _trailer_status(error: grpc.aio.AioRpcError) -> status_pb2.Status | None:
    """The `google.rpc.Status` of the call's `grpc-status-details-bin` trailer, or None.

    Raises:
        DecodeError: the trailer is no `google.rpc.Status`.
    """
    for key, value in error.trailing_metadata() or ():
        if key == _DETAILS_TRAILER and isinstance(value, bytes):
            return status_pb2.Status.FromString(value)
    return None


def status_details(status: status_pb2.Status) -> ErrorDetails:
    """Unpack BadRequest, ErrorInfo, QuotaFailure and RetryInfo from a `google.rpc.Status`:
    a failed call's (`error_details`), or a `CompleteBatch` item's `error`; the type URL
    of any other detail, or of one that does not decode, goes to `unknown_type_urls`."""
    violations: list[tuple[str, str]] = []
    quota: list[tuple[str, str]] = []
    unknown: list[str] = []
    reason, domain, metadata, retry_after = "", "", {}, None
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        info = error_details_pb2.ErrorInfo()
        retry = error_details_pb2.RetryInfo()
        failure = error_details_pb2.QuotaFailure()
        try:
            if detail.Unpack(bad_request):
                violations += [(v.field, v.description) for v in bad_request.field_violations]
            elif detail.Unpack(info):
                reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
            elif detail.Unpack(retry):
                retry_after = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
            elif detail.Unpack(failure):
                quota += [(v.subject, v.description) for v in failure.violations]
            else:
                unknown.append(detail.type_url)
        except DecodeError:  # not the type its URL names: kept as a type this does not know
            unknown.append(detail.type_url)
    return ErrorDetails(
        code=_CODE_NAMES.get(status.code, str(status.code)),
        message=status.message,
        field_violations=tuple(violations),
        reason=reason,
        metadata=metadata,
        retry_after_s=retry_after,
        quota_violations=tuple(quota),
        domain=domain,
        unknown_type_urls=tuple(unknown),
    )


def _says_retry_elsewhere(error: grpc.aio.AioRpcError) -> bool:
    """Whether the call's trailers carry `llm-gateway-retry-elsewhere: true`."""
    trailers = error.trailing_metadata() or ()
    return any(key == RETRY_ELSEWHERE_TRAILER and value == "true" for key, value in trailers)
