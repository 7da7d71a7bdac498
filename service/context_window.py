"""Fitting a conversation into a model's context window."""

from __future__ import annotations

from dataclasses import dataclass

from service.domain import Message, Role, TruncationMode
from service.errors import ContextWindowExceeded
from service.tokens import estimate_prompt_tokens

# Room kept for the answer when the caller sets no max_tokens.
DEFAULT_ANSWER_RESERVE = 256


@dataclass(frozen=True, slots=True)
class FittedPrompt:
    """The messages to send and how many were dropped to fit."""

    messages: tuple[Message, ...]
    dropped: int
    estimated_tokens: int


def fit_messages(
    messages: tuple[Message, ...],
    *,
    context_window: int,
    max_tokens: int | None,
    mode: TruncationMode,
    calibration: float = 1.0,
) -> FittedPrompt:
    """Return `messages` if they fit, else truncate per `mode` or raise.

    `keep_recent` keeps every system message and the most recent turns that fit,
    never splitting a message and always keeping the last user message.
    """
    reserve = (
        max_tokens if max_tokens is not None else min(DEFAULT_ANSWER_RESERVE, context_window // 4)
    )
    budget = context_window - reserve

    def cost(items: tuple[Message, ...] | list[Message]) -> int:
        return int(estimate_prompt_tokens(items) * calibration + 0.999)

    needed = cost(messages)
    if needed <= budget:
        return FittedPrompt(messages, 0, needed)
    if mode is TruncationMode.NONE:
        raise ContextWindowExceeded(estimated_tokens=needed + reserve, limit_tokens=context_window)
    last_user = max((i for i, m in enumerate(messages) if m.role is Role.USER), default=-1)
    keep = {i for i, m in enumerate(messages) if m.role is Role.SYSTEM}
    keep.add(last_user if last_user >= 0 else len(messages) - 1)
    base = [messages[i] for i in sorted(keep)]
    if cost(base) > budget:
        raise ContextWindowExceeded(
            estimated_tokens=cost(base) + reserve, limit_tokens=context_window
        )
    for index in range(len(messages) - 1, -1, -1):
        if index in keep:
            continue
        trial = keep | {index}
        if cost([messages[i] for i in sorted(trial)]) > budget:
            break
        keep = trial
    kept = tuple(messages[i] for i in sorted(keep))
    return FittedPrompt(kept, len(messages) - len(kept), cost(kept))
