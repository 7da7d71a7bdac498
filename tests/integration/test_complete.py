"""Unary and streaming completions through the real server against a real-socket upstream."""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from aiohttp import web

from llmgateway.v1 import gateway_pb2 as pb
from service.config import parse_config
from service.pool import upstream_idempotency_key
from tests.conftest import FAKE_MODEL, chat, chat_stream, gateway_config, gateway_config_data
from tests.fake_upstream import FakeUpstream, Reply
from tests.integration.helpers import error_info
from tests.integration.test_cache import settled

# 7 input and 3 output tokens at 0.14 / 0.42 USD per million.
FAKE_COST_USD = (7 * 0.14 + 3 * 0.42) / 1_000_000


async def test_unary_completion_reports_content_usage_cost_and_upstream(stub, upstream):
    """A unary call returns the upstream's answer with usage, exact cost and metadata."""
    response = await stub.Complete(chat("Say hi"))
    assert response.content == "Hello from fake"
    meta = response.metadata
    assert meta.finish_reason == pb.FINISH_REASON_STOP
    assert (meta.usage.input_tokens, meta.usage.output_tokens) == (7, 3)
    assert not meta.usage.estimated
    assert meta.cost_usd == pytest.approx(FAKE_COST_USD, abs=1e-12)
    assert meta.upstream == "up0"
    assert meta.attempts == 1
    assert meta.model == FAKE_MODEL
    assert meta.id.startswith("chatcmpl")
    assert meta.timings.total_ms >= meta.timings.upstream_ms > 0


async def test_unary_sends_every_set_parameter_and_omits_unset_ones(stub, upstream):
    """Set generation parameters reach the upstream; unset ones are absent, zero is kept."""
    params = pb.GenerationParams(
        temperature=0.0, top_p=0.5, max_tokens=12, stop=["\n\n"], seed=42, presence_penalty=0.1
    )
    await stub.Complete(chat("hi", params=params, idempotency_key="key-1"))
    body = upstream.requests[-1].body
    assert body["temperature"] == 0.0
    assert body["top_p"] == 0.5
    assert body["max_tokens"] == 12
    assert body["stop"] == ["\n\n"]
    assert body["seed"] == 42
    assert body["presence_penalty"] == pytest.approx(0.1)
    assert "frequency_penalty" not in body
    assert "stream" not in body
    assert body["messages"] == [{"role": "user", "content": "hi"}]
    assert upstream.requests[-1].headers["idempotency-key"] == upstream_idempotency_key(
        "default", "key-1"
    )


async def test_an_upstream_taking_random_seed_gets_the_callers_seed_there(upstream, start_gateway):
    """Mistral's API refuses `seed` (422: `body.seed: Extra inputs are not permitted`): an
    upstream configured with `seed_field: random_seed` gets the caller's seed in that
    field, unary and streamed, and no `seed`."""
    data = gateway_config_data(upstream.base_url)
    data["upstreams"][0]["seed_field"] = "random_seed"
    gateway = await start_gateway(parse_config(data, source="<test>", environ={}))
    params = pb.GenerationParams(seed=42)
    await gateway.stub.Complete(chat("hi", params=params))
    _ = [event async for event in gateway.stub.CompleteStream(chat_stream("ho", params=params))]
    assert len(upstream.requests) == 2
    for request in upstream.requests:
        assert request.body["random_seed"] == 42
        assert "seed" not in request.body


async def test_upstream_model_alias_is_sent_and_caller_name_is_priced(upstream, start_gateway):
    """A model mapped to another upstream name is sent under that name and priced as asked."""
    config = gateway_config(upstream.base_url)
    aliased = dataclasses.replace(config.upstreams[0], models={FAKE_MODEL: "provider-model-v1"})
    gateway = await start_gateway(dataclasses.replace(config, upstreams=(aliased,)))
    response = await gateway.stub.Complete(chat())
    assert upstream.requests[-1].body["model"] == "provider-model-v1"
    assert response.metadata.cost_usd == pytest.approx(FAKE_COST_USD, abs=1e-12)


async def test_stream_relays_deltas_then_final_metadata(stub, upstream):
    """A stream yields the upstream's deltas in order, then one final event with usage."""
    # Apart in time, so each event arrives in a read of its own and is relayed on its own.
    upstream.script(Reply(content="one two three four", chunks=4, chunk_delay_s=0.02))
    events = [event async for event in stub.CompleteStream(chat_stream())]
    deltas = [e.delta.content for e in events if e.HasField("delta")]
    assert len(deltas) == 4
    assert "".join(deltas) == "one two three four"
    assert events[-1].HasField("final")
    final = events[-1].final
    assert final.finish_reason == pb.FINISH_REASON_STOP
    assert (final.usage.input_tokens, final.usage.output_tokens) == (7, 3)
    assert final.cost_usd == pytest.approx(FAKE_COST_USD, abs=1e-12)
    assert final.upstream == "up0"
    assert 0 < final.timings.time_to_first_token_ms <= final.timings.total_ms
    body = upstream.requests[-1].body
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize(
    "framing",
    [
        {"crlf": True},
        {"keepalive_comments": True},
        {"split_events": True},
        {"coalesce": True},
        {"crlf": True, "keepalive_comments": True, "split_events": True},
    ],
    ids=["crlf", "keepalive", "split", "coalesced", "all"],
)
async def test_stream_survives_sse_framing_variants(stub, upstream, framing):
    """CRLF, keep-alive comments, split and coalesced events all relay the same text."""
    upstream.script(Reply(content="alpha beta gamma delta", chunks=4, **framing))
    events = [event async for event in stub.CompleteStream(chat_stream())]
    assert "".join(e.delta.content for e in events if e.HasField("delta")) == (
        "alpha beta gamma delta"
    )
    assert events[-1].final.finish_reason == pb.FINISH_REASON_STOP


async def test_stream_relays_events_that_arrive_together_as_one_delta(stub, upstream):
    """Events written in one piece reach the caller as two deltas: the first text alone
    (it goes on before the rest is parsed), then the rest of the read as one message."""
    upstream.script(Reply(content="aabbccdd", chunks=4, coalesce=True))  # aa, bb, cc, dd
    events = [event async for event in stub.CompleteStream(chat_stream())]
    deltas = [e.delta.content for e in events if e.HasField("delta")]
    assert deltas == ["aa", "bbccdd"]
    assert events[-1].final.finish_reason == pb.FINISH_REASON_STOP


async def test_a_stream_answered_with_one_json_completion_is_relayed(stub, upstream):
    """A server that ignores `stream: true` and answers one JSON completion: its text goes
    out as one delta, then the final message with its reported usage, from one request."""
    upstream.script(Reply(content="the whole answer at once", ignore_stream=True))
    events = [event async for event in stub.CompleteStream(chat_stream())]
    assert [e.delta.content for e in events if e.HasField("delta")] == ["the whole answer at once"]
    final = events[-1].final
    assert final.finish_reason == pb.FINISH_REASON_STOP
    assert (final.usage.input_tokens, final.usage.output_tokens) == (7, 3)
    assert not final.usage.estimated
    assert final.cost_usd == pytest.approx(FAKE_COST_USD, abs=1e-12)
    assert len(upstream.requests) == 1


async def test_a_json_completion_is_relayed_whatever_the_case_of_its_media_type(stub, upstream):
    """Media types are case-insensitive: `Application/JSON` is one JSON completion too,
    not an event stream without events that failed as malformed after every retry."""
    headers = {"Content-Type": "Application/JSON; charset=UTF-8"}  # kept as is by aiohttp
    upstream.script(Reply(content="all at once", ignore_stream=True, headers=headers))
    events = [event async for event in stub.CompleteStream(chat_stream())]
    assert [e.delta.content for e in events if e.HasField("delta")] == ["all at once"]
    assert events[-1].final.finish_reason == pb.FINISH_REASON_STOP
    assert len(upstream.requests) == 1


def plain_completion(usage: dict[str, int]) -> dict[str, object]:
    """An OpenAI chat completion answering "plain", with `usage` as given."""
    return {
        "id": "chatcmpl-plain",
        "object": "chat.completion",
        "model": FAKE_MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "plain"},
                "finish_reason": "stop",
            }
        ],
        "usage": usage,
    }


@contextlib.asynccontextmanager
async def serving(handler: Callable[[web.Request], Awaitable[web.Response]]) -> AsyncIterator[str]:
    """An HTTP upstream answering every chat completion with `handler`; its base URL."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    finally:
        await runner.cleanup()


async def _answered_with(completion: dict[str, Any], start_gateway: Any) -> pb.CompleteResponse:
    """A `Complete` through the gateway to an upstream answering with `completion`."""

    async def answer(request: web.Request) -> web.Response:
        return web.json_response(completion)

    async with serving(answer) as base_url:
        gw = await start_gateway(gateway_config(base_url))
        response: pb.CompleteResponse = await gw.stub.Complete(chat(), timeout=10)
    return response


async def test_the_upstream_is_asked_for_an_answer_with_no_content_coding(start_gateway):
    """Without `Accept-Encoding` a server may use any content coding (RFC 9110, 12.5.3);
    the gateway asks for `identity`, so a server that compresses whenever it may answers
    plainly (here: gzip unless `identity` is asked for), sparing both ends the work. (One
    that compresses anyway is decoded: test_upstream_http.py.)"""
    body = json.dumps(plain_completion({"prompt_tokens": 3, "completion_tokens": 1})).encode()
    asked: list[str | None] = []

    async def compressing(request: web.Request) -> web.Response:
        asked.append(request.headers.get("Accept-Encoding"))
        if request.headers.get("Accept-Encoding", "*").strip() == "identity":
            return web.Response(body=body, content_type="application/json")
        headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
        return web.Response(body=gzip.compress(body), headers=headers)

    async with serving(compressing) as base_url:
        gw = await start_gateway(gateway_config(base_url))
        assert (await gw.stub.Complete(chat(), timeout=10)).content == "plain"
    assert asked == ["identity"]


async def test_a_usage_object_without_counts_is_estimated_not_free(start_gateway):
    """`"usage": {}` reports nothing: the call is estimated, flagged and priced, rather
    than recorded as 0 tokens and $0 (the provider billed it)."""

    async def answer(request: web.Request) -> web.Response:
        return web.json_response(plain_completion({}))

    async with serving(answer) as base_url:
        gw = await start_gateway(gateway_config(base_url))
        metadata = (await gw.stub.Complete(chat(), timeout=10)).metadata
    assert metadata.usage.estimated
    assert metadata.usage.input_tokens > 0
    assert metadata.usage.output_tokens > 0
    assert metadata.cost_usd > 0


async def test_a_unary_answer_is_the_choice_at_index_0_as_a_streams_is(start_gateway):
    """A second completion the gateway never asked for, listed before the answer, is not
    relayed as the answer: unary calls and streams relay the same choice, index 0."""
    other = {"index": 1, "message": {"role": "assistant", "content": "other"}}
    completion = plain_completion({"prompt_tokens": 3, "completion_tokens": 1})
    completion["choices"] = [{**other, "finish_reason": "length"}, *completion["choices"]]
    response = await _answered_with(completion, start_gateway)
    assert response.content == "plain"
    assert response.metadata.finish_reason == pb.FINISH_REASON_STOP


@pytest.mark.parametrize("empty_first", [True, False], ids=["empty-0-first", "empty-0-last"])
async def test_a_unary_answer_numbered_1_beside_an_empty_choice_at_0_is_relayed(
    start_gateway, empty_first
):
    """A choice at index 0 that carries nothing (no text, no finish reason) beside the
    answer at index 1 is no choice, as in a stream: the answer at 1 is relayed. Before,
    the empty one was taken for the answer and the call failed without a finish reason."""
    completion = plain_completion({"prompt_tokens": 3, "completion_tokens": 1})
    empty = {"index": 0, "message": {"role": "assistant", "content": ""}, "finish_reason": None}
    answer = {**completion["choices"][0], "index": 1}
    completion["choices"] = [empty, answer] if empty_first else [answer, empty]
    response = await _answered_with(completion, start_gateway)
    assert response.content == "plain"
    assert response.metadata.finish_reason == pb.FINISH_REASON_STOP


async def test_an_answer_whose_only_choice_is_numbered_1_is_relayed_unary_and_streamed(
    stub, upstream
):
    """One choice at index 1 (some proxies number from 1): both calls relay it, with the
    same text, finish reason and usage. Before, the stream failed without a finish reason."""
    answer = Reply(content="one two three", finish_reason="length", choice_index=1)
    upstream.script(answer, answer)
    unary = await stub.Complete(chat("numbered from 1"))
    events = [e async for e in stub.CompleteStream(chat_stream("numbered from 1, streamed"))]
    final = events[-1].final
    streamed = "".join(e.delta.content for e in events if e.HasField("delta"))
    assert (streamed, final.finish_reason) == (unary.content, unary.metadata.finish_reason)
    assert (unary.content, final.usage) == ("one two three", unary.metadata.usage)
    assert final.finish_reason == pb.FINISH_REASON_LENGTH
    assert (final.usage.input_tokens, final.usage.output_tokens) == (7, 3)
    assert [r.body.get("stream", False) for r in upstream.requests] == [False, True]


async def test_stream_without_upstream_usage_is_estimated_and_flagged(stub, upstream):
    """When the upstream streams no usage the gateway estimates it and says so."""
    upstream.script(Reply(content="some words here", include_usage=False))
    events = [event async for event in stub.CompleteStream(chat_stream("count me"))]
    final = events[-1].final
    assert final.usage.estimated
    assert final.usage.input_tokens > 0
    assert final.usage.output_tokens > 0
    assert final.cost_usd > 0


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_an_estimated_output_never_exceeds_max_tokens(stub, upstream, stream):
    """A text whose characters suggest more tokens than `max_tokens` allowed is counted
    as `max_tokens`: the model could not have written more. Without the limit, the
    estimate stands."""
    text = "supercalifragilistic " * 40
    params = pb.GenerationParams(max_tokens=16)

    async def output_tokens(request: pb.CompleteRequest) -> int:
        upstream.script(Reply(content=text, finish_reason="length", include_usage=False))
        if not stream:
            return (await stub.Complete(request)).metadata.usage.output_tokens
        streamed = pb.CompleteStreamRequest()
        streamed.ParseFromString(request.SerializeToString())
        events = [event async for event in stub.CompleteStream(streamed)]
        assert events[-1].final.usage.estimated
        return events[-1].final.usage.output_tokens

    assert await output_tokens(chat(params=params)) == 16
    assert await output_tokens(chat()) > 16


@pytest.mark.parametrize("mode", ["unary", "stream"])
async def test_a_models_refusal_is_relayed_as_a_content_filters_answer(stub, upstream, mode):
    """OpenAI's `refusal` (the model declining, `content: null`) reaches the caller as the
    answer's text with FINISH_REASON_CONTENT_FILTER, and is not cached: the same request
    asked again goes upstream again.

    Before, the caller got an empty answer finished STOP, cached and served as answered."""
    refusal = "I'm sorry, I cannot help with that."
    upstream.script(Reply(refusal=refusal), Reply(refusal=refusal))
    cached = pb.CachePolicy(mode=pb.CACHE_MODE_DEFAULT)
    for _ in range(2):
        if mode == "unary":
            response = await stub.Complete(chat("how do I ...", cache=cached))
            text, finish = response.content, response.metadata.finish_reason
        else:
            events = [
                e async for e in stub.CompleteStream(chat_stream("how do I ...", cache=cached))
            ]
            text = "".join(e.delta.content for e in events if e.HasField("delta"))
            finish = events[-1].final.finish_reason
        assert (text, finish) == (refusal, pb.FINISH_REASON_CONTENT_FILTER)
    assert len(upstream.requests) == 2


async def test_length_finish_reason_is_reported(stub, upstream):
    """A reply cut by max_tokens reports FINISH_REASON_LENGTH."""
    upstream.script(Reply(finish_reason="length"))
    response = await stub.Complete(chat())
    assert response.metadata.finish_reason == pb.FINISH_REASON_LENGTH


async def test_list_models_shows_catalog_and_upstreams(stub):
    """ListModels lists the served model with its window, prices and upstream."""
    response = await stub.ListModels(pb.ListModelsRequest())
    [model] = response.models
    assert model.name == FAKE_MODEL
    assert model.context_window == 4096
    assert model.pricing.input_usd_per_million == pytest.approx(0.14)
    assert model.pricing.output_usd_per_million == pytest.approx(0.42)
    assert [u.name for u in model.upstreams] == ["up0"]
    assert model.upstreams[0].health == pb.UPSTREAM_HEALTH_HEALTHY


async def test_list_models_shows_the_window_an_unlisted_model_is_fitted_to(upstream, start_gateway):
    """A served model the catalog does not list is fitted to 8,192 tokens, and ListModels
    says so; before, it showed 0 while the gateway fitted prompts to 8,192."""
    config = gateway_config_data(upstream.base_url)
    config["upstreams"][0]["models"] = [FAKE_MODEL, "unlisted-model"]
    gateway = await start_gateway(parse_config(config, source="<test>", environ={}))
    listed = await gateway.stub.ListModels(pb.ListModelsRequest())
    windows = {m.name: m.context_window for m in listed.models}
    assert windows == {FAKE_MODEL: 4096, "unlisted-model": 8192}
    long_prompt = "word " * 9000  # about 9,000 tokens: over 8,192, refused as over the window
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await gateway.stub.Complete(chat(long_prompt, model="unlisted-model"))
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(refused.value)
    assert (info.reason, info.metadata["limit_tokens"]) == ("CONTEXT_WINDOW_EXCEEDED", "8192")


async def test_upstream_key_is_sent_as_bearer_and_never_returned(upstream, start_gateway):
    """The upstream's key goes out as a bearer token and appears in no response field."""
    secret = "sk-test-SECRET-upstream-key-9f3a"
    upstream.api_key = secret
    config = gateway_config(upstream.base_url)
    keyed = dataclasses.replace(config.upstreams[0], api_key_env="FAKE_KEY", api_key=secret)
    gateway = await start_gateway(dataclasses.replace(config, upstreams=(keyed,)))
    response = await gateway.stub.Complete(chat())
    assert upstream.requests[-1].headers["authorization"] == f"Bearer {secret}"
    assert secret not in str(response)
    models = await gateway.stub.ListModels(pb.ListModelsRequest())
    assert secret not in str(models)


async def test_upstream_connections_are_pooled(stub, upstream: FakeUpstream):
    """Sequential calls reuse one pooled connection instead of opening one each."""
    for _ in range(5):
        await stub.Complete(chat())
    assert upstream.open_connections() == 1


@pytest.mark.parametrize(("idle_s", "is_cut"), [(0.2, True), (2.0, False)])
async def test_a_stream_silent_past_its_idle_timeout_is_interrupted(
    upstream, start_gateway, idle_s: float, is_cut: bool
):
    """`stream_idle_timeout_s` ends a stream whose next chunk is later than it, with the
    text already sent and STREAM_INTERRUPTED, and closes the upstream connection; a
    stream whose chunks come sooner runs to its end. `timeout_s` (10 s) allows both."""
    upstream.script(Reply(content="one two three", chunks=3, chunk_delay_s=0.6))
    config = gateway_config(upstream.base_url)
    slow = dataclasses.replace(config.upstreams[0], stream_idle_timeout_s=idle_s)
    gateway = await start_gateway(dataclasses.replace(config, upstreams=(slow,)))
    deltas: list[str] = []
    error: grpc.aio.AioRpcError | None = None
    try:
        async for event in gateway.stub.CompleteStream(chat_stream()):
            if event.HasField("delta"):
                deltas.append(event.delta.content)
    except grpc.aio.AioRpcError as exc:
        error = exc
    if is_cut:
        assert error is not None
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert error_info(error).reason == "STREAM_INTERRUPTED"
        assert len(deltas) == 1  # the first chunk only
        assert "one two three".startswith(deltas[0])
        await upstream.wait_for_disconnect(timeout_s=5)
    else:
        assert error is None
        assert "".join(deltas) == "one two three"


async def test_an_answer_whose_usage_no_call_could_have_is_served_estimated(stub, upstream):
    """Negative tokens (a credit, if believed): the answer is relayed once, its usage
    estimated and flagged, rather than failed as malformed and retried (billed again)."""
    upstream.script(Reply(content="fine text", prompt_tokens=-3))
    response = await stub.Complete(chat())
    assert response.content == "fine text"
    assert response.metadata.usage.estimated
    assert response.metadata.usage.input_tokens > 0
    assert response.metadata.cost_usd > 0
    assert len(upstream.requests) == 1


async def test_an_azure_upstream_gets_its_key_in_the_api_key_header(upstream, start_gateway):
    """`api_key_header: api-key` sends the key as Azure OpenAI's key authentication takes
    it, `api-key: KEY`, with no `Authorization` (which Azure reads as an Entra token),
    unary and streamed; the default stays `Authorization: Bearer KEY`."""
    data = gateway_config_data(upstream.base_url, upstream.base_url)
    for entry, header in zip(data["upstreams"], ("api-key", "authorization"), strict=True):
        entry.update(api_key_env="AZURE_KEY_T", api_key_header=header)
    environ = {"AZURE_KEY_T": "azure-key-1234"}
    gateway = await start_gateway(parse_config(data, source="<test>", environ=environ))
    for _ in range(2):  # round robin: one call to each upstream
        await gateway.stub.Complete(chat())
    async for _ in gateway.stub.CompleteStream(chat_stream()):
        pass
    seen = [(r.headers.get("api-key"), r.headers.get("authorization")) for r in upstream.requests]
    assert len(seen) == 3
    assert set(seen) == {("azure-key-1234", None), (None, "Bearer azure-key-1234")}


@pytest.mark.parametrize(
    ("said", "expected"),
    [("MAX_TOKENS", pb.FINISH_REASON_LENGTH), ("SAFETY", pb.FINISH_REASON_CONTENT_FILTER)],
)
async def test_a_finish_reason_in_upper_case_means_what_it_says(stub, upstream, said, expected):
    """Gemini's finish reasons, passed on by a proxy in its own upper case: an answer its
    length limit cut is LENGTH, one its filter stopped CONTENT_FILTER, unary and streamed.
    Before, each was an unknown reason, told as STOP: a cut answer looked whole."""
    upstream.script(Reply(content="one two", finish_reason=said))
    upstream.script(Reply(content="one two", finish_reason=said))
    unary = await stub.Complete(chat("upper case one"))
    streamed = [e async for e in stub.CompleteStream(chat_stream("upper case two"))]
    assert unary.metadata.finish_reason == expected
    assert streamed[-1].final.finish_reason == expected


async def test_an_upstream_set_to_fold_system_messages_gets_them_in_the_first_user_message(
    upstream, start_gateway
):
    """`system_messages: fold` (the local model's, whose Gemma format drops the system role):
    the upstream gets the system text, a blank line and the user's text in one user message,
    the later turns as sent, unary and streamed; the cache key is the caller's request, so
    the same call again is a hit. Before, the system message went as it was, and llama.cpp's
    `gemma` format dropped it without a word."""
    data = gateway_config_data(upstream.base_url, cache={"backend": "memory"})
    data["upstreams"][0]["system_messages"] = "fold"
    gateway = await start_gateway(parse_config(data, source="<test>", environ={}))
    messages = [
        pb.Message(role=pb.ROLE_SYSTEM, content="Always answer in French."),
        pb.Message(role=pb.ROLE_USER, content="hi"),
        pb.Message(role=pb.ROLE_ASSISTANT, content="salut"),
        pb.Message(role=pb.ROLE_USER, content="how are you?"),
    ]
    params = pb.GenerationParams(temperature=0.0)
    request = pb.CompleteRequest(model=FAKE_MODEL, messages=messages, params=params)
    first = await gateway.stub.Complete(request)
    async for _ in gateway.stub.CompleteStream(
        pb.CompleteStreamRequest(
            model=FAKE_MODEL,
            messages=messages,
            params=params,
            cache=pb.CachePolicy(mode=pb.CACHE_MODE_BYPASS),
        )
    ):
        pass
    assert [r.body["messages"] for r in upstream.requests] == 2 * [
        [
            {"role": "user", "content": "Always answer in French.\n\nhi"},
            {"role": "assistant", "content": "salut"},
            {"role": "user", "content": "how are you?"},
        ]
    ]
    await settled(gateway)
    second = await gateway.stub.Complete(request)
    assert (first.metadata.cache_hit, second.metadata.cache_hit) == (False, True)
    assert second.content == first.content
    assert len(upstream.requests) == 2


async def test_an_upstream_set_to_merge_system_messages_gets_them_as_one_first(
    upstream, start_gateway
):
    """`system_messages: merge` (the local model's for `chatml` and the other formats that
    take the first system message alone): the upstream gets every system text, in order,
    in one system message first, unary and streamed. Before, they went as they were, and
    llama.cpp's formatter dropped all but the first without a word."""
    data = gateway_config_data(upstream.base_url)
    data["upstreams"][0]["system_messages"] = "merge"
    gateway = await start_gateway(parse_config(data, source="<test>", environ={}))
    messages = [
        pb.Message(role=pb.ROLE_SYSTEM, content="Always answer in French."),
        pb.Message(role=pb.ROLE_USER, content="hi"),
        pb.Message(role=pb.ROLE_ASSISTANT, content="salut"),
        pb.Message(role=pb.ROLE_SYSTEM, content="Be brief."),
        pb.Message(role=pb.ROLE_USER, content="how are you?"),
    ]
    await gateway.stub.Complete(pb.CompleteRequest(model=FAKE_MODEL, messages=messages))
    async for _ in gateway.stub.CompleteStream(
        pb.CompleteStreamRequest(model=FAKE_MODEL, messages=messages)
    ):
        pass
    assert [r.body["messages"] for r in upstream.requests] == 2 * [
        [
            {"role": "system", "content": "Always answer in French.\n\nBe brief."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "salut"},
            {"role": "user", "content": "how are you?"},
        ]
    ]


@pytest.mark.parametrize("is_streamed", [False, True], ids=["unary", "stream"])
async def test_an_answers_id_or_model_that_is_not_printable_is_the_gateways_own(
    upstream: FakeUpstream, stub: Any, is_streamed: bool
) -> None:
    """An upstream's completion id or model with a control character (a terminal's escape
    sequence, a NUL) is read as not given: the caller gets the gateway's own id and the
    model it asked the upstream for, never the raw characters; the answer is kept."""
    upstream.default = Reply(
        content="kept", completion_id="chatcmpl-\x1b[2J\x00", model="fake\x1b]0;title\x07"
    )
    if is_streamed:
        events = [event async for event in stub.CompleteStream(chat_stream())]
        text = "".join(event.delta.content for event in events[:-1])
        metadata = events[-1].final
    else:
        response = await stub.Complete(chat())
        text, metadata = response.content, response.metadata
    assert text == "kept"
    assert metadata.id.startswith("gw-")
    assert metadata.model == FAKE_MODEL


async def test_an_answers_printable_id_and_model_are_relayed_as_they_are(
    upstream: FakeUpstream, stub: Any
) -> None:
    """An id and a model of any script, spaces included, are the upstream's own."""
    upstream.default = Reply(completion_id="chatcmpl-é 1", model="модель v2")
    response = await stub.Complete(chat())
    assert (response.metadata.id, response.metadata.model) == ("chatcmpl-é 1", "модель v2")
