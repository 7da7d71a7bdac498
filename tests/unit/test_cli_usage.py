"""`llm-gateway usage`'s options, parsed before any call."""

from __future__ import annotations

import pytest

from gateway_client.cli import main


@pytest.mark.parametrize("since", ["999999999d", "99999999999999999999m"])
def test_a_window_start_before_any_date_is_a_usage_error(since: str, capsys) -> None:
    """Further back than a datetime reaches: exit 2 naming the option, not a traceback."""
    with pytest.raises(SystemExit) as caught:
        main(["usage", "--since", since, "--address", "127.0.0.1:1"])
    assert caught.value.code == 2
    assert "argument --since: " in capsys.readouterr().err
