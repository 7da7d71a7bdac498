"""Smoke test."""

from tests.conftest import chat, chat_stream


async def test_unary(stub, upstream):
    """A unary call returns the upstream's content."""
    r = await stub.Complete(chat())
    assert r.content == "Hello from fake"
    assert r.metadata.usage.input_tokens == 7
    assert r.metadata.upstream == "up0"
    items = [e async for e in stub.CompleteStream(chat_stream())]
    assert "".join(e.delta.content for e in items[:-1]) == "Hello from fake"
    assert items[-1].final.usage.output_tokens == 3
