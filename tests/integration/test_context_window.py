"""Context-window handling through the real server: truncation, rejection, calibration."""

import functools
import json
import unicodedata
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from gateway_client.errors import error_details
from llmgateway.v1 import gateway_pb2 as pb
from service import tokens
from service.config import parse_config
from service.domain import Message, Role
from service.tokens import estimate_prompt_tokens
from tests.conftest import FAKE_MODEL, chat, fake_model_window, gateway_config
from tests.fake_upstream import Reply, Status
from tests.integration.tenancy_helpers import as_tenant, secure_config
from tests.scripted_upstream import ScriptedUpstream

WINDOW = 1024
# 100 words of 4 letters: 100 tokens of text, about 105 with the message overhead.
TURN = " ".join(["word"] * 100)
VIETNAMESE = (
    "Cổng kết nối giữ một nhóm kết nối tới mỗi nhà cung cấp và thử lại các yêu cầu thất bại "
    "với thời gian chờ tăng dần. Khi người gọi gửi một cuộc hội thoại dài hơn cửa sổ ngữ cảnh "
    "của mô hình, cổng sẽ từ chối với một lỗi rõ ràng hoặc bỏ đi những lượt cũ nhất, giữ lại "
    "mọi thông điệp hệ thống và câu hỏi mới nhất. Chi phí được tính từ số token mà nhà cung "
    "cấp báo cáo."
)


def small_window_config(base_url: str):
    """The test config with a 1024-token window for the fake model."""
    return gateway_config(
        base_url,
        models=fake_model_window(WINDOW),
    )


def conversation(turns: int, *, mode: int) -> pb.CompleteRequest:
    """A system message then `turns` alternating user/assistant turns, ending with a user turn."""
    messages = [pb.Message(role=pb.ROLE_SYSTEM, content="You are terse.")]
    for i in range(turns):
        role = pb.ROLE_USER if (turns - i) % 2 == 1 else pb.ROLE_ASSISTANT
        messages.append(pb.Message(role=role, content=f"turn{i} {TURN}"))
    return pb.CompleteRequest(
        model=FAKE_MODEL,
        messages=messages,
        params=pb.GenerationParams(max_tokens=100),
        truncation=pb.TruncationPolicy(mode=mode),
    )


@pytest.fixture
async def upstream_small():
    """A scripted upstream for these tests."""
    async with ScriptedUpstream(models=(FAKE_MODEL,)) as fake:
        yield fake


async def test_keep_recent_keeps_system_and_newest_and_reports_drops(upstream_small, start_gateway):
    """KEEP_RECENT sends the system message and the newest turns that fit, and counts drops."""
    gateway = await start_gateway(small_window_config(upstream_small.base_url))
    request = conversation(15, mode=pb.TRUNCATION_MODE_KEEP_RECENT)
    response = await gateway.stub.Complete(request)
    sent = upstream_small.requests[-1].body["messages"]
    assert sent[0] == {"role": "system", "content": "You are terse."}
    kept_turns = [m["content"].split()[0] for m in sent[1:]]
    # The newest turns, unbroken, from a user's turn (no reply whose question went: chat
    # templates that want roles to alternate refuse it) to the last user turn.
    assert kept_turns == [f"turn{i}" for i in range(15 - len(kept_turns), 15)]
    assert sent[1]["role"] == sent[-1]["role"] == "user"
    assert response.metadata.dropped_messages == 15 - len(kept_turns)
    assert 1 <= len(kept_turns) < 15
    kept = [Message(Role(m["role"]), m["content"]) for m in sent]
    assert estimate_prompt_tokens(kept) + 100 <= WINDOW
    # One more exchange (a question and its answer) would not have fitted.
    assert estimate_prompt_tokens(kept) + 2 * 105 + 100 > WINDOW


async def test_none_mode_rejects_with_estimate_and_limit(upstream_small, start_gateway):
    """TRUNCATION_MODE_NONE refuses an oversize prompt with BadRequest and the numbers."""
    gateway = await start_gateway(small_window_config(upstream_small.base_url))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Complete(conversation(15, mode=pb.TRUNCATION_MODE_NONE))
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    details = error_details(caught.value)
    assert details.reason == "CONTEXT_WINDOW_EXCEEDED"
    assert details.metadata["limit_tokens"] == str(WINDOW)
    estimate = int(details.metadata["estimated_tokens"])
    assert estimate > WINDOW
    ((field, description),) = details.field_violations
    assert field == "messages"
    assert str(estimate) in description
    assert str(WINDOW) in description
    assert "use TRUNCATION_MODE_KEEP_RECENT" in description  # the last turn would fit
    assert upstream_small.requests == []


async def _refused_over_the_window(gateway, request: pb.CompleteRequest) -> tuple[str, str]:
    """The field and description of `request`'s refusal as over its model's window."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Complete(request)
    details = error_details(caught.value)
    assert details.reason == "CONTEXT_WINDOW_EXCEEDED"
    ((field, description),) = details.field_violations
    return field, description


async def test_none_mode_suggests_no_truncation_that_could_not_fit(upstream_small, start_gateway):
    """A last user message too long for the window by itself, with truncation off: the
    refusal says what KEEP_RECENT would still need and suggests what would help (a
    shorter message, a lower max_tokens, Summarize), not KEEP_RECENT. Before, it always
    suggested KEEP_RECENT, which refuses the same prompt."""
    gateway = await start_gateway(small_window_config(upstream_small.base_url))
    request = pb.CompleteRequest(
        model=FAKE_MODEL,
        messages=[
            pb.Message(role=pb.ROLE_SYSTEM, content="You are terse."),
            pb.Message(role=pb.ROLE_USER, content=TURN * 12),
        ],
        params=pb.GenerationParams(max_tokens=100),
        truncation=pb.TruncationPolicy(mode=pb.TRUNCATION_MODE_NONE),
    )
    field, description = await _refused_over_the_window(gateway, request)
    assert field == "messages"
    assert "use TRUNCATION_MODE_KEEP_RECENT" not in description
    assert "TRUNCATION_MODE_KEEP_RECENT would still need" in description
    assert "shorten the last message" in description
    assert "lower params.max_tokens (100)" in description
    assert "Summarize" in description
    assert upstream_small.requests == []


async def test_decomposed_text_is_not_sent_over_the_window(upstream_small, start_gateway):
    """Text in NFD (a letter, then its combining marks) is refused when its real count does
    not fit: each mark takes about 2 tokens, not the 1 a precomposed letter does."""
    gateway = await start_gateway(small_window_config(upstream_small.base_url))
    text = unicodedata.normalize("NFD", VIETNAMESE)  # 384 tokens in cl100k, 305 in o200k
    request = pb.CompleteRequest(
        model=FAKE_MODEL,
        messages=[pb.Message(role=pb.ROLE_USER, content=text)],
        # With the 7 tokens of chat template, 384 + 7 + 724 is over the 1024 window.
        params=pb.GenerationParams(max_tokens=724),
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Complete(request)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(caught.value).reason == "CONTEXT_WINDOW_EXCEEDED"
    assert upstream_small.requests == []


async def test_keep_recent_rejects_when_last_user_message_alone_is_too_long(
    upstream_small, start_gateway
):
    """Even KEEP_RECENT refuses when the last user message cannot fit by itself."""
    gateway = await start_gateway(small_window_config(upstream_small.base_url))
    request = pb.CompleteRequest(
        model=FAKE_MODEL,
        messages=[pb.Message(role=pb.ROLE_USER, content=TURN * 12)],
        truncation=pb.TruncationPolicy(mode=pb.TRUNCATION_MODE_KEEP_RECENT),
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Complete(request)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(caught.value).reason == "CONTEXT_WINDOW_EXCEEDED"
    assert upstream_small.requests == []


async def test_calibration_from_reported_usage_admits_what_the_estimate_refused(
    upstream_small, start_gateway
):
    """After answers report half the estimated prompt tokens, a prompt refused before fits."""

    def half_of_estimate(body):
        messages = [Message(Role(m["role"]), m["content"]) for m in body["messages"]]
        return Reply(prompt_tokens=estimate_prompt_tokens(messages) // 2)

    upstream_small.respond = half_of_estimate
    gateway = await start_gateway(small_window_config(upstream_small.base_url))
    big = conversation(9, mode=pb.TRUNCATION_MODE_NONE)  # about 960 tokens + 100 reserved
    with pytest.raises(grpc.aio.AioRpcError):
        await gateway.stub.Complete(big)
    for _ in range(3):
        await gateway.stub.Complete(conversation(3, mode=pb.TRUNCATION_MODE_NONE))
    response = await gateway.stub.Complete(big)
    assert response.metadata.dropped_messages == 0
    assert gateway.server.pipeline.calibration.factor(FAKE_MODEL, "default") == pytest.approx(
        0.55, abs=0.02
    )


async def test_one_tenants_calibration_does_not_fit_another_tenants_prompts(
    upstream_small, start_gateway
):
    """team-a's answers report half the estimated prompt tokens (text the estimator
    over-counts): its own prompt refused before then fits. team-b's same prompt is still
    refused before it is sent, as with no calibration. Before, the factor was one per
    model: team-a's traffic had team-b's prompt sent over the window (an upstream
    counting team-b's text as estimated would refuse it)."""

    def half_of_estimate(body):
        messages = [Message(Role(m["role"]), m["content"]) for m in body["messages"]]
        return Reply(prompt_tokens=estimate_prompt_tokens(messages) // 2)

    upstream_small.respond = half_of_estimate
    config = secure_config(upstream_small.base_url, models=fake_model_window(WINDOW))
    gateway = await start_gateway(config)
    big = conversation(9, mode=pb.TRUNCATION_MODE_NONE)  # about 960 tokens + 100 reserved
    for _ in range(3):
        await gateway.stub.Complete(
            conversation(3, mode=pb.TRUNCATION_MODE_NONE), metadata=as_tenant("team-a")
        )
    sent = len(upstream_small.requests)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Complete(big, metadata=as_tenant("team-b"))
    assert error_details(caught.value).reason == "CONTEXT_WINDOW_EXCEEDED"
    assert len(upstream_small.requests) == sent
    response = await gateway.stub.Complete(big, metadata=as_tenant("team-a"))
    assert response.metadata.dropped_messages == 0
    calibration = gateway.server.pipeline.calibration
    assert calibration.factor(FAKE_MODEL, "team-b") == 1.0
    assert calibration.factor(FAKE_MODEL, "team-a") == pytest.approx(0.55, abs=0.02)


async def test_a_tenants_tokens_per_minute_counts_what_keep_recent_sends(
    upstream_small, start_gateway
):
    """A chat whose history (about 2,700 tokens) is past its tenant's minute of tokens
    (2,000) is served under KEEP_RECENT, unary, again (the same bytes, a repeat the cache
    answers) and streamed: each call takes the tokens of the turns sent, at most the
    window of 512. Before, it took the whole history, and was refused "can never fit"
    (RESOURCE_EXHAUSTED, pushback -1) however little of it the window would send."""
    config = secure_config(
        upstream_small.base_url,
        models=fake_model_window(512),
        tenants={"team-a": {"tokens_per_minute": 2000}},
        cache={"backend": "memory"},
    )
    gateway = await start_gateway(config)
    request = conversation(25, mode=pb.TRUNCATION_MODE_KEEP_RECENT)
    request.params.temperature = 0  # cached: the same bytes again are a repeat
    for _ in range(2):
        response = await gateway.stub.Complete(request, metadata=as_tenant("team-a"))
        assert response.metadata.dropped_messages > 0
    assert len(upstream_small.requests) == 1
    stream = pb.CompleteStreamRequest(
        model=request.model,
        messages=request.messages,
        params=request.params,
        truncation=request.truncation,
        cache=pb.CachePolicy(mode=pb.CACHE_MODE_BYPASS),
    )
    events = [e async for e in gateway.stub.CompleteStream(stream, metadata=as_tenant("team-a"))]
    assert events[-1].final.dropped_messages > 0


async def test_a_batch_item_takes_the_tokens_keep_recent_sends(upstream_small, start_gateway):
    """A batch item whose history is past its tenant's minute of tokens is served under
    KEEP_RECENT, taking the tokens of the turns sent. Before, it took the whole history:
    the item failed "can never fit" (RESOURCE_EXHAUSTED)."""
    config = secure_config(
        upstream_small.base_url,
        models=fake_model_window(512),
        tenants={"team-a": {"tokens_per_minute": 2000}},
    )
    gateway = await start_gateway(config)
    item = pb.BatchItem(id="a", request=conversation(25, mode=pb.TRUNCATION_MODE_KEEP_RECENT))
    request = pb.CompleteBatchRequest(items=[item])
    events = [e async for e in gateway.stub.CompleteBatch(request, metadata=as_tenant("team-a"))]
    (result,) = [e.result for e in events if e.HasField("result")]
    assert result.WhichOneof("outcome") == "response", result.error.message
    assert result.response.metadata.dropped_messages > 0


async def test_calibration_never_goes_below_its_floor(upstream_small, start_gateway):
    """An upstream that reports absurdly few tokens cannot push prompts far over the window."""
    upstream_small.default = Reply(prompt_tokens=1)
    gateway = await start_gateway(small_window_config(upstream_small.base_url))
    for _ in range(5):
        await gateway.stub.Complete(conversation(3, mode=pb.TRUNCATION_MODE_NONE))
    assert gateway.server.pipeline.calibration.factor(FAKE_MODEL, "default") == 0.5
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Complete(conversation(19, mode=pb.TRUNCATION_MODE_NONE))
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_one_absurd_usage_report_does_not_pin_the_calibration(upstream_small, start_gateway):
    """One answer reporting 10⁹ prompt tokens among honest ones moves the calibration
    only as far as a ratio at its ceiling would: a prompt that fits the plain estimate
    with room to spare is still served. Before, the ratio joined the mean as it was, and
    the factor stayed at its ceiling (4x) for a hundred answers and more: prompts a
    quarter of the window long were refused, or truncated under KEEP_RECENT."""

    def as_estimated(body):
        messages = [Message(Role(m["role"]), m["content"]) for m in body["messages"]]
        return Reply(prompt_tokens=estimate_prompt_tokens(messages))

    upstream_small.respond = as_estimated
    gateway = await start_gateway(small_window_config(upstream_small.base_url))
    for _ in range(3):
        await gateway.stub.Complete(conversation(3, mode=pb.TRUNCATION_MODE_NONE))
    upstream_small.respond = lambda body: Reply(prompt_tokens=1_000_000_000)
    await gateway.stub.Complete(conversation(3, mode=pb.TRUNCATION_MODE_NONE))
    upstream_small.respond = as_estimated
    for _ in range(3):
        await gateway.stub.Complete(conversation(3, mode=pb.TRUNCATION_MODE_NONE))
    # About 550 tokens and 100 reserved: it fits a window of 1024 unless the factor is
    # past 1.7.
    response = await gateway.stub.Complete(conversation(5, mode=pb.TRUNCATION_MODE_KEEP_RECENT))
    assert response.metadata.dropped_messages == 0


@pytest.mark.parametrize("mode", [pb.TRUNCATION_MODE_NONE, pb.TRUNCATION_MODE_KEEP_RECENT])
async def test_max_tokens_that_fill_the_window_are_the_violation(
    upstream_small, start_gateway, mode
):
    """A max_tokens of the whole window leaves no room for any prompt: the violation names
    params.max_tokens, not the messages (shortening them or truncating could not help)."""
    gateway = await start_gateway(small_window_config(upstream_small.base_url))
    request = pb.CompleteRequest(
        model=FAKE_MODEL,
        messages=[pb.Message(role=pb.ROLE_USER, content="Say hi")],
        params=pb.GenerationParams(max_tokens=WINDOW),
        truncation=pb.TruncationPolicy(mode=mode),
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Complete(request)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    details = error_details(caught.value)
    assert details.reason == "CONTEXT_WINDOW_EXCEEDED"
    assert details.metadata["limit_tokens"] == str(WINDOW)
    assert int(details.metadata["estimated_tokens"]) > WINDOW
    ((field, description),) = details.field_violations
    assert field == "params.max_tokens"
    assert f"context window of {WINDOW}" in description
    assert upstream_small.requests == []


@pytest.mark.parametrize("mode", [pb.TRUNCATION_MODE_NONE, pb.TRUNCATION_MODE_KEEP_RECENT])
async def test_a_prompt_over_the_window_only_with_max_tokens_names_lowering_it(
    upstream_small, start_gateway, mode
):
    """A short prompt that would fit but for a large max_tokens is refused on `messages`
    (a lower max_tokens and a shorter prompt would both do), and the description names
    lowering max_tokens as well as shortening the prompt."""
    gateway = await start_gateway(small_window_config(upstream_small.base_url))
    request = pb.CompleteRequest(
        model=FAKE_MODEL,
        messages=[pb.Message(role=pb.ROLE_USER, content=TURN)],
        params=pb.GenerationParams(max_tokens=WINDOW - 50),
        truncation=pb.TruncationPolicy(mode=mode),
    )
    field, description = await _refused_over_the_window(gateway, request)
    assert field == "messages"
    assert "shorten" in description
    assert f"lower params.max_tokens ({WINDOW - 50})" in description
    assert upstream_small.requests == []


# What OpenAI, vLLM and DeepSeek answer (400) to a prompt over the window, and llama.cpp.
OPENAI_TOO_LONG = (
    '{"error": {"message": "This model\'s maximum context length is 1024 tokens. However, '
    'your messages resulted in 1100 tokens.", "type": "invalid_request_error", '
    '"param": "messages", "code": "context_length_exceeded"}}'
)
LLAMA_CPP_TOO_LONG = (
    '{"error": {"code": 400, "message": "the request exceeds the available context size, '
    'try increasing it", "type": "exceed_context_size_error", "n_prompt_tokens": 1100, '
    '"n_ctx": 1024}}'
)
# vLLM before 0.10 (and servers built on its OpenAI layer) answer its error object bare,
# not under "error".
VLLM_TOO_LONG = (
    '{"object": "error", "message": "This model\'s maximum context length is 1024 tokens. '
    "However, you requested 1100 tokens (1000 in the messages, 100 in the completion). "
    'Please reduce the length of the messages or completion.", "type": "BadRequestError", '
    '"param": null, "code": 400}'
)


@pytest.mark.parametrize(
    "body",
    [OPENAI_TOO_LONG, LLAMA_CPP_TOO_LONG, VLLM_TOO_LONG],
    ids=["openai", "llama.cpp", "vllm"],
)
@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_an_upstream_refusing_a_prompt_as_too_long_corrects_the_calibration(
    upstream_small, start_gateway, body, stream
):
    """The upstream counts more tokens than the calibrated estimate (trained low by
    answers reporting few): it refuses with its context-length 400. The caller gets what
    the gateway's own refusal says (INVALID_ARGUMENT, `CONTEXT_WINDOW_EXCEEDED`, a
    violation on `messages`), not a generic upstream rejection, and the calibration goes
    back to the plain estimate, so the same prompt is refused (or truncated) before it is
    sent again."""
    upstream_small.default = Reply(prompt_tokens=1)
    gateway = await start_gateway(small_window_config(upstream_small.base_url))
    for _ in range(5):
        await gateway.stub.Complete(conversation(3, mode=pb.TRUNCATION_MODE_NONE))
    calibration = gateway.server.pipeline.calibration
    assert calibration.factor(FAKE_MODEL, "default") == 0.5
    big = conversation(9, mode=pb.TRUNCATION_MODE_NONE)  # fits only at half the estimate
    upstream_small.default = Status(400, body=body)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if stream:
            request = pb.CompleteStreamRequest(
                model=big.model, messages=big.messages, params=big.params
            )
            [_ async for _ in gateway.stub.CompleteStream(request)]
        else:
            await gateway.stub.Complete(big)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    details = error_details(caught.value)
    assert details.reason == "CONTEXT_WINDOW_EXCEEDED"
    assert [field for field, _ in details.field_violations] == ["messages"]
    # What the upstream said of it, too: its count and limit, which the gateway's lacks.
    said = json.loads(body)
    said = said.get("error", said)["message"]
    assert details.metadata["upstream_message"] == said
    assert details.message.endswith(f"the gateway: {said}")
    assert calibration.factor(FAKE_MODEL, "default") >= 1.0
    sent = len(upstream_small.requests)
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await gateway.stub.Complete(big)
    assert error_details(again.value).reason == "CONTEXT_WINDOW_EXCEEDED"
    assert len(upstream_small.requests) == sent  # refused by the gateway this time


# Other providers' refusals as too long: TGI (Together, Hugging Face endpoints) with its
# 422 and the message alone; Gemini's OpenAI endpoint, its error in a list; Anthropic's.
TGI_TOO_LONG = (
    422,
    "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 1024. Given: "
    "1000 `inputs` tokens and 100 `max_new_tokens`",
)
# TGI's refusal of a prompt over its `--max-input-tokens` whose answer would still fit.
TGI_INPUT_TOO_LONG = (
    422,
    "Input validation error: `inputs` must have less than 1000 tokens. Given: 1100",
)
GEMINI_TOO_LONG = (
    400,
    "The input token count (1100) exceeds the maximum number of tokens allowed (1024).",
)
ANTHROPIC_TOO_LONG = (400, "prompt is too long: 1100 tokens > 1024 maximum")


@pytest.mark.parametrize(
    ("status", "message", "body"),
    [
        (*TGI_TOO_LONG, {"error": TGI_TOO_LONG[1], "error_type": "validation"}),
        (*TGI_INPUT_TOO_LONG, {"error": TGI_INPUT_TOO_LONG[1], "error_type": "validation"}),
        (
            *GEMINI_TOO_LONG,
            [{"error": {"code": 400, "message": GEMINI_TOO_LONG[1], "status": "INVALID_ARGUMENT"}}],
        ),
        (
            *ANTHROPIC_TOO_LONG,
            {"error": {"type": "invalid_request_error", "message": ANTHROPIC_TOO_LONG[1]}},
        ),
    ],
    ids=["tgi", "tgi-input", "gemini", "anthropic"],
)
async def test_other_providers_refusals_as_too_long_are_context_window_exceeded(
    upstream_small, start_gateway, status, message, body
):
    """TGI's 422s, Gemini's listed error and Anthropic's message say the prompt is over the
    window as OpenAI's 400 does: the caller gets `CONTEXT_WINDOW_EXCEEDED` with what the
    upstream said, and the calibration learns, so the same prompt is refused before it is
    sent again. Before, each was an upstream rejection that taught nothing."""
    gateway = await start_gateway(small_window_config(upstream_small.base_url))
    big = conversation(9, mode=pb.TRUNCATION_MODE_NONE)
    upstream_small.default = Reply(prompt_tokens=1)
    for _ in range(5):  # the calibration, trained low, lets the big prompt through
        await gateway.stub.Complete(conversation(3, mode=pb.TRUNCATION_MODE_NONE))
    upstream_small.default = Status(status, body=json.dumps(body))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Complete(big)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    details = error_details(caught.value)
    assert details.reason == "CONTEXT_WINDOW_EXCEEDED"
    assert details.metadata["upstream_message"] == message
    sent = len(upstream_small.requests)
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await gateway.stub.Complete(big)
    assert error_details(again.value).reason == "CONTEXT_WINDOW_EXCEEDED"
    assert len(upstream_small.requests) == sent  # refused by the gateway this time


async def test_a_refusal_as_too_long_moves_no_bill_of_an_estimated_prompt(
    upstream_small, start_gateway
):
    """An upstream refuses a prompt far inside the catalog's window as too long (its own
    window is smaller): the calibration fitting prompts rises at once, but an answer
    without usage is still billed its prompt's plain estimate, as before the refusal.
    Refusals say where the window is, not what the upstream bills: before, the factor
    the refusal set (up to four) multiplied every estimated bill while the process ran."""
    gateway = await start_gateway(small_window_config(upstream_small.base_url))
    small = conversation(1, mode=pb.TRUNCATION_MODE_NONE)
    small.cache.mode = pb.CACHE_MODE_BYPASS
    upstream_small.default = Reply(include_usage=False)
    before = (await gateway.stub.Complete(small)).metadata.usage
    upstream_small.default = Status(400, body=OPENAI_TOO_LONG)
    with pytest.raises(grpc.aio.AioRpcError):
        await gateway.stub.Complete(small)
    assert gateway.server.pipeline.calibration.factor(FAKE_MODEL, "default") > 1.0
    upstream_small.default = Reply(include_usage=False)
    after = (await gateway.stub.Complete(small)).metadata.usage
    assert before.estimated
    assert after.estimated
    assert after.input_tokens == before.input_tokens


def counting_more_than_estimated(body):
    """An upstream whose tokenizer counts 1.3 times the estimate (plain-ASCII Swahili, say):
    it refuses a prompt that, with the max_tokens asked, is over the window, with its
    context-length 400, and reports its count on an answer."""
    messages = [Message(Role(m["role"]), m["content"]) for m in body["messages"]]
    counted = round(1.3 * estimate_prompt_tokens(messages))
    if counted + body.get("max_tokens", 0) > WINDOW:
        return Status(400, body=OPENAI_TOO_LONG)
    return Reply(prompt_tokens=counted)


async def complete_or_stream(gateway, request: pb.CompleteRequest, *, stream: bool):
    """`request` through Complete, or CompleteStream: its metadata (the final's)."""
    if not stream:
        return (await gateway.stub.Complete(request)).metadata
    streamed = pb.CompleteStreamRequest(
        model=request.model,
        messages=request.messages,
        params=request.params,
        truncation=request.truncation,
    )
    return [event async for event in gateway.stub.CompleteStream(streamed)][-1].final


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_an_upstream_refusal_teaches_a_factor_already_at_the_estimate(
    upstream_small, start_gateway, stream
):
    """Text the estimator counts low (the upstream counts 1.3 times it) with no factor
    learned, 1.0: the upstream refuses the prompt as too long once, and the same
    KEEP_RECENT call is then truncated before it is sent, and answered. Before, only a
    factor under 1 was corrected: the same prompt was sent, and refused, on every call."""
    upstream_small.respond = counting_more_than_estimated
    gateway = await start_gateway(small_window_config(upstream_small.base_url))
    request = conversation(7, mode=pb.TRUNCATION_MODE_KEEP_RECENT)  # about 750 + 100
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await complete_or_stream(gateway, request, stream=stream)
    assert error_details(caught.value).reason == "CONTEXT_WINDOW_EXCEEDED"
    # The advice fits a caller who already asked for KEEP_RECENT: send it again.
    assert "send it again under TRUNCATION_MODE_KEEP_RECENT" in (caught.value.details() or "")
    assert len(upstream_small.requests) == 1
    metadata = await complete_or_stream(gateway, request, stream=stream)
    assert metadata.dropped_messages > 0
    assert len(upstream_small.requests) == 2


async def test_an_upstream_refusal_has_the_same_prompt_refused_before_it_is_sent(
    upstream_small, start_gateway
):
    """With truncation off, the prompt an upstream refused as too long (counting more
    than the estimate, at a factor of 1.0) is refused by the gateway the next time,
    without an upstream call; a prompt that fits with room to spare is still sent."""
    upstream_small.respond = counting_more_than_estimated
    gateway = await start_gateway(small_window_config(upstream_small.base_url))
    request = conversation(7, mode=pb.TRUNCATION_MODE_NONE)
    with pytest.raises(grpc.aio.AioRpcError):
        await gateway.stub.Complete(request)
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await gateway.stub.Complete(request)
    assert error_details(again.value).reason == "CONTEXT_WINDOW_EXCEEDED"
    assert len(upstream_small.requests) == 1
    await gateway.stub.Complete(conversation(3, mode=pb.TRUNCATION_MODE_NONE))
    assert len(upstream_small.requests) == 2


async def test_another_400_is_still_the_upstream_rejecting_the_request(
    upstream_small, start_gateway
):
    """A 400 about something else is not taken for a context overflow."""
    upstream_small.default = Status(
        400, body='{"error": {"message": "temperature is not supported", "code": "bad_param"}}'
    )
    gateway = await start_gateway(small_window_config(upstream_small.base_url))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Complete(conversation(3, mode=pb.TRUNCATION_MODE_NONE))
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(caught.value).reason == "UPSTREAM_REJECTED_REQUEST"


async def test_an_answer_schema_counts_against_the_window(upstream_small, start_gateway):
    """A JSON Schema is prompt the provider bills: with it, fewer turns are kept, and a
    schema past the window is refused before any upstream call."""
    gateway = await start_gateway(small_window_config(upstream_small.base_url))
    plain = conversation(9, mode=pb.TRUNCATION_MODE_KEEP_RECENT)
    await gateway.stub.Complete(plain)
    kept_plain = len(upstream_small.requests[-1].body["messages"])
    schema = '{"type": "object", "description": "' + "word " * 300 + '"}'
    with_schema = pb.CompleteRequest()
    with_schema.CopyFrom(plain)
    with_schema.params.response_format.type = pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA
    with_schema.params.response_format.json_schema = schema
    response = await gateway.stub.Complete(with_schema)
    sent = upstream_small.requests[-1].body
    assert sent["response_format"]["type"] == "json_schema"
    assert len(sent["messages"]) < kept_plain
    assert response.metadata.dropped_messages > 0
    too_big = pb.CompleteRequest()
    too_big.CopyFrom(with_schema)
    too_big.params.response_format.json_schema = (
        '{"type": "object", "description": "' + "word " * 1200 + '"}'
    )
    calls = len(upstream_small.requests)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await gateway.stub.Complete(too_big)
    assert error_details(refused.value).reason == "CONTEXT_WINDOW_EXCEEDED"
    assert len(upstream_small.requests) == calls


async def test_a_long_prompt_is_estimated_once_a_call(upstream_small, start_gateway, monkeypatch):
    """A prompt long enough for validation to check its estimate against
    `max_prompt_tokens` is not estimated again when fitted to the window: each pass over
    4 MiB holds the event loop for up to a second."""
    passes: list[int] = []
    estimate = tokens._estimate
    monkeypatch.setattr(
        tokens, "_estimate", lambda text: passes.append(len(text)) or estimate(text)
    )
    gateway = await start_gateway(
        gateway_config(
            upstream_small.base_url,
            models=fake_model_window(200_000),
            defaults={"max_prompt_tokens": 100_000},
        )
    )
    prompt = "word " * 10_000  # 50,000 characters: up to 250,000 tokens by the bound
    response = await gateway.stub.Complete(chat(prompt))
    assert response.metadata.usage.input_tokens > 0
    assert [n for n in passes if n > tokens._MEMO_MAX_CHARS] == [len(prompt)]


REPO_CONFIG = Path(__file__).resolve().parents[2] / "config" / "gateway.yaml"
# OpenAI's own refusal of a prompt over gpt-4's window (gpt-4-0613: 8,192 tokens).
GPT_4_WINDOW = 8192
GPT_4_TOO_LONG = json.dumps(
    {
        "error": {
            "message": "This model's maximum context length is 8192 tokens. However, your "
            "messages resulted in 21102 tokens. Please reduce the length of the messages.",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }
    }
)


def like_openai_gpt_4(body):
    """OpenAI's gpt-4: a prompt (with max_tokens) over 8,192 tokens is refused."""
    messages = [Message(Role(m["role"]), m["content"]) for m in body["messages"]]
    if estimate_prompt_tokens(messages) + body.get("max_tokens", 0) > GPT_4_WINDOW:
        return Status(400, body=GPT_4_TOO_LONG)
    return Reply()


async def test_the_shipped_gpt_4_preset_fits_prompts_to_gpt_4s_window(
    upstream_small, start_gateway
):
    """With the shipped config, a KEEP_RECENT conversation on `gpt-4` longer than the
    model's 8,192 tokens is truncated to them and answered. Before, the catalog gave
    gpt-4 gpt-4o's 128K window (and price): the whole conversation was sent, and OpenAI
    refused it on every call, as the most a refusal teaches the calibration (four times
    the estimate) still fitted it into 128K."""
    upstream_small.respond = like_openai_gpt_4
    data = yaml.safe_load(REPO_CONFIG.read_text(encoding="utf-8"))
    (openai,) = [u for u in data["upstreams"] if u["name"] == "openai"]
    openai["base_url"] = upstream_small.base_url
    data["server"]["listen"] = "127.0.0.1:0"
    environ = {"OPENAI_API_KEY": "sk-test-shipped-preset"}
    gateway = await start_gateway(parse_config(data, source="<test>", environ=environ))
    listed = await gateway.stub.ListModels(pb.ListModelsRequest())
    assert [(m.name, m.context_window) for m in listed.models] == [("gpt-4", GPT_4_WINDOW)]
    turn = " ".join(["word"] * 1000)  # about 1,000 tokens
    roles = [pb.ROLE_USER, pb.ROLE_ASSISTANT]
    request = pb.CompleteRequest(
        model="gpt-4",
        messages=[pb.Message(role=roles[i % 2], content=f"turn{i} {turn}") for i in range(21)],
        truncation=pb.TruncationPolicy(mode=pb.TRUNCATION_MODE_KEEP_RECENT),
    )
    response = await gateway.stub.Complete(request)
    assert response.metadata.dropped_messages > 0
    assert [r.body["model"] for r in upstream_small.requests] == ["gpt-4"]


def _too_long(prompt: int, completion: int, *, wording: str, window: int = WINDOW) -> str:
    """An over-the-window refusal's message, as llama-cpp-python's server and vLLM before
    0.10 word it, as OpenAI does, as vLLM does since 0.10, or as OpenRouter or Mistral
    does."""
    if wording == "mistral":
        return (
            f"Prompt contains {prompt} tokens and 0 draft tokens, too large for model with "
            f"{window} maximum context length"
        )
    if wording == "openrouter":
        return (
            f"This endpoint's maximum context length is {window} tokens. However, you "
            f"requested about {prompt + completion} tokens ({prompt} of text input, "
            f"{completion} in the output). Please reduce the length of either one, or use "
            'the "middle-out" transform to compress your prompt automatically.'
        )
    if wording == "vllm-0.10":
        return (
            f"This model's maximum context length is {window} tokens. However, your request "
            f"has {prompt} input tokens. Please reduce the length of the input messages."
        )
    if wording == "openai":
        return (
            f"This model's maximum context length is {window} tokens. However, your messages "
            f"resulted in {prompt} tokens. Please reduce the length of the messages."
        )
    return (
        f"This model's maximum context length is {window} tokens. However, you requested "
        f"{prompt + completion} tokens ({prompt} in the messages, {completion} in the "
        "completion). Please reduce the length of the messages or completion."
    )


def _refusal(prompt: int, completion: int, *, wording: str, window: int = WINDOW) -> Status:
    """The 400 an upstream refusing a prompt of `prompt` tokens with a max_tokens of
    `completion` over its `window` answers, in the body and words of `wording`: Gemini's
    OpenAI endpoint (its error in a list, its input limit) and Anthropic's (the prompt
    alone over the window, or with its max_tokens) and Moonshot's (its count of the prompt
    and the max_tokens together, neither code nor type saying too long) as they write
    them, a refusal saying no count ("context length exceeded"), or `_too_long`'s."""
    if wording == "gemini":
        message = (
            f"The input token count ({prompt}) exceeds the maximum number of tokens allowed "
            f"({window})."
        )
        error = {"code": 400, "message": message, "status": "INVALID_ARGUMENT"}
        return Status(400, body=json.dumps([{"error": error}]))
    if wording in ("tgi", "tgi-input"):
        message = (
            f"Input validation error: `inputs` tokens + `max_new_tokens` must be <= {window}. "
            f"Given: {prompt} `inputs` tokens and {completion} `max_new_tokens`"
        )
        if wording == "tgi-input":
            message = (
                f"Input validation error: `inputs` must have less than {window} tokens. "
                f"Given: {prompt}"
            )
        return Status(422, body=json.dumps({"error": message, "error_type": "validation"}))
    if wording == "anthropic":
        message = f"prompt is too long: {prompt} tokens > {window} maximum"
        if prompt <= window:
            message = (
                f"input length and `max_tokens` exceed context limit: {prompt} + {completion} "
                f"> {window}, decrease input length or `max_tokens` and try again"
            )
        error = {"type": "invalid_request_error", "message": message}
        return Status(400, body=json.dumps({"type": "error", "error": error}))
    if wording == "moonshot":
        message = (
            "Invalid request: Your request exceeded model token limit: "
            f"{window} (requested: {prompt + completion})"
        )
        error = {"message": message, "type": "invalid_request_error"}
        return Status(400, body=json.dumps({"error": error}))
    message = "context length exceeded"
    if wording != "no-count":
        message = _too_long(prompt, completion, wording=wording, window=window)
    error = {"message": message, "type": "invalid_request_error", "param": "messages"}
    return Status(400, body=json.dumps({"error": {**error, "code": "context_length_exceeded"}}))


def _counts_two_a_word(
    body: dict[str, Any], *, wording: str = "llama-cpp-python"
) -> Reply | Status:
    """An upstream counting every word twice as the estimate does (a tokenizer of rare
    words): over its 1024-token window it refuses, saying its window and its count
    (Gemini's and TGI's `--max-input-tokens` over their limit on the prompt alone, of 900
    tokens)."""
    prompt = 2 * sum(len(str(m.get("content") or "").split()) for m in body["messages"])
    completion = body["max_tokens"]
    if wording in ("gemini", "tgi-input"):
        return (
            Reply(prompt_tokens=prompt)
            if prompt <= 900
            else _refusal(prompt, 0, wording=wording, window=900)
        )
    if prompt + completion <= WINDOW:
        return Reply(prompt_tokens=prompt)
    return _refusal(prompt, completion, wording=wording)


@pytest.mark.parametrize(
    "wording",
    [
        "llama-cpp-python",
        "openai",
        "vllm-0.10",
        "openrouter",
        "mistral",
        "moonshot",
        "gemini",
        "anthropic",
        "tgi",
        "tgi-input",
    ],
)
async def test_keep_recent_fits_after_one_refusal_that_says_the_upstreams_count(
    start_gateway, wording
):
    """A conversation the upstream counts at twice the estimate: the first KEEP_RECENT
    call is refused, its refusal saying the upstream's count; the next one is fitted to
    that count and answered.

    Before, the refusal taught only that the count was over the room the prompt was
    fitted into: each call dropped one more turn and was refused again, four times for a
    conversation 1.6 times over the local model's window. And so it still did where the
    refusal said its count in OpenAI's other words or vLLM's since 0.10, which only
    llama-cpp-python's (and vLLM's before 0.10) were read in, and in OpenRouter's and
    Mistral's. Moonshot's was not read as too long at all: an upstream rejection that
    taught nothing, and so the same call's every time."""
    respond = functools.partial(_counts_two_a_word, wording=wording)
    async with ScriptedUpstream(models=(FAKE_MODEL,), respond=respond) as upstream:
        gateway = await start_gateway(small_window_config(upstream.base_url))
        request = conversation(15, mode=pb.TRUNCATION_MODE_KEEP_RECENT)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gateway.stub.Complete(request)
        assert error_details(caught.value).reason == "CONTEXT_WINDOW_EXCEEDED"
        answer = await gateway.stub.Complete(request)
    assert answer.metadata.dropped_messages > 0
    assert len(upstream.requests) == 2


def _input_limit_of_700(body: dict[str, Any], *, wording: str) -> Reply | Status:
    """TGI started with `--max-input-tokens 700 --max-total-tokens 1024` (the catalog's
    window), or Gemini with an input limit of 700, counting every word twice as the
    estimate does and 7 more: a prompt over 700 is refused, whatever its max_tokens."""
    prompt = 7 + 2 * sum(len(str(m.get("content") or "").split()) for m in body["messages"])
    if prompt <= 700:
        return Reply(prompt_tokens=prompt)
    return _refusal(prompt, body["max_tokens"], wording=wording, window=700)


@pytest.mark.parametrize("wording", ["tgi-input", "gemini"])
async def test_a_refusal_over_an_input_limit_fits_the_prompt_to_that_limit(start_gateway, wording):
    """A KEEP_RECENT call with a max_tokens of 300 is refused once by an upstream limiting
    the prompt alone to 700 tokens, saying its count; the next is fitted to that limit:
    its prompt, by the upstream's count, is over the 400 the limit less the max_tokens
    would leave.

    Before, the limit was taken for a window holding the answer too: the room it left
    was 400, the factor was raised by 724/400 more than the count alone said, and the
    call sent a third of the turns that fit (about 215 tokens of the 700)."""
    respond = functools.partial(_input_limit_of_700, wording=wording)
    async with ScriptedUpstream(models=(FAKE_MODEL,), respond=respond) as upstream:
        gateway = await start_gateway(small_window_config(upstream.base_url))
        request = conversation(15, mode=pb.TRUNCATION_MODE_KEEP_RECENT)
        request.params.max_tokens = 300
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gateway.stub.Complete(request)
        assert error_details(caught.value).reason == "CONTEXT_WINDOW_EXCEEDED"
        answer = await gateway.stub.Complete(request)
    assert answer.metadata.usage.input_tokens > 700 - 300
    assert len(upstream.requests) == 2


# A tool whose definition an upstream counts at 3 tokens a word (its chat template
# spells a schema out at length), about 450 tokens; the gateway estimates it at 160.
LOOKUP = pb.Tool(name="lookup", description=" ".join(["word"] * 150))


def _counts_the_functions_apart(body: dict[str, Any]) -> Reply | Status:
    """An upstream counting a message's words and 4 more, and a tool's description at 3
    tokens a word, refusing a prompt over its 1024-token window in OpenAI's wording with
    tools: `(N in the messages, M in the functions, and K in the completion)`."""
    messages = sum(4 + len(str(m.get("content") or "").split()) for m in body["messages"])
    functions = sum(3 * len(t["function"]["description"].split()) for t in body["tools"])
    completion = body["max_tokens"]
    if messages + functions + completion <= WINDOW:
        return Reply(prompt_tokens=messages + functions)
    message = (
        f"This model's maximum context length is {WINDOW} tokens. However, you requested "
        f"{messages + functions + completion} tokens ({messages} in the messages, {functions} "
        f"in the functions, and {completion} in the completion). Please reduce the length of "
        "the messages, functions, or completion."
    )
    error = {"message": message, "type": "invalid_request_error", "code": "context_length_exceeded"}
    return Status(400, body=json.dumps({"error": error}))


async def test_a_refusal_counting_the_functions_apart_counts_them_in_the_prompt(start_gateway):
    """A KEEP_RECENT call with a tool is refused once by an upstream that counts the tool
    far above the estimate, its refusal saying the messages' and the functions' counts
    apart (OpenAI's wording with tools); the next call is fitted to both and answered.

    Before, the messages' count alone was read as the prompt's: it fitted the window with
    room for an answer, so the refusal was taken for a max_tokens too large (its message
    said to lower it, and the factor stayed): the same prompt was sent, and refused, on
    every call."""
    async with ScriptedUpstream(
        models=(FAKE_MODEL,), respond=_counts_the_functions_apart
    ) as upstream:
        gateway = await start_gateway(small_window_config(upstream.base_url))
        request = conversation(15, mode=pb.TRUNCATION_MODE_KEEP_RECENT)
        request.tools.append(LOOKUP)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gateway.stub.Complete(request)
        assert error_details(caught.value).reason == "CONTEXT_WINDOW_EXCEEDED"
        assert "lower max_tokens" not in caught.value.details()
        answer = await gateway.stub.Complete(request)
    assert answer.metadata.dropped_messages > 0
    assert len(upstream.requests) == 2


def _window_of_512(body: dict[str, Any], *, wording: str) -> Reply | Status:
    """An upstream whose own window (512) is half the catalog's, counting a token a word
    and 7 more: a prompt with its max_tokens over that window is refused, saying both (as
    vLLM before 0.10 words it and sends it, its error object bare), or in `wording`."""
    prompt = 7 + sum(len(str(m.get("content") or "").split()) for m in body["messages"])
    completion = body.get("max_tokens", 16)
    if prompt + completion <= 512:
        return Reply(prompt_tokens=prompt)
    if wording != "vllm":
        return _refusal(prompt, completion, wording=wording, window=512)
    message = _too_long(prompt, completion, wording="llama-cpp-python", window=512)
    return Status(400, body=json.dumps({"object": "error", "message": message, "code": 400}))


@pytest.mark.parametrize("wording", ["vllm", "anthropic", "gemini"])
async def test_a_refusal_from_a_window_far_smaller_than_the_catalogs_does_not_promise_a_fit(
    start_gateway, wording
):
    """The catalog gives the model a window of 8192; its upstream's is 512 (a vLLM started
    with a smaller `--max-model-len`), more than the calibration's ceiling of four times
    makes up for: a KEEP_RECENT call is refused, and so is the same call again, as fitted
    to a quarter of the catalog's window. The refusal says why, and to shorten the prompt.

    Before, each refusal told the caller to send it again under TRUNCATION_MODE_KEEP_RECENT,
    which would fit it to the count the refusal taught: it was sent and refused again."""
    respond = functools.partial(_window_of_512, wording=wording)
    async with ScriptedUpstream(models=(FAKE_MODEL,), respond=respond) as upstream:
        config = gateway_config(upstream.base_url, models=fake_model_window(8192))
        gateway = await start_gateway(config)
        request = conversation(41, mode=pb.TRUNCATION_MODE_KEEP_RECENT)
        for _ in range(2):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await gateway.stub.Complete(request)
            assert error_details(caught.value).reason == "CONTEXT_WINDOW_EXCEEDED"
            said = caught.value.details() or ""
            assert "which fits it" not in said
            assert "(512 tokens) is far smaller than the model's window in the gateway's " in said
            assert "catalog (8192)" in said
            assert "TRUNCATION_MODE_KEEP_RECENT would send it over again" in said
    assert len(upstream.requests) == 2


@pytest.mark.parametrize("wording", ["vllm", "anthropic", "moonshot", "no-count"])
async def test_a_refused_max_tokens_leaves_the_tenants_other_prompts_fitted_as_before(
    start_gateway, wording
):
    """A call asking a max_tokens past the upstream's own window (smaller than the
    catalog's) is refused there, its refusal counting a prompt of a few tokens, or saying
    no count: the caller is told to lower max_tokens, and the tenant's prompt of 300 tokens
    that the upstream answered before is still sent and answered.

    Before, the refusal was taken for the prompt's being over the window: the tenant's
    factor went to its ceiling (4), and the same prompt was refused by the gateway as over
    the window until some twenty answers had taught the factor down again. So it still
    was where the refusal said no count, a prompt of 9 tokens taken for one over the
    1024-token window less the 600 asked; and Anthropic's refusal of the two together
    (`input length and `max_tokens` exceed context limit`) was an upstream rejection, as
    Moonshot's (`exceeded model token limit: 512 (requested: N)`) was, whose count is of
    the prompt and the max_tokens together."""
    respond = functools.partial(_window_of_512, wording=wording)
    async with ScriptedUpstream(models=(FAKE_MODEL,), respond=respond) as upstream:
        gateway = await start_gateway(small_window_config(upstream.base_url))
        prompt = pb.CompleteRequest(
            model=FAKE_MODEL,
            messages=[pb.Message(role=pb.ROLE_USER, content=" ".join([TURN] * 3))],
            params=pb.GenerationParams(max_tokens=100),
        )
        await gateway.stub.Complete(prompt)
        long_answer = chat("Say hi", params=pb.GenerationParams(max_tokens=600))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gateway.stub.Complete(long_answer)
        assert error_details(caught.value).reason == "CONTEXT_WINDOW_EXCEEDED"
        assert "lower max_tokens" in (caught.value.details() or "")
        prompt.params.temperature = 0.5  # not a repeat
        answer = await gateway.stub.Complete(prompt)
    assert answer.content
    assert len(upstream.requests) == 3


async def test_a_refusal_saying_no_count_calibrates_only_for_a_prompt_that_may_be_over(
    start_gateway,
):
    """An upstream whose window (512) is half the catalog's says only "context length
    exceeded". A prompt of a few tokens refused with a max_tokens of 600 leaves the
    tenant's factor as it was (at its ceiling of 4 the prompt would still fit the window
    with room for an answer: the max_tokens was refused, not the prompt). A prompt of
    about 630 tokens, which could be over, still teaches it at once: the same prompt is
    then refused by the gateway before it is sent."""
    respond = functools.partial(_window_of_512, wording="no-count")
    async with ScriptedUpstream(models=(FAKE_MODEL,), respond=respond) as upstream:
        gateway = await start_gateway(small_window_config(upstream.base_url))
        calibration = gateway.server.pipeline.calibration
        long_answer = chat("Say hi", params=pb.GenerationParams(max_tokens=600))
        with pytest.raises(grpc.aio.AioRpcError):
            await gateway.stub.Complete(long_answer)
        assert calibration.factor(FAKE_MODEL, "default") == 1.0
        long_prompt = conversation(6, mode=pb.TRUNCATION_MODE_NONE)
        for _ in range(2):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await gateway.stub.Complete(long_prompt)
            assert error_details(caught.value).reason == "CONTEXT_WINDOW_EXCEEDED"
    assert len(upstream.requests) == 2  # the second time, refused by the gateway
    assert calibration.factor(FAKE_MODEL, "default") > 1.0


async def test_a_short_prompt_refused_without_max_tokens_or_a_count_leaves_the_factor(
    upstream_small, start_gateway
):
    """A prompt of a few tokens, with no max_tokens, refused as over the window by an
    upstream that says no count: the caller is told its window is smaller than the
    model's, and the tenant's factor stays at 1.0. Before, it went to its ceiling (4),
    which could not keep that prompt from being sent again, only refuse longer ones."""
    upstream_small.script(_refusal(9, 16, wording="no-count"))
    gateway = await start_gateway(small_window_config(upstream_small.base_url))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Complete(chat("hello there"))
    assert error_details(caught.value).reason == "CONTEXT_WINDOW_EXCEEDED"
    assert f"far inside the model's window of {WINDOW}" in (caught.value.details() or "")
    assert gateway.server.pipeline.calibration.factor(FAKE_MODEL, "default") == 1.0


@pytest.mark.parametrize("digits", [400, 5000])
async def test_a_refusal_stating_a_count_no_tokenizer_gives_is_still_context_exceeded(
    upstream_small, start_gateway, digits
):
    """An over-the-window refusal whose count runs to hundreds of digits is refused as
    over the window, as one stating no count is, and the next call is answered.

    Before, the count failed the call INTERNAL: past 4300 digits it was no int to Python,
    and past about 308 the calibration's ratio was no float."""
    count = "1" + "0" * digits
    message = (
        f"This model's maximum context length is {WINDOW} tokens. However, you requested "
        f"{count} tokens ({count} in the messages, 16 in the completion)."
    )
    error = {"message": message, "type": "invalid_request_error", "code": "context_length_exceeded"}
    upstream_small.script(Status(400, body=json.dumps({"error": error})))
    gateway = await start_gateway(small_window_config(upstream_small.base_url))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Complete(chat("hello there"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(caught.value).reason == "CONTEXT_WINDOW_EXCEEDED"
    answer = await gateway.stub.Complete(chat("hello there"))
    assert answer.content


def _moonshot_window(body: dict[str, Any]) -> Reply | Status:
    """Moonshot's API, its window the catalog's (1024), counting every word twice as the
    estimate does and 7 more: a prompt whose count with the max_tokens asked is over the
    window is refused, saying the window and the two counts' sum."""
    prompt = 7 + 2 * sum(len(str(m.get("content") or "").split()) for m in body["messages"])
    if prompt + body["max_tokens"] <= WINDOW:
        return Reply(prompt_tokens=prompt)
    return _refusal(prompt, body["max_tokens"], wording="moonshot")


async def test_a_refusal_counting_the_prompt_with_its_max_tokens_fits_the_prompt_alone(
    start_gateway,
):
    """A KEEP_RECENT call with a max_tokens of 300 is refused once by Moonshot, saying its
    window and its count of the prompt and the max_tokens together; the next is fitted to
    the prompt's own count (the sum less the max_tokens), and answered.

    Taken for the prompt's, the sum would raise the factor by the max_tokens: the call
    would send a third of what fits."""
    async with ScriptedUpstream(models=(FAKE_MODEL,), respond=_moonshot_window) as upstream:
        gateway = await start_gateway(small_window_config(upstream.base_url))
        request = conversation(15, mode=pb.TRUNCATION_MODE_KEEP_RECENT)
        request.params.max_tokens = 300
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gateway.stub.Complete(request)
        assert error_details(caught.value).reason == "CONTEXT_WINDOW_EXCEEDED"
        answer = await gateway.stub.Complete(request)
    # About 620 of the 724 the max_tokens leaves (a turn is about 200); the sum read as
    # the prompt's count left 215.
    assert answer.metadata.usage.input_tokens > (WINDOW - 300) // 2
    assert len(upstream.requests) == 2


def _moonshot_default_room(body: dict[str, Any]) -> Reply | Status:
    """Moonshot's API, its window the catalog's (1024), counting a token a word and 7
    more, and keeping 600 tokens for the answer when the request asks no max_tokens (its
    own default, as moonshot-v1 keeps 1024 in windows of 8192 and more): a prompt whose
    count with that room is over the window is refused, saying the window and the sum."""
    prompt = 7 + sum(len(str(m.get("content") or "").split()) for m in body["messages"])
    completion = body.get("max_tokens", 600)
    if prompt + completion <= WINDOW:
        return Reply(prompt_tokens=prompt)
    return _refusal(prompt, completion, wording="moonshot")


async def test_a_refusal_counting_a_default_answer_room_leaves_the_factor(start_gateway):
    """A KEEP_RECENT call without max_tokens is refused by Moonshot, its count of the
    prompt and its own default room for an answer (600 here, more than the 256 the gateway
    keeps): the caller is told to set max_tokens, the tenant's factor stays at 1.0, and
    the call sent again with a max_tokens of 300 is fitted as before, and answered.

    Before, the count less the gateway's reserve was read as the prompt's: 344 tokens
    over it, it raised the factor to about 1.5, the refusal promised a fit under
    KEEP_RECENT that did not come, and the call with max_tokens sent 313 tokens of the
    724 that fit."""
    async with ScriptedUpstream(models=(FAKE_MODEL,), respond=_moonshot_default_room) as upstream:
        gateway = await start_gateway(small_window_config(upstream.base_url))
        request = conversation(15, mode=pb.TRUNCATION_MODE_KEEP_RECENT)
        request.params.ClearField("max_tokens")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gateway.stub.Complete(request)
        assert error_details(caught.value).reason == "CONTEXT_WINDOW_EXCEEDED"
        assert "set max_tokens" in (caught.value.details() or "")
        assert gateway.server.pipeline.calibration.factor(FAKE_MODEL, "default") == 1.0
        request.params.max_tokens = 300
        answer = await gateway.stub.Complete(request)
    # Five turns (about 515): a seventh would not fit. Three, under the raised factor.
    assert answer.metadata.usage.input_tokens > (WINDOW - 300) // 2
    assert len(upstream.requests) == 2
