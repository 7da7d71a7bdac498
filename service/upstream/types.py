"""What an upstream answered, before the pipeline prices and reports it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from service.domain import FinishReason, ToolCall, ToolCallDelta, Usage, merged_pieces

_EPOCH_THRESHOLD_S = 1e9  # reset values below this are seconds-from-now, not epoch
# Above this a reset is epoch milliseconds (OpenRouter's): in seconds it is the year 33658.
_EPOCH_MS_THRESHOLD = 1e12


@dataclass(frozen=True, slots=True)
class RateLimitHints:
    """What the upstream's `X-RateLimit-*` headers said, when it sent them.

    `reset_epoch_s` is `X-RateLimit-Reset` as sent (epoch seconds, epoch milliseconds
    when huge, or seconds from now when small); `reset_in_s` is a reset given as a
    duration (OpenAI's), and wins.
    """

    limit: int | None = None
    remaining: int | None = None
    reset_epoch_s: float | None = None
    reset_in_s: float | None = None

    def seconds_to_reset(self, now_epoch_s: float) -> float | None:
        """Seconds until the window resets, when the headers said."""
        if self.reset_in_s is not None:
            return self.reset_in_s
        reset = self.reset_epoch_s
        if reset is None:
            return None
        if reset >= _EPOCH_MS_THRESHOLD:
            reset /= 1000.0
        return max(0.0, reset - now_epoch_s if reset >= _EPOCH_THRESHOLD_S else reset)

    def aged(self, elapsed_s: float) -> RateLimitHints:
        """These hints `elapsed_s` after the upstream sent them: a reset it gave relative to
        then (a duration, or seconds from now) is that much nearer."""
        if elapsed_s <= 0:
            return self
        reset_in, reset = self.reset_in_s, self.reset_epoch_s
        return replace(
            self,
            reset_in_s=None if reset_in is None else max(0.0, reset_in - elapsed_s),
            reset_epoch_s=(
                reset
                if reset is None or reset >= _EPOCH_THRESHOLD_S
                else max(0.0, reset - elapsed_s)
            ),
        )

    def exhausted_for_s(self, now_epoch_s: float) -> float | None:
        """Seconds until the reset of a window with nothing left; None when something is
        left or no reset was given."""
        if self.remaining is None or self.remaining > 0:
            return None
        return self.seconds_to_reset(now_epoch_s)


@dataclass(frozen=True, slots=True)
class UpstreamReply:
    """A whole (unary) answer from an upstream."""

    id: str
    model: str
    content: str
    finish_reason: FinishReason
    usage: Usage | None
    rate_limits: RateLimitHints = RateLimitHints()
    tool_calls: tuple[ToolCall, ...] = ()
    reasoning: str = ""
    # From the request's last byte written to the answer's last byte read: the time spent
    # waiting on the upstream, without the gateway's own encoding and parsing.
    waited_s: float = 0.0


@dataclass(frozen=True, slots=True)
class TextChunk:
    """Generated output: the text of every content event of one network read, joined,
    and the reasoning and tool-call pieces of those events in order."""

    content: str
    tool_calls: tuple[ToolCallDelta, ...] = ()
    reasoning: str = ""


@dataclass(slots=True)
class StreamTally:
    """How much output a stream has passed on so far, counted once where its events
    become chunks (`UpstreamClient.stream`): characters of text, reasoning and tool calls
    (ids, names and arguments), what its bound and a cut stream's `chars_sent` count."""

    chars: int = 0


def output_chars(chunk: TextChunk) -> int:
    """The characters of output `chunk` passes on, as `StreamTally` counts them: its text,
    reasoning and tool calls' ids, names and arguments."""
    calls = sum(len(call.id) + len(call.name) + len(call.arguments) for call in chunk.tool_calls)
    return len(chunk.content) + len(chunk.reasoning) + calls


def joined_chunks(chunks: Sequence[TextChunk]) -> TextChunk:
    """`chunks` as one, in order: their text, tool-call pieces and reasoning joined."""
    if len(chunks) == 1:
        return chunks[0]
    return TextChunk(
        "".join(chunk.content for chunk in chunks),
        tuple(piece for chunk in chunks for piece in chunk.tool_calls),
        "".join(chunk.reasoning for chunk in chunks),
    )


def fold_chunks(chunks: list[TextChunk], count: int) -> None:
    """The last `count` of `chunks` (held whole till a stream ends: those that came since
    the last fold) made one chunk in place, its tool-call pieces merged: done every
    `FOLDED_EVERY` chunks, what is held stays about the size of its output however many
    pieces it came in. Only those: folding all again each time copied the whole output
    so far at every fold, a stream's cost growing with its square."""
    whole = joined_chunks(chunks[-count:])
    chunks[-count:] = [TextChunk(whole.content, merged_pieces(whole.tool_calls), whole.reasoning)]


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """The end of a complete stream."""

    id: str
    model: str
    finish_reason: FinishReason
    usage: Usage | None
    rate_limits: RateLimitHints = RateLimitHints()
    # From the request's last byte written to the stream's end, as `UpstreamReply`'s.
    waited_s: float = 0.0


StreamEvent = TextChunk | StreamEnd


@dataclass(frozen=True, slots=True)
class UpstreamCall:
    """One request as an upstream will receive it."""

    upstream_model: str
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)
