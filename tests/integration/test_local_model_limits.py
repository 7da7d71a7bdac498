"""The local model's limits as calls meet them: one answer at a time, and its death
under a call.

llama.cpp's server is stood in for by the small OpenAI-compatible server of
test_local_model_restart, run by the gateway's real supervisor as llama.cpp's Python.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from llmgateway.v1 import gateway_pb2 as pb
from service.config import parse_config
from tests.integration.helpers import error_info, retry_delay_s
from tests.integration.test_local_model_restart import (
    MODEL,
    run_stand_in_as_llama,
    stand_in_local_model,
)


def _local_config(
    model: Path,
    *,
    restart_backoff_s: float = 1.0,
    summarize: dict[str, Any] | None = None,
    **resilience: Any,
) -> Any:
    local = {"enabled": "always", "model_path": str(model), "restart_backoff_s": restart_backoff_s}
    data = {
        "server": {"listen": "127.0.0.1:0", "grace_period_s": 2},
        "local_model": local,
        "resilience": resilience,
        "summarize": summarize or {},
    }
    return parse_config(data, source="<test>", environ={})


def _hello() -> pb.CompleteRequest:
    return pb.CompleteRequest(
        model=MODEL,
        messages=[pb.Message(role=pb.ROLE_USER, content="Hello")],
        params=pb.GenerationParams(max_tokens=8),
        cache=pb.CachePolicy(mode=pb.CACHE_MODE_BYPASS),
    )


async def test_concurrent_calls_wait_their_turn_in_the_gateway_not_in_llama_cpp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start_gateway: Callable[..., Any]
) -> None:
    """Three calls at once to a server that answers one at a time: the gateway sends one
    at a time, the others waiting in its line (queued, taking turns by tenant, where a
    cancel or deadline leaves before anything is sent), and each is answered, though they
    wait past `resilience.max_limit_wait_s`: the local upstream waits as long as its
    timeout.

    Before, its upstream took 50 at once: all three went to llama.cpp, to wait in its own
    line, first come first served, their wait counted as upstream time."""
    model, stand_in = stand_in_local_model(tmp_path, answer_delay_s=0.3)
    run_stand_in_as_llama(monkeypatch, stand_in)
    gateway = await start_gateway(_local_config(model, max_limit_wait_s=0.05))
    answers = await asyncio.gather(*(gateway.stub.Complete(_hello(), timeout=20) for _ in range(3)))
    assert [a.metadata.upstream for a in answers] == ["local"] * 3
    assert sum(a.metadata.timings.queued_ms > 0 for a in answers) == 2


async def test_a_call_its_server_dies_under_is_refused_as_restarting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start_gateway: Callable[..., Any]
) -> None:
    """llama.cpp dies under a call: the call is not retried, and is refused as calls are
    while it restarts, `UNAVAILABLE` with `restarting: local` in its `ErrorInfo` and a
    `RetryInfo` saying when the restart should answer (its back-off at least), rather than
    after a retry's back-off, however long (up to 10 s here).

    Before, it waited out the retry's back-off, then was refused with the connection's
    error, no word of the restart."""
    model, stand_in = stand_in_local_model(tmp_path, dies_at_first_call=True)
    run_stand_in_as_llama(monkeypatch, stand_in)
    config = _local_config(model, backoff_base_s=10.0, backoff_cap_s=10.0)
    gateway = await start_gateway(config)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Complete(_hello(), timeout=20)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    info = error_info(caught.value)
    assert (info.metadata["upstream"], info.metadata["restarting"]) == ("local", "local")
    assert info.metadata["attempts"] == "1"
    delay_s = retry_delay_s(caught.value)
    assert delay_s is not None
    assert delay_s > 0.5


async def test_a_summarize_part_its_server_dies_under_waits_for_the_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start_gateway: Callable[..., Any]
) -> None:
    """llama.cpp dies under a Summarize part: the part's next try waits until the restart
    should answer (the refusal's `RetryInfo`), within the deadline, and the summary is
    made once it does.

    Before, the part's next tries followed `summarize.retry_backoff_s` alone, each
    refused at once as restarting, and a summary of minutes failed
    `SUMMARIZE_PART_FAILED` well before the restart answered."""
    model, stand_in = stand_in_local_model(tmp_path, dies_at_first_call=True)
    run_stand_in_as_llama(monkeypatch, stand_in)
    # Its tries would all be spent within a fifth of the restart's back-off.
    config = _local_config(model, summarize={"retry_backoff_s": 0.05, "chunk_attempts": 3})
    gateway = await start_gateway(config)
    document = "\n\n".join(
        f"Paragraph {i}: " + "the harbour opens at dawn. " * 40 for i in range(8)
    )
    response = await gateway.stub.Summarize(
        pb.SummarizeRequest(model=MODEL, document=document), timeout=30
    )
    assert response.summary == "hi"
    assert response.chunks > 1


def assert_part_failed_restarting(error: grpc.aio.AioRpcError) -> None:
    """`error` is a Summarize failed at a part refused as the local model restarts, with
    the restart's `RetryInfo` (due past the call's deadline here: over 20 s)."""
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    info = error_info(error)
    assert info.reason == "SUMMARIZE_PART_FAILED"
    assert info.metadata["restarting"] == "local"
    delay_s = retry_delay_s(error)
    assert delay_s is not None
    assert delay_s > 20


async def test_a_summarize_part_failed_as_its_server_restarts_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start_gateway: Callable[..., Any]
) -> None:
    """A part whose restart is due after the call's deadline fails the call at once, and
    its `ErrorInfo` says `restarting: local`, as a Complete's does, with the restart's
    `RetryInfo`."""
    model, stand_in = stand_in_local_model(tmp_path, dies_at_first_call=True)
    run_stand_in_as_llama(monkeypatch, stand_in)
    gateway = await start_gateway(_local_config(model, restart_backoff_s=60.0))
    document = "\n\n".join(
        f"Paragraph {i}: " + "the harbour opens at dawn. " * 40 for i in range(8)
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Summarize(
            pb.SummarizeRequest(model=MODEL, document=document), timeout=20
        )
    assert_part_failed_restarting(caught.value)


async def test_a_summarize_part_that_failed_and_then_met_a_restart_says_restarting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start_gateway: Callable[..., Any]
) -> None:
    """A part answered 500, after which llama.cpp dies: its next try is refused as
    restarting, and with the restart due after the call's deadline the call fails saying
    so, `restarting: local` in its `ErrorInfo` and the restart's `RetryInfo`.

    Before, it failed with the 500 it met first: no word of the restart, and a
    `RetryInfo` of the usual back-off, for a model that would not answer for a minute."""
    model, stand_in = stand_in_local_model(
        tmp_path, dies_at_first_call=True, fails_before_dying=True
    )
    run_stand_in_as_llama(monkeypatch, stand_in)
    # One attempt a try: the pool gives up on the 500 before it sees the server exit.
    config = _local_config(
        model, restart_backoff_s=60.0, summarize={"retry_backoff_s": 0.5}, attempts=1
    )
    gateway = await start_gateway(config)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Summarize(
            pb.SummarizeRequest(model=MODEL, document="The harbour opens at dawn."), timeout=20
        )
    assert_part_failed_restarting(caught.value)


async def test_batch_items_the_server_dies_under_or_before_wait_for_the_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start_gateway: Callable[..., Any]
) -> None:
    """llama.cpp dies under a batch's first item, the others waiting their turn: each
    tries again once the restart should answer (the refusal's `RetryInfo`), within the
    deadline, and is answered; those refused unsent are not held to the retry budget
    (10 retries a window), which would refuse the last of them.

    Before, they all failed `UNAVAILABLE`, `restarting: local`, though the restart
    answered within seconds and the call had half a minute left."""
    model, stand_in = stand_in_local_model(tmp_path, dies_at_first_call=True)
    run_stand_in_as_llama(monkeypatch, stand_in)
    gateway = await start_gateway(_local_config(model))
    batch = pb.CompleteBatchRequest(
        items=[pb.BatchItem(id=f"item-{i}", request=_hello()) for i in range(12)],
        concurrency=12,
    )
    events = [event async for event in gateway.stub.CompleteBatch(batch, timeout=30)]
    results = [event.result for event in events if event.HasField("result")]
    assert [r.response.content for r in results] == ["hi"] * 12
    assert events[-1].summary.succeeded == 12


async def test_summarize_parts_refused_unsent_while_the_server_restarts_are_not_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start_gateway: Callable[..., Any]
) -> None:
    """llama.cpp dies under a summary's first part, a dozen more waiting at its one slot:
    each is refused unsent as restarting, and tries again once the restart answers. Those
    next tries are not retries of anything the provider had: not held to the retry budget
    (10 retries a window), which would refuse the last of them, their tries spent.

    Before, every next try of a part counted as a retry, sent or not: the summary failed."""
    model, stand_in = stand_in_local_model(tmp_path, dies_at_first_call=True)
    run_stand_in_as_llama(monkeypatch, stand_in)
    config = _local_config(model, summarize={"concurrency": 16})
    gateway = await start_gateway(config)
    sentences = [f"Harbour log {i}: the ferry left at dawn with {i} crates." for i in range(1200)]
    summary = await gateway.stub.Summarize(
        pb.SummarizeRequest(model=MODEL, document=" ".join(sentences), target_tokens=64),
        timeout=30,
    )
    assert summary.chunks > 12
    assert summary.summary
