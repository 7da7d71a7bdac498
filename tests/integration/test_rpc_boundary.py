"""The RPC boundary on a real server: even an error that cannot be mapped ends cleanly.

These tests serve a servicer of their own behind the real boundary (`guard_servicer`,
`add_service`), so that a handler can raise an error the gateway itself would not build.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import pytest_asyncio

from llmgateway.v1 import gateway_pb2 as pb
from llmgateway.v1 import gateway_pb2_grpc as pb_grpc
from service.errors import ERROR_DOMAIN, ModelNotFound
from service.rpc_boundary import Admission, add_service, guard_servicer
from tests.conftest import chat, chat_stream
from tests.integration.helpers import error_info, rich_status

_SERVICE = pb.DESCRIPTOR.services_by_name["CompletionService"]
# A lone surrogate, as Python decodes undecodable bytes (os.environ, file names): the
# error's message escapes it, but its ErrorInfo cannot be encoded as UTF-8.
_UNENCODABLE_MODEL = "fake-model-\udcff"


class _Failing(pb_grpc.CompletionServiceServicer):
    """Fails every call with `error`."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    async def Complete(self, request: Any, context: Any) -> Any:
        raise self.error

    async def CompleteStream(self, request: Any, context: Any) -> AsyncIterator[Any]:
        raise self.error
        yield  # pragma: no cover  (makes this an async generator)


@pytest_asyncio.fixture
async def failing_stub() -> AsyncIterator[pb_grpc.CompletionServiceStub]:
    """A stub for a guarded servicer whose calls fail with an unmappable error."""
    servicer = _Failing(ModelNotFound(_UNENCODABLE_MODEL))
    admission = Admission(max_in_flight=4, retry_after_s=1.0)
    guard_servicer(servicer, ["Complete", "CompleteStream"], admission)
    server = grpc.aio.server()
    add_service(server, servicer, _SERVICE)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield pb_grpc.CompletionServiceStub(channel)
    finally:
        await channel.close()
        await server.stop(grace=None)


def _assert_clean_internal(error: grpc.aio.AioRpcError) -> None:
    assert error.code() is grpc.StatusCode.INTERNAL
    assert error.details() == "internal error"
    info = error_info(error)
    assert (info.reason, info.domain, dict(info.metadata)) == ("INTERNAL_ERROR", ERROR_DOMAIN, {})
    wire = rich_status(error).SerializeToString()
    for leak in ("Unexpected", "ModelNotFound", "UnicodeEncodeError", "fake-model"):
        assert leak not in (error.details() or "")
        assert leak.encode() not in wire


async def test_an_error_whose_status_cannot_be_built_is_internal_not_unknown(
    failing_stub: pb_grpc.CompletionServiceStub, caplog: pytest.LogCaptureFixture
) -> None:
    """A unary call whose error fails to map ends INTERNAL with ErrorInfo, logged once."""
    with (
        caplog.at_level(logging.ERROR, logger="llm_gateway.rpc"),
        pytest.raises(grpc.aio.AioRpcError) as caught,
    ):
        await failing_stub.Complete(chat())
    _assert_clean_internal(caught.value)
    logged = [r for r in caplog.records if r.getMessage() == "rpc.error_mapping_failed"]
    assert len(logged) == 1
    assert logged[0].__dict__["error_type"] == "ModelNotFound"


async def test_a_stream_whose_error_cannot_be_mapped_is_internal_not_unknown(
    failing_stub: pb_grpc.CompletionServiceStub,
) -> None:
    """The same for a server stream."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in failing_stub.CompleteStream(chat_stream()):
            pass  # pragma: no cover
    _assert_clean_internal(caught.value)
