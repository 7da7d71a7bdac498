"""Fitting a conversation into a model's context window."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from service.domain import Message, ResponseFormat, Role, Tool, TruncationMode
from service.errors import ContextWindowExceeded
from service.tokens import (
    PER_REQUEST_OVERHEAD,
    estimate_format_tokens,
    estimate_message_tokens,
    estimate_tools_tokens,
)

# Room kept for the answer when the caller sets no max_tokens.
DEFAULT_ANSWER_RESERVE = 256


@dataclass(frozen=True, slots=True)
class FittedPrompt:
    """The messages to send, how many were dropped, and their estimate.

    `prompt_tokens` is the plain estimate of what is sent (what limits, budgets and
    calibration work with); `estimated_tokens` is it times the calibration factor (the
    tenant's, for the model), the figure checked against the context window.
    """

    messages: tuple[Message, ...]
    dropped: int
    estimated_tokens: int
    prompt_tokens: int


def answer_reserve(context_window: int, max_tokens: int | None) -> int:
    """Tokens kept free for the answer: `max_tokens`, or a default share of the window."""
    if max_tokens is not None:
        return max_tokens
    return min(DEFAULT_ANSWER_RESERVE, context_window // 4)


def holds_prompt_and_answer(window_tokens: int, prompt_tokens: int) -> bool:
    """Whether a window of `window_tokens` holds a prompt of `prompt_tokens` with the room
    kept for an answer when no max_tokens is asked: an upstream that refused such a prompt
    as over that window refused the max_tokens asked with it, not the prompt."""
    return prompt_tokens + answer_reserve(window_tokens, None) <= window_tokens


def prompt_in_count_with_answer(count_tokens: int, max_tokens: int | None) -> int | None:
    """The prompt's own count in an upstream's count of the prompt and the answer's room
    together (Moonshot's): that less the `max_tokens` sent. None with none sent: the room
    it then counts is its own default (1024 for Moonshot's moonshot-v1), which may be more
    than the gateway keeps; read less the gateway's, the count was over the prompt's."""
    if max_tokens is None:
        return None
    return max(0, count_tokens - max_tokens)


def default_answer_room_advice(window_tokens: int, count_tokens: int) -> str:
    """What to tell a caller whose prompt, sent without max_tokens, an upstream refused
    counting it with the answer's room it keeps by default (`prompt_in_count_with_answer`)."""
    return (
        f"its count ({count_tokens} tokens, over its window of {window_tokens}) is of the "
        "prompt and the room it keeps for an answer when no max_tokens is asked, which the "
        "gateway cannot tell apart: set max_tokens, so that its count says the prompt's, "
        "and send it again"
    )


def max_tokens_refused_advice(window_tokens: int, prompt_tokens: int) -> str:
    """What to tell a caller whose max_tokens, not its prompt, an upstream's window of
    `window_tokens` refused (`holds_prompt_and_answer`)."""
    return (
        f"its window of {window_tokens} tokens holds the prompt ({prompt_tokens}) but not the "
        "max_tokens asked with it: lower max_tokens"
    )


def _turns(messages: Sequence[Message]) -> list[tuple[int, ...]]:
    """For each message, the indexes kept or dropped with it: an assistant message with
    tool calls and the tool messages answering them go together (a provider refuses a tool
    result without its call, and a call without its results); any other message alone."""
    caller_of: dict[str, int] = {}  # tool call id: index of the assistant message
    answers: dict[int, list[int]] = {}  # assistant index: it and its tool messages
    for index, message in enumerate(messages):
        if message.tool_calls:
            answers[index] = [index]
            caller_of.update((call.id, index) for call in message.tool_calls)
        elif message.tool_call_id in caller_of:
            answers[caller_of[message.tool_call_id]].append(index)
    turns: list[tuple[int, ...]] = [(index,) for index in range(len(messages))]
    for group in answers.values():
        for index in group:
            turns[index] = tuple(group)
    return turns


def fit_messages(
    messages: Sequence[Message],
    *,
    tools: Sequence[Tool] = (),
    response_format: ResponseFormat | None = None,
    context_window: int,
    max_tokens: int | None,
    mode: TruncationMode,
    calibration: float = 1.0,
) -> FittedPrompt:
    """Return `messages` if they fit, else truncate per `mode` or raise.

    `keep_recent` keeps every system message, the tool definitions and answer schema
    (`response_format`), and the most recent
    turns that fit, never splitting a message or a tool-call turn (an assistant message
    with tool calls and their results). It always keeps the last user message and every
    message after it: the turn in progress, whose tool results the model needs to go on
    (dropping them would have it call the same tools again), and what it keeps of the
    older turns starts with a user message (`_drop_leading_replies`). Each message is estimated
    once: estimates add up, so trying one more turn costs an addition.

    Raises:
        ContextWindowExceeded: with the estimate (answer reserve included) and the limit,
            when truncation is off or even the kept minimum does not fit.
    """
    reserve = answer_reserve(context_window, max_tokens)
    budget = context_window - reserve
    costs = list(map(estimate_message_tokens, messages))
    fixed = PER_REQUEST_OVERHEAD
    if response_format is not None:
        fixed += estimate_format_tokens(response_format)
    if tools:
        fixed += estimate_tools_tokens(tools)
    total = fixed + sum(costs)
    estimated = math.ceil(total * calibration)
    if estimated <= budget:
        return FittedPrompt(tuple(messages), 0, estimated, total)
    if reserve >= context_window:  # only a max_tokens can: no prompt, however short, fits
        raise ContextWindowExceeded(
            estimated_tokens=estimated + reserve,
            limit_tokens=context_window,
            max_tokens=max_tokens,
            is_answer_alone=True,
        )

    def calibrated(raw: int) -> int:
        return math.ceil(raw * calibration)

    turns = _turns(messages)
    last_user = max((i for i, m in enumerate(messages) if m.role is Role.USER), default=-1)
    keep = [m.role is Role.SYSTEM for m in messages]
    required: set[int] = set()
    for current in range(last_user if last_user >= 0 else len(messages) - 1, len(messages)):
        required.update(turns[current])
    for index in required:
        keep[index] = True
    kept = fixed + sum(c for c, k in zip(costs, keep, strict=True) if k)
    # What KEEP_RECENT keeps at least, answer reserve included, when even that is over.
    minimum = calibrated(kept) + reserve if calibrated(kept) > budget else None
    if mode is TruncationMode.NONE:
        raise ContextWindowExceeded(
            estimated_tokens=estimated + reserve,
            limit_tokens=context_window,
            max_tokens=max_tokens,
            kept_minimum_tokens=minimum,
        )
    if minimum is not None:
        raise ContextWindowExceeded(
            estimated_tokens=minimum,
            limit_tokens=context_window,
            max_tokens=max_tokens,
            is_truncated=True,
        )
    # Walk back from the newest turn; stop at the first that does not fit, so what is
    # kept is an unbroken run of recent turns.
    for index in range(len(messages) - 1, -1, -1):
        if keep[index]:
            continue
        turn = [i for i in turns[index] if not keep[i]]
        cost = sum(costs[i] for i in turn)
        if calibrated(kept + cost) > budget:
            break
        for i in turn:
            keep[i] = True
        kept += cost
    if last_user >= 0:
        kept -= _drop_leading_replies(messages, turns, keep, costs, required)
    fitted = tuple(m for m, k in zip(messages, keep, strict=True) if k)
    return FittedPrompt(fitted, len(messages) - len(fitted), calibrated(kept), kept)


def _drop_leading_replies(
    messages: Sequence[Message],
    turns: Sequence[tuple[int, ...]],
    keep: list[bool],
    costs: Sequence[int],
    required: set[int],
) -> int:
    """Un-keep the kept replies (assistant and tool messages) older than the first kept
    user message, so that the conversation sent starts, after its system messages, with
    a user's turn; the tokens they held.

    Chat templates that want user and assistant to alternate (Mistral's, Gemma's, Llama
    2's, as vLLM serves them) refuse a conversation that opens with the assistant, and a
    reply whose question was dropped tells the model little.
    """
    freed = 0
    for index, message in enumerate(messages):
        if not keep[index] or message.role is Role.SYSTEM:
            continue
        if message.role is Role.USER or required.intersection(turns[index]):
            break
        for i in turns[index]:
            if keep[i]:
                keep[i] = False
                freed += costs[i]
    return freed
