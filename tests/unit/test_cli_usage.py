"""`llm-gateway usage`'s options, parsed before any call."""

from __future__ import annotations

import pytest

from gateway_client.cli import main
from gateway_client.commands.usage import total_of
from llmgateway.v1 import gateway_pb2 as pb


@pytest.mark.parametrize(
    "since",
    [
        "999999999d",
        "99999999999999999999m",
        "0001-01-01T00:00:00+01:00",  # 31 December of year 0 in UTC
        "9999-12-31T23:00:00-01:00",  # year 10000 in UTC
    ],
)
@pytest.mark.parametrize("option", ["--since", "--until"])
def test_a_window_bound_before_any_date_is_a_usage_error(option: str, since: str, capsys) -> None:
    """Further back than a datetime reaches (or, in UTC, past year 9999): exit 2 naming
    the option, not a traceback. Before, an ISO time whose offset took it out of range
    crashed with OverflowError as the request's Timestamp was built."""
    with pytest.raises(SystemExit) as caught:
        main(["usage", option, since, "--address", "127.0.0.1:1"])
    assert caught.value.code == 2
    assert f"argument {option}: " in capsys.readouterr().err


@pytest.mark.parametrize(
    ("since", "until"),
    [
        ("1h", "2h"),  # durations count back: 2h ago is before 1h ago
        ("2026-01-02", "2026-01-01T23:00:00Z"),
        ("2026-01-01T12:00:00Z", "2026-01-01T13:00:00+02:00"),  # 11:00 in UTC
    ],
)
def test_a_window_ending_before_it_starts_is_a_usage_error(since: str, until: str, capsys) -> None:
    """`--until` before `--since`: exit 2 naming both times in UTC, before any call (the
    address answers nothing, so a call would end in UNAVAILABLE and exit 1)."""
    with pytest.raises(SystemExit) as caught:
        main(["usage", "--since", since, "--until", until, "--address", "127.0.0.1:1"])
    assert caught.value.code == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert "argument --until: " in error
    assert "is before --since " in error


@pytest.mark.parametrize("timeout", ["0", "-5", "nan", "inf", "1e10", "soon"])
@pytest.mark.parametrize("command", [["summarize", "doc.txt"], ["check"], ["complete", "Say hi"]])
def test_a_timeout_no_call_could_keep_is_a_usage_error(
    command: list[str], timeout: str, capsys
) -> None:
    """A timeout of 0 or less, not a number, or past what gRPC's clock holds: exit 2
    naming the option. Before, `summarize` sent the call, which ended at once with
    DEADLINE_EXCEEDED (exit 1), looking like a slow gateway."""
    with pytest.raises(SystemExit) as caught:
        main([*command, "--timeout", timeout])
    assert caught.value.code == 2
    assert "argument --timeout: " in capsys.readouterr().err


def test_the_total_adds_hits_and_savings_exactly() -> None:
    """TOTAL adds the rows' cache hits, and their savings in pico-dollars: ten rows that
    each saved $0.1 saved $1, where adding floats says $0.9999999999999999."""
    rows = [pb.UsageRow(requests=2, cache_hits=1, saved_cost_usd=0.1) for _ in range(10)]
    total = total_of(rows)
    assert (total.requests, total.cache_hits, total.saved_cost_usd) == (20, 10, 1.0)
