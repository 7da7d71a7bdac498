"""The batch command's files: resuming from output, and its progress line."""

import datetime as dt
import io
import json

import pytest
from google.rpc import error_details_pb2, status_pb2

from gateway_client.commands.batch import (
    InputItem,
    OutputHeld,
    UnknownField,
    edit_distance,
    known_field_like,
    lock_output,
    open_output,
    read_done,
    read_input,
    result_record,
    slices,
)
from gateway_client.commands.complete import usage_line
from gateway_client.commands.models import format_models
from gateway_client.progress import Progress
from llmgateway.v1 import gateway_pb2 as pb


def test_read_done_drops_a_line_cut_short(tmp_path):
    """A last line cut mid-write is removed so the item runs again and the file stays valid."""
    output = tmp_path / "out.jsonl"
    output.write_text(json.dumps({"id": "a", "content": "x"}) + "\n" + '{"id": "b", "cont')
    assert read_done(output, retry_failed=False).ids == {"a"}
    assert output.read_text() == json.dumps({"id": "a", "content": "x"}) + "\n"


def test_read_done_counts_errors_as_done_unless_retrying(tmp_path):
    """Error lines count as done; with retry_failed they are removed from the file."""
    output = tmp_path / "out.jsonl"
    ok = json.dumps({"id": "a", "content": "x"}) + "\n"
    failed = json.dumps({"id": "b", "error": {"code": "UNAVAILABLE"}}) + "\n"
    output.write_text(ok + failed)
    kept = read_done(output, retry_failed=False)
    assert (kept.ids, kept.failed) == ({"a", "b"}, {"b"})
    retried = read_done(output, retry_failed=True)
    assert (retried.ids, retried.failed) == ({"a"}, set())
    assert output.read_text() == ok


@pytest.mark.parametrize("retry_failed", [False, True])
def test_an_open_output_stays_locked_until_closed(tmp_path, retry_failed):
    """While one run has the output open, another cannot lock it, even after
    `--retry-failed` replaced the file with one without its error lines; closing it lets
    the next run in. Before the relock, the replacing run held the lock of the file it
    replaced, and a second run locked the new one and ran the same items."""
    path = tmp_path / "out.jsonl"
    path.write_text(json.dumps({"id": "b", "error": {"code": "UNAVAILABLE"}}) + "\n")
    output, done = open_output(path, retry_failed=retry_failed)
    with output:
        assert done.ids == (set() if retry_failed else {"b"})
        with pytest.raises(OutputHeld):
            lock_output(path)
    lock_output(path).close()


def test_read_done_without_output(tmp_path):
    """No output file yet means nothing is done."""
    assert read_done(tmp_path / "missing.jsonl", retry_failed=False).ids == set()


def test_slices_respect_item_count():
    """Items are sent in calls of at most `per_call` items, in order."""
    items = [InputItem(i + 1, str(i), pb.CompleteRequest(model="m")) for i in range(7)]
    groups = list(slices(items, 3))
    assert [len(g) for g in groups] == [3, 3, 1]
    assert [item.id for g in groups for item in g] == [str(i) for i in range(7)]


class FakeClock:
    """A settable monotonic clock."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_line_shows_counts_rate_and_eta():
    """The line shows done/total, failures, tokens, cost, rate and ETA."""
    clock = FakeClock()
    stream = io.StringIO()
    progress = Progress(100, stream=stream, clock=clock)
    for i in range(10):
        clock.now += 0.5
        progress.advance(is_failure=i == 0, tokens=1000, cost_usd=0.001)
    line = progress.line()
    assert line.startswith("10/100 [")
    assert "failed 1" in line
    assert "tokens 10.0k" in line
    assert "$0.0100" in line
    assert "2.0/s" in line
    assert "ETA 0:45" in line
    progress.close()
    assert stream.getvalue().splitlines()[-1] == line


def test_disabled_progress_writes_nothing():
    """--no-progress keeps stderr clean."""
    stream = io.StringIO()
    progress = Progress(3, stream=stream, is_enabled=False)
    progress.advance(is_failure=False)
    progress.close()
    assert stream.getvalue() == ""


def test_input_lines_may_set_the_reasoning_effort_by_name(tmp_path):
    """`reasoning_effort` on a line is sent as the enum; a name it does not know makes a
    bad line, reported with its number, not a failed item."""
    path = tmp_path / "in.jsonl"
    lines = [
        {"id": "a", "prompt": "p", "reasoning_effort": "low"},
        {"id": "b", "prompt": "p", "reasoning_effort": "extreme"},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    batch_input = read_input(path, "m")
    items, bad = batch_input.items, batch_input.bad
    assert [item.request.params.reasoning_effort for item in items] == [pb.REASONING_EFFORT_LOW]
    assert [b.line for b in bad] == [2]
    assert "reasoning effort must be one of" in bad[0].reason


def test_an_answer_line_keeps_tool_calls_reasoning_and_whether_it_was_cached():
    """An item's line holds what its answer carried beyond the text: the tool calls a
    model asked for, its reasoning and reasoning tokens, and whether the cache served it.

    Before, the line held the text alone: a batch of agent steps lost every tool call."""
    response = pb.CompleteResponse(content="", reasoning="think first")
    response.tool_calls.add(id="call_1", name="lookup", arguments='{"q": "x"}')
    response.metadata.usage.output_tokens = 9
    response.metadata.usage.reasoning_tokens = 4
    response.metadata.cache_hit = True
    record = result_record(pb.BatchItemResult(id="q1", response=response), line=3)
    assert record["tool_calls"] == [{"id": "call_1", "name": "lookup", "arguments": '{"q": "x"}'}]
    assert record["reasoning"] == "think first"
    assert record["usage"]["reasoning_tokens"] == 4
    assert record["cache_hit"] is True
    plain = result_record(
        pb.BatchItemResult(id="q2", response=pb.CompleteResponse(content="hi")), 4
    )
    assert "tool_calls" not in plain
    assert "reasoning" not in plain


def test_an_error_line_says_when_to_retry_and_which_quota():
    """An item refused by its tenant's limit keeps the refusal's RetryInfo and quota."""
    retry = error_details_pb2.RetryInfo()
    retry.retry_delay.FromTimedelta(dt.timedelta(seconds=20, milliseconds=500))
    quota = error_details_pb2.QuotaFailure()
    quota.violations.add(subject="tenant:team-a:requests_per_minute")
    status = status_pb2.Status(code=8, message="over its limit")
    for detail in (retry, quota):
        status.details.add().Pack(detail)
    record = result_record(pb.BatchItemResult(id="q1", error=status), line=1)["error"]
    assert record["code"] == "RESOURCE_EXHAUSTED"
    assert record["retry_after_s"] == 20.5
    assert record["quota_violations"] == ["tenant:team-a:requests_per_minute"]


def test_a_request_line_refuses_options_it_would_leave_out(tmp_path):
    """A `request` line is sent as given, so a prompt line's option beside it (`tools`,
    `max_tokens`, `system`, ...) makes a bad line saying where it goes, not an item sent
    without it; a top-level `model` still fills a request that names none."""
    path = tmp_path / "in.jsonl"
    request = {"messages": [{"role": "ROLE_USER", "content": "Weather?"}]}
    lines = [
        {"id": "a", "request": request, "tools": [{"name": "get_weather"}]},
        {"id": "b", "request": request, "max_tokens": 5, "system": "Be brief"},
        {"id": "c", "request": request, "model": "m2"},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    batch_input = read_input(path, "m")
    items, bad = batch_input.items, batch_input.bad
    assert [(item.id, item.request.model) for item in items] == [("c", "m2")]
    assert [b.line for b in bad] == [1, 2]
    assert bad[0].reason == "'tools' beside 'request' would be left out: put it inside 'request'"
    assert "'max_tokens', 'system'" in bad[1].reason


def test_a_value_this_client_does_not_know_is_written_as_its_number():
    """A finish reason or health a newer gateway adds is printed as its number: the
    generated `Name` raised on it, ending `batch` after the item was paid for (a re-run
    paid again) and `complete` and `models` with a traceback."""
    response = pb.CompleteResponse(content="hi")
    response.metadata.finish_reason = 99  # proto3 enums are open: it decodes as 99
    record = result_record(pb.BatchItemResult(id="q1", response=response), line=1)
    assert record["finish_reason"] == "99"
    assert "finish=99" in usage_line(response.metadata, elapsed_s=0.1)
    known = pb.CompleteResponse(content="hi")
    known.metadata.finish_reason = pb.FINISH_REASON_LENGTH
    assert result_record(pb.BatchItemResult(id="q2", response=known), 1)["finish_reason"] == (
        "length"
    )
    catalog = pb.ListModelsResponse()
    catalog.models.add(name="m").upstreams.add(name="up0", health=42)
    assert "up0(42)" in format_models(catalog)


def test_models_table_prints_each_price_whole_and_the_cached_input_price():
    """Prices were printed to two decimals, so DeepSeek's cache-hit price of 0.028 read
    0.03, and the cached-input price was not printed at all."""
    catalog = pb.ListModelsResponse()
    catalog.models.add(
        name="deepseek-v4",
        context_window=128000,
        pricing=pb.Pricing(
            input_usd_per_million=0.14,
            output_usd_per_million=0.275,
            cached_input_usd_per_million=0.028,
        ),
    )
    catalog.models.add(
        name="gpt-4", pricing=pb.Pricing(input_usd_per_million=2.5, output_usd_per_million=10)
    )
    lines = format_models(catalog).splitlines()
    assert all(line == line.rstrip() for line in lines), "no trailing blanks"
    header, deepseek, gpt = (line.split() for line in lines)
    assert header[:7] == ["MODEL", "CONTEXT", "IN", "$/1M", "CACHED", "IN", "$/1M"]
    assert deepseek[:5] == ["deepseek-v4", "128000", "0.14", "0.028", "0.275"]
    assert gpt[:5] == ["gpt-4", "0", "2.50", "-", "10.00"]


@pytest.mark.parametrize(
    ("name", "known"),
    [
        ("max_token", "max_tokens"),
        ("Max_Tokens", "max_tokens"),
        ("promt", "prompt"),
        ("label", "labels"),
        ("sytem", "system"),
        ("ID", "id"),
        ("ids", None),  # a name of 4 letters or fewer is misspelt in letter case alone
        ("uid", None),
        ("step", None),
        ("need", None),
        ("topic", None),  # two edits from `top_p`: one for a name shorter than 8
        ("code", None),
        ("temperture", "temperature"),
        ("tool_choise", "tool_choice"),
        ("x", None),  # as far from `id` as any two letters: no misspelling of it
        ("source", None),
        ("answer", None),
        ("category", None),
        ("temp", None),
    ],
)
def test_a_field_a_misspelling_away_from_a_known_one_is_taken_for_it(name, known):
    """Within an edit of a known field (two of a long one; letter case alone for one of
    4 letters or fewer), a field is taken for its misspelling; a dataset's own fields
    (`uid`, `topic`, `code`, `step`) are not."""
    assert known_field_like(name) == known


@pytest.mark.parametrize(
    ("a", "b", "distance"),
    [
        ("", "", 0),
        ("id", "", 2),
        ("max_token", "max_tokens", 1),
        ("top_k", "top_p", 1),
        ("kitten", "sitting", 3),
    ],
)
def test_edit_distance_counts_insertions_deletions_and_substitutions(a, b, distance):
    """Levenshtein distance, either way round."""
    assert edit_distance(a, b) == edit_distance(b, a) == distance


def test_input_names_each_misspelt_looking_field_once_and_still_uses_the_line(tmp_path):
    """`max_token` is named once, on the first line it is on, and its lines run without
    it; a field that looks like no known one, or that stands beside the one it would
    misspell (`promt` beside `prompt`), is left out without a word."""
    path = tmp_path / "in.jsonl"
    lines = [
        {"id": "a", "prompt": "p", "source": "wiki"},
        {"id": "b", "prompt": "p", "max_token": 5, "promt": "x"},
        {"id": "c", "prompt": "p", "max_token": 5},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    batch_input = read_input(path, "m")
    assert [item.id for item in batch_input.items] == ["a", "b", "c"]
    assert not any(item.request.params.HasField("max_tokens") for item in batch_input.items)
    assert batch_input.bad == []
    assert batch_input.unknown_fields == [
        UnknownField(2, "max_token", "max_tokens"),
    ]


def test_the_usage_line_writes_a_control_character_of_the_model_as_an_escape():
    """A model name with a terminal escape sequence (from an upstream, relayed by another
    gateway) is printed escaped: the terminal never receives the raw ESC."""
    meta = pb.CompletionMetadata(model="fake\x1b]0;title\x07", upstream="up0")
    line = usage_line(meta, elapsed_s=0.1)
    assert line.startswith("[fake\\x1b]0;title\\x07 via up0]")
    assert line.isprintable()
