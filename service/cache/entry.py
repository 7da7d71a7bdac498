"""What the cache stores for one answer, and its exact byte encoding (orjson).

An entry is the finished `Completion` as the upstream produced it (its reasoning and tool
calls included), plus the text of every delta in order, so that a stream replays with the
same chunking it had live; its reasoning replays whole, as one delta before the text, and
its tool calls whole, one piece each, after the text.

Version 2 added `tool_calls` to the completion, version 3 `reasoning` and the usage's
`reasoning_tokens`; entries written before still decode, with none. Version 4 writes the
text once, as the deltas, leaving the completion's `content` empty and saying so (`"j"`:
it is the deltas joined), so that an entry is about as long as its answer
(`max_entry_bytes` bounds it).

An entry of a newer version than this gateway writes is a newer gateway's, read during a
rolling upgrade: `NewerEntryError`, which the cache takes as a quiet miss.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson

from service.config import MAX_PRICE_USD_PER_MILLION
from service.domain import (
    MAX_TOKEN_COUNT,
    Completion,
    Delta,
    FinishReason,
    Timings,
    ToolCall,
    Usage,
    whole_tool_calls,
)
from service.validation import has_visible_text

__all__ = [
    "CACHEABLE_FINISH_REASONS",
    "REMEMBERED_MAX_BYTES",
    "CachedAnswer",
    "EntryDecodeError",
    "NewerEntryError",
    "decode_entry",
]

# Anything else (a content filter, an unknown reason) is not an answer worth replaying.
CACHEABLE_FINISH_REASONS = frozenset(
    {FinishReason.STOP, FinishReason.LENGTH, FinishReason.TOOL_CALLS}
)

# 5: timings hold `queued_ms` (a gateway before it reads none of these entries).
_ENTRY_VERSION = 5
_READABLE_VERSIONS = frozenset({1, 2, 3, 4, 5})
# The JSON types each scalar field may hold, by its annotation (a string here, under
# `from __future__ import annotations`).
_SCALAR_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
}
# The proto's integers are int64: a JSON integer past them is as unreadable as a string.
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# Slack for a cost's float arithmetic and its rounding to 12 digits (`pricing.cost_usd`).
_COST_REL_SLACK, _COST_ABS_SLACK_USD = 1e-9, 1e-12
# Decoded entries remembered by their bytes: at most this many, each at most this long.
_REMEMBERED_ENTRIES = 256
REMEMBERED_MAX_BYTES = 16 * 1024


class EntryDecodeError(ValueError):
    """Stored bytes that are not a valid entry (corrupt, or written by another version)."""


class NewerEntryError(EntryDecodeError):
    """An entry of a newer version than this gateway writes: a newer gateway's, during a
    rolling upgrade across an entry-format change, and no sign of corruption."""

    def __init__(self, version: int) -> None:
        super().__init__(f"entry version {version}")
        self.version = version


T = TypeVar("T")


# Read once: each stored dataclass's scalar fields and the JSON types each may hold.
_SCALAR_FIELDS: dict[type, tuple[tuple[str, tuple[type, ...]], ...]] = {
    cls: tuple(
        (spec.name, _SCALAR_TYPES[str(spec.type)])
        for spec in dataclasses.fields(cls)
        if str(spec.type) in _SCALAR_TYPES
    )
    for cls in (Completion, Usage, Timings, ToolCall)
}


# What an entry holds of its completion: every field but `is_coalesced`, which says how
# one caller got the answer, not what it is. A field no older gateway knows would make
# its every read of the entry fail, while replicas of two releases share one Redis.
_STORED_FIELDS = tuple(
    spec.name for spec in dataclasses.fields(Completion) if spec.name != "is_coalesced"
)


def _typed(cls: type[T], values: dict[str, Any]) -> T:
    """`cls(**values)`, refusing a scalar of the wrong type: JSON that parses but would
    fail only when the hit is turned into a response."""
    for name, types in _SCALAR_FIELDS[cls]:
        if name not in values:
            continue
        value = values[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise EntryDecodeError(f"{cls.__name__}.{name} is a {type(value).__name__}")
        if type(value) is int and not _INT64_MIN <= value <= _INT64_MAX:
            raise EntryDecodeError(f"{cls.__name__}.{name} is past int64")
    return cls(**values)


def _counted(usage: Usage) -> Usage:
    """`usage`, refusing a count no call has (negative, or past `MAX_TOKEN_COUNT`): a
    hit records its usage, and one such count made the tenant's usage rows negative or
    past int64, where GetUsage failed on them."""
    for count in (
        usage.input_tokens,
        usage.output_tokens,
        usage.cached_input_tokens,
        usage.reasoning_tokens,
    ):
        if not 0 <= count <= MAX_TOKEN_COUNT:
            raise EntryDecodeError("a usage count no call has")
    return usage


def _priced(completion: Completion) -> Completion:
    """`completion`, refusing a cost no call has: negative, not finite, or past what its
    usage costs at the highest price a config allows. A hit records the cost as what it
    saved its tenant, and one such cost made the tenant's savings negative, NaN or past
    any bill."""
    usage = completion.usage
    most_usd = (usage.input_tokens + usage.output_tokens) * MAX_PRICE_USD_PER_MILLION / 1e6
    cost_usd = completion.cost_usd
    if not (
        math.isfinite(cost_usd)
        and 0 <= cost_usd <= most_usd * (1 + _COST_REL_SLACK) + _COST_ABS_SLACK_USD
    ):
        raise EntryDecodeError("a cost no call has")
    return completion


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    """A finished answer and the deltas it was streamed as (one delta for a unary answer)."""

    completion: Completion
    deltas: tuple[str, ...]

    @classmethod
    def of_unary(cls, completion: Completion) -> CachedAnswer:
        """An answer that was never streamed: its content replays as one delta."""
        return cls(completion, (completion.content,) if completion.content else ())

    def replay(self) -> list[Delta]:
        """The stream a cache hit sends: the reasoning whole, the text deltas, then each
        tool call whole."""
        deltas = (
            [Delta("", reasoning=self.completion.reasoning)] if self.completion.reasoning else []
        )
        deltas += [Delta(text) for text in self.deltas]
        if self.completion.tool_calls:
            deltas.append(Delta("", whole_tool_calls(self.completion.tool_calls)))
        return deltas

    @property
    def is_cacheable(self) -> bool:
        """Whether the answer may be stored: a stop, length or tool-call finish with
        something in it. An empty one is most often a provider's glitch (a null message),
        which a stored entry would serve for its whole TTL. Text (or reasoning) of
        whitespace or invisible characters alone is none, as validation and Summarize read
        it: sent back, it is refused as empty."""
        answer = self.completion
        return answer.finish_reason in CACHEABLE_FINISH_REASONS and (
            has_visible_text(answer.content)
            or has_visible_text(answer.reasoning)
            or bool(answer.tool_calls)
        )

    def encode(self) -> bytes:
        """The entry as compact JSON; floats round-trip exactly (shortest repr)."""
        completion = self.completion
        stored = {name: getattr(completion, name) for name in _STORED_FIELDS}
        entry: dict[str, object] = {"v": _ENTRY_VERSION, "c": stored, "d": self.deltas}
        content = completion.content
        if content and content == "".join(self.deltas):
            # "j": the content is the deltas joined, written once (`max_entry_bytes`).
            stored["content"] = ""
            entry["j"] = 1
        return orjson.dumps(entry)

    @classmethod
    def decode(cls, data: bytes) -> CachedAnswer:
        """The entry encoded by `encode`; raises `EntryDecodeError` on anything else."""
        try:
            raw = orjson.loads(data)
            version = raw["v"]
            if type(version) is int and version > _ENTRY_VERSION:
                raise NewerEntryError(version)
            # `True` and `5.0` are equal to versions, and no version.
            if type(version) is not int or version not in _READABLE_VERSIONS:
                # Written by something else, maybe: its value is not for the log, whatever
                # its length; a version number is.
                shown = version if type(version) is int else type(version).__name__
                raise EntryDecodeError(f"entry version {shown}")
            deltas = raw["d"]
            if not isinstance(deltas, list) or not all(isinstance(d, str) for d in deltas):
                raise EntryDecodeError("deltas are not a list of strings")
            fields: dict[str, Any] = dict(raw["c"])
            if raw.get("j") == 1:
                if fields.get("content") != "":
                    raise EntryDecodeError("content written beside the deltas it joins")
                fields["content"] = "".join(deltas)
            fields["finish_reason"] = FinishReason(fields["finish_reason"])
            fields["usage"] = _counted(_typed(Usage, dict(fields["usage"])))
            fields["timings"] = _typed(Timings, dict(fields["timings"]))
            fields["tool_calls"] = tuple(
                _typed(ToolCall, dict(call)) for call in fields.get("tool_calls", ())
            )
            return cls(_priced(_typed(Completion, fields)), tuple(deltas))
        except EntryDecodeError:
            raise
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise EntryDecodeError(type(exc).__name__) from exc

    def served_from_cache(
        self, *, total_ms: float, first_token_ms: float, waited_ms: float | None = None
    ) -> Completion:
        """The completion as a cache hit reports it: nothing charged, the cost saved.

        `waited_ms`: how long the caller waited on an upstream call another caller made
        (a coalesced follower), None for an answer read from the store. It is split as that
        call's own timings split it: its `upstream_ms` taken as the last of the wait,
        ending as the answer came, and its `queued_ms` (its wait in its upstream's
        limiter) just before, as the leader queued before it went upstream. Any rest
        (the leader's own work) is the gateway's, as it is the leader's.
        """
        completion = self.completion
        upstream_ms = queued_ms = 0.0
        if waited_ms is not None:  # a follower: a store hit waited on no call
            upstream_ms = min(waited_ms, completion.timings.upstream_ms)
            queued_ms = min(waited_ms - upstream_ms, completion.timings.queued_ms)
        # Built field by field: `dataclasses.replace` costs twice as much on every hit.
        return Completion(
            id=completion.id,
            model=completion.model,
            content=completion.content,
            finish_reason=completion.finish_reason,
            usage=completion.usage,
            cost_usd=0.0,
            upstream=completion.upstream,
            attempts=0,
            timings=Timings(
                total_ms=total_ms,
                upstream_ms=upstream_ms,
                time_to_first_token_ms=first_token_ms,
                queued_ms=queued_ms,
            ),
            saved_cost_usd=completion.cost_usd,
            is_cache_hit=True,
            is_coalesced=waited_ms is not None,
            dropped_messages=completion.dropped_messages,
            tool_calls=completion.tool_calls,
            reasoning=completion.reasoning,
        )


def _servable(data: bytes) -> CachedAnswer | None:
    """The entry in `data`, or None when this release would not have stored it: an older
    release's entry of invisible characters alone (`is_cacheable`), read as a miss."""
    answer = CachedAnswer.decode(data)
    return answer if answer.is_cacheable else None


_decode_remembered = functools.lru_cache(maxsize=_REMEMBERED_ENTRIES)(_servable)


def decode_entry(data: bytes) -> CachedAnswer | None:
    """The entry in `data`, or None for one this release would not serve (`_servable`),
    remembered for entries up to 16 KiB.

    A hot key is read far more often than it is written: its bytes are decoded, and
    checked, once, not on every hit. Sharing the result is safe because a `CachedAnswer`
    is immutable; bytes that fail to decode are not remembered and raise every time.
    """
    if len(data) > REMEMBERED_MAX_BYTES:
        return _servable(data)
    return _decode_remembered(data)
