"""The token estimator against real tokenizer counts, and its additivity."""
# ruff: noqa: E501, RUF001

import pytest

from service.domain import Message, Role
from service.tokens import (
    PER_MESSAGE_OVERHEAD,
    PER_REQUEST_OVERHEAD,
    estimate_message_tokens,
    estimate_prompt_tokens,
    estimate_text_tokens,
)

# Reference counts measured offline with tiktoken-compatible cl100k_base and o200k_base
# encoders (the PyPI package bpe-openai); the estimator must never count fewer tokens
# than the larger of the two, and should not waste more than about half the window.
SAMPLES = [
    pytest.param(
        "The gateway keeps a pool of connections to each upstream provider and retries failed requests with capped exponential backoff. When a caller sends a conversation that is longer than the model's context window, the gateway either rejects it with a clear error or drops the oldest turns, keeping every system message and the latest question. Costs are computed from the usage the provider reports, and summed per tenant, model and label.",
        80,
        80,
        id="english",
    ),
    pytest.param(
        'Run `llm-gateway batch input.jsonl -o output.jsonl --concurrency 50`; each line is {"id": "item-42", "request": {"model": "deepseek-chat"}}. HTTP/2 keep-alive=30s, p99 latency 1,234.5 ms (2025-11-28T20:24:50Z).',
        79,
        79,
        id="english_technical",
    ),
    pytest.param(
        "Cổng kết nối giữ một nhóm kết nối tới mỗi nhà cung cấp và thử lại các yêu cầu thất bại với thời gian chờ tăng dần. Khi người gọi gửi một cuộc hội thoại dài hơn cửa sổ ngữ cảnh của mô hình, cổng sẽ từ chối với một lỗi rõ ràng hoặc bỏ đi những lượt cũ nhất, giữ lại mọi thông điệp hệ thống và câu hỏi mới nhất. Chi phí được tính từ số token mà nhà cung cấp báo cáo.",
        179,
        101,
        id="vietnamese",
    ),
    pytest.param(
        "网关为每个上游提供商维护一个连接池，并以带上限的指数退避重试失败的请求。当调用者发送的对话超过模型的上下文窗口时，网关要么以明确的错误拒绝它，要么丢弃最早的轮次，保留所有系统消息和最新的问题。费用根据提供商报告的用量计算，并按租户、模型和标签汇总。",
        129,
        93,
        id="chinese",
    ),
    pytest.param(
        "ゲートウェイは各アップストリームへの接続プールを保持し、失敗したリクエストを上限付きの指数バックオフで再試行します。会話がモデルのコンテキストウィンドウより長い場合、明確なエラーで拒否するか、最も古いターンを削除します。",
        110,
        81,
        id="japanese",
    ),
    pytest.param(
        "게이트웨이는 각 업스트림 공급자에 대한 연결 풀을 유지하고 실패한 요청을 상한이 있는 지수 백오프로 다시 시도합니다. 호출자가 모델의 컨텍스트 창보다 긴 대화를 보내면 게이트웨이는 명확한 오류로 거부하거나 가장 오래된 턴을 삭제합니다.",
        115,
        70,
        id="korean",
    ),
    pytest.param(
        "3.14159265358979 2718281828 1000000 42 7 0.000123 987654321 2026-11-28 20:24:50",
        42,
        42,
        id="numbers",
    ),
    pytest.param(
        "Done ✅ ship it 🚀🚀 — café naïve résumé Привет мир Γειά σου κόσμε",
        34,
        22,
        id="emoji_mixed",
    ),
]

# Over-counting wastes window; more than this factor would be careless.
MAX_OVERESTIMATE = 2.0


@pytest.mark.parametrize(("text", "cl100k", "o200k"), SAMPLES)
def test_estimate_is_conservative(text, cl100k, o200k):
    """The estimate is at least the real token count of both tokenizers."""
    assert estimate_text_tokens(text) >= max(cl100k, o200k)


@pytest.mark.parametrize(("text", "cl100k", "o200k"), SAMPLES)
def test_estimate_is_not_wasteful(text, cl100k, o200k):
    """The estimate stays within a small factor of the real count."""
    assert estimate_text_tokens(text) <= MAX_OVERESTIMATE * max(cl100k, o200k)


@pytest.mark.parametrize(("text", "cl100k", "o200k"), SAMPLES)
def test_estimate_is_additive_over_paragraphs(text, cl100k, o200k):
    """Estimating two paragraphs apart never counts fewer tokens than together."""
    joined = text + "\n\n" + text
    assert estimate_text_tokens(text) * 2 + 1 >= estimate_text_tokens(joined)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", 0),
        ("the", 1),
        ("gateway", 2),
        ("12345", 5),
        ("a, b.", 4),
        ("line\nnext", 3),
        ("测试", 3),
        ("🚀", 2),
    ],
)
def test_small_texts(text, expected):
    """Words, digits, punctuation, newlines, CJK and emoji cost what the rules say."""
    assert estimate_text_tokens(text) == expected


def test_prompt_estimate_adds_overheads():
    """A prompt costs its messages plus per-message and per-request overhead."""
    messages = [Message(Role.SYSTEM, "Be brief."), Message(Role.USER, "Say hi")]
    expected = PER_REQUEST_OVERHEAD + sum(
        PER_MESSAGE_OVERHEAD + estimate_text_tokens(m.content) for m in messages
    )
    assert estimate_prompt_tokens(messages) == expected
    assert estimate_message_tokens(messages[0]) == PER_MESSAGE_OVERHEAD + 4
