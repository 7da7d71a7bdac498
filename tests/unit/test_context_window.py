"""fit_messages: what is kept, what is dropped, and when it refuses."""

import math

import pytest

from service.context_window import (
    DEFAULT_ANSWER_RESERVE,
    answer_reserve,
    fit_messages,
    prompt_in_count_with_answer,
)
from service.domain import Message, Role, ToolCall, TruncationMode
from service.errors import ContextWindowExceeded
from service.tokens import estimate_prompt_tokens

S, U, A = Role.SYSTEM, Role.USER, Role.ASSISTANT
# 100 ASCII words of 4 letters: 100 tokens of text each.
LONG = " ".join(["word"] * 100)


def conversation(*roles: Role) -> tuple[Message, ...]:
    """One long message per role, each numbered so that they differ."""
    return tuple(Message(role, f"{i} {LONG}") for i, role in enumerate(roles))


def test_fitting_prompt_is_untouched():
    """A prompt under the budget comes back whole with its estimate."""
    messages = conversation(S, U)
    fitted = fit_messages(messages, context_window=4096, max_tokens=100, mode=TruncationMode.NONE)
    assert fitted.messages == messages
    assert fitted.dropped == 0
    assert fitted.estimated_tokens == estimate_prompt_tokens(messages)


def test_none_mode_rejects_with_estimate_and_limit():
    """Truncation off: the error carries the estimate (answer included) and the limit."""
    messages = conversation(S, U, A, U)
    with pytest.raises(ContextWindowExceeded) as caught:
        fit_messages(messages, context_window=300, max_tokens=50, mode=TruncationMode.NONE)
    assert caught.value.estimated_tokens == estimate_prompt_tokens(messages) + 50
    assert caught.value.limit_tokens == 300


@pytest.mark.parametrize(
    ("window", "is_truncation_a_remedy"),
    [(300, True), (200, False)],
    ids=["keep-recent-fits", "last-turn-alone-too-long"],
)
def test_none_mode_suggests_keep_recent_only_where_it_would_fit(window, is_truncation_a_remedy):
    """Truncation off: the refusal names TRUNCATION_MODE_KEEP_RECENT as a remedy only when
    the system messages and the last turn fit with the answer's room; otherwise it says
    what they alone need, and what would help instead."""
    messages = conversation(S, U, A, U)
    with pytest.raises(ContextWindowExceeded) as caught:
        fit_messages(messages, context_window=window, max_tokens=50, mode=TruncationMode.NONE)
    assert caught.value.estimated_tokens == estimate_prompt_tokens(messages) + 50
    (violation,) = caught.value.violations
    minimum = estimate_prompt_tokens([messages[0], messages[3]]) + 50
    if is_truncation_a_remedy:
        assert "use TRUNCATION_MODE_KEEP_RECENT" in violation.description
    else:
        assert f"TRUNCATION_MODE_KEEP_RECENT would still need {minimum}" in violation.description
        assert "shorten the last message" in violation.description
        assert "lower params.max_tokens (50)" in violation.description
        assert "Summarize" in violation.description


@pytest.mark.parametrize(
    ("roles", "window", "kept"),
    [
        # system + the last two messages fit, but the reply whose question went goes
        # too: what is sent starts with a user's turn.
        ((S, U, A, U, A, U), 450, [0, 5]),
        # system + the last three fit: a whole exchange and the question.
        ((S, U, A, U, A, U), 560, [0, 3, 4, 5]),
        # the system message in the middle is kept too.
        ((U, S, U, A, U), 450, [1, 4]),
        # only system + last user fit.
        ((S, U, A, U), 320, [0, 3]),
        # trailing assistant turn (a prefill) is newest; it is kept when it fits.
        ((S, U, A, U, A), 450, [0, 3, 4]),
        # a window for all but the oldest keeps from the next user message on.
        ((U, A, U, A, U), 500, [2, 3, 4]),
    ],
)
def test_keep_recent_keeps_system_and_newest(roles, window, kept):
    """Keep-recent keeps every system message and an unbroken run of the newest turns."""
    messages = conversation(*roles)
    fitted = fit_messages(
        messages, context_window=window, max_tokens=40, mode=TruncationMode.KEEP_RECENT
    )
    assert fitted.messages == tuple(messages[i] for i in kept)
    assert fitted.dropped == len(messages) - len(kept)
    assert fitted.estimated_tokens == estimate_prompt_tokens(fitted.messages)
    assert fitted.prompt_tokens == fitted.estimated_tokens  # no calibration
    assert fitted.estimated_tokens + 40 <= window


def test_keep_recent_drops_a_tool_call_turn_whose_question_went():
    """A kept run that would open with an assistant's tool calls and their results (its
    user message dropped) loses them too: the conversation sent opens with a user's turn,
    which chat templates that want roles to alternate require."""
    call = ToolCall(id="c1", name="lookup", arguments="{}")
    messages = (
        Message(S, "system"),
        Message(U, f"old question {LONG}"),
        Message(A, "", tool_calls=(call,)),
        Message(Role.TOOL, "result", tool_call_id="c1"),
        Message(A, "old answer"),
        Message(U, "new question"),
    )
    window = estimate_prompt_tokens(messages[2:]) + 50
    fitted = fit_messages(
        messages, context_window=window, max_tokens=40, mode=TruncationMode.KEEP_RECENT
    )
    assert fitted.messages == (messages[0], messages[5])
    assert fitted.dropped == 4
    assert fitted.estimated_tokens == estimate_prompt_tokens(fitted.messages)


def test_keep_recent_stops_at_first_turn_that_does_not_fit():
    """A big older turn is not skipped to squeeze in even older small ones."""
    messages = (
        Message(U, "short"),
        Message(A, LONG * 3),
        Message(U, "question"),
    )
    fitted = fit_messages(
        messages, context_window=200, max_tokens=20, mode=TruncationMode.KEEP_RECENT
    )
    assert fitted.messages == (messages[2],)
    assert fitted.dropped == 2


def test_keep_recent_rejects_when_minimum_does_not_fit():
    """When system + last user alone exceed the budget the request is refused."""
    messages = conversation(S, U, A, U)
    with pytest.raises(ContextWindowExceeded) as caught:
        fit_messages(messages, context_window=256, max_tokens=100, mode=TruncationMode.KEEP_RECENT)
    assert caught.value.limit_tokens == 256
    assert caught.value.estimated_tokens == estimate_prompt_tokens([messages[0], messages[3]]) + 100


def test_max_tokens_is_reserved():
    """A prompt that fits alone is cut when max_tokens leaves no room for it."""
    messages = conversation(U, A, U)
    window = estimate_prompt_tokens(messages) + 10
    assert fit_messages(messages, context_window=window, max_tokens=10, mode=TruncationMode.NONE)
    fitted = fit_messages(
        messages, context_window=window, max_tokens=11, mode=TruncationMode.KEEP_RECENT
    )
    assert fitted.dropped >= 1


@pytest.mark.parametrize(
    ("window", "max_tokens", "reserve"),
    [(4096, None, DEFAULT_ANSWER_RESERVE), (512, None, 128), (4096, 1000, 1000)],
)
def test_answer_reserve(window, max_tokens, reserve):
    """The answer's reserve is max_tokens, else the default capped at a quarter window."""
    assert answer_reserve(window, max_tokens) == reserve


@pytest.mark.parametrize(
    ("count", "max_tokens", "prompt"), [(1300, 300, 1000), (200, 300, 0), (1300, None, None)]
)
def test_prompt_in_count_with_answer(count, max_tokens, prompt):
    """A count of the prompt and the answer's room together (Moonshot's) is the prompt's
    less the max_tokens sent; with none sent it says no prompt's count: the upstream's
    own default room is in it, which may be more than the gateway's reserve (Moonshot's
    moonshot-v1 keeps 1024, the gateway 256). Before, it was read less the gateway's
    reserve: over the prompt's by the rest, which raised the calibration."""
    assert prompt_in_count_with_answer(count, max_tokens) == prompt


@pytest.mark.parametrize(("factor", "fits"), [(1.0, True), (1.5, False), (0.5, True)])
def test_calibration_scales_the_estimate(factor, fits):
    """A calibration factor above 1 makes a borderline prompt no longer fit."""
    messages = conversation(U)
    window = estimate_prompt_tokens(messages) + 40
    if fits:
        fitted = fit_messages(
            messages,
            context_window=window,
            max_tokens=40,
            mode=TruncationMode.NONE,
            calibration=factor,
        )
        assert fitted.dropped == 0
        # The window check is calibrated; the estimate handed on is the plain one.
        assert fitted.prompt_tokens == estimate_prompt_tokens(messages)
        assert fitted.estimated_tokens == math.ceil(fitted.prompt_tokens * factor)
    else:
        with pytest.raises(ContextWindowExceeded):
            fit_messages(
                messages,
                context_window=window,
                max_tokens=40,
                mode=TruncationMode.NONE,
                calibration=factor,
            )
