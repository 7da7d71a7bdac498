"""`llm-gateway batch INPUT.jsonl -o OUTPUT.jsonl`: many completions, resumable.

INPUT `-` reads the lines from standard input, and OUTPUT `-` writes the results to
standard output (nothing to resume from there, so not with `--retry-failed`). Each input
line is a JSON object with an `id` and either a `prompt` (plus optional `system`),
`messages` (a list of {"role", "content"}), or `request` (a CompleteRequest in proto3
JSON). Optional: `model` (else --model), `max_tokens`, `temperature`, `top_p`, `seed`,
`reasoning_effort` ("low", "max", ...), `labels` (string values), and `tools` and
`tool_choice` as a `request` gives them (proto3 JSON: [{"name", "description",
"parameters": "<JSON Schema as text>"}], {"mode": "TOOL_CHOICE_MODE_REQUIRED"} or
{"function_name": "..."}). Lines that cannot be used are reported with their line
numbers and skipped. Other fields are left out without a word (datasets carry their
own), but one a misspelling away from a known one (`max_token`) is named on stderr, once
a run.

Each result is appended to OUTPUT as one JSON line the moment it arrives, with either
`content` (plus usage and cost) or `error`. Re-running skips every id already in OUTPUT,
so an interrupted run loses nothing and pays nothing twice; `--retry-failed` first
removes the error lines so those items run again. A run holds an exclusive lock on
OUTPUT (advisory, on this machine only): a second run on the same OUTPUT exits 1 at
once rather than run the same items again. OUTPUT may not be the input file itself.

Exit status: 0 when every line was valid and every item succeeded, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import fcntl
import json
import os
import random
import re
import stat
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import grpc
from google.protobuf import json_format
from google.rpc import status_pb2

from gateway_client.client import GatewayClient, build_request
from gateway_client.commands.complete import ctrl_c_interrupts, stdin_bytes
from gateway_client.connection import (
    DEFAULT_MODEL,
    add_connection_arguments,
    connection,
    text_argument,
)
from gateway_client.enums import enum_name
from gateway_client.errors import error_details, status_details
from gateway_client.progress import Progress
from gateway_client.text_input import text_lines
from llmgateway.v1 import gateway_pb2 as pb
from service.command_line import file_path
from service.retry import BackoffPolicy, backoff_s

# One call carries at most this many items and bytes; the rest wait for the next call.
DEFAULT_ITEMS_PER_CALL = 500
MAX_CALL_BYTES = 3 * 1024 * 1024
# A call ended by a replica shutting down is sent again at most this many times in a row
# without a result, after a jittered back-off from RESEND_BACKOFF_S up to RESEND_MAX_BACKOFF_S.
MAX_RESENDS = 5
RESEND_BACKOFF_S = 0.2
RESEND_MAX_BACKOFF_S = 2.0
_RESEND_BACKOFF = BackoffPolicy(base_s=RESEND_BACKOFF_S, cap_s=RESEND_MAX_BACKOFF_S)
_RESEND_RNG = random.Random()
# The gateway refuses a whole call for one id past this or not printable (a tab, a
# line break): such a line is skipped instead (`service.validation.MAX_CALLER_ID`).
MAX_ID_CHARS = 256
_PARAM_KEYS = ("max_tokens", "temperature", "top_p", "seed", "reasoning_effort")
# What a prompt or messages line may set; a `request` line carries all of it inside.
_PROMPT_LINE_KEYS = (
    "prompt",
    "messages",
    "system",
    "labels",
    "tools",
    "tool_choice",
    *_PARAM_KEYS,
)
_LINE_KEYS = ("id", "model", "request", *_PROMPT_LINE_KEYS)
# A field this close to a known one (edits, letter case aside) is taken for its misspelling:
# none but letter case for a name of 4 letters or fewer (`need`, `step`, `uid` are a
# dataset's own, not `seed`, `stop`, `id`), one for one shorter than 8, two for longer.
MAX_TYPO_EDITS = 2


def _typo_edits(known: str) -> int:
    """How many edits from `known` a field may be and still be taken for its misspelling."""
    if len(known) <= 4:
        return 0
    return 1 if len(known) < 8 else MAX_TYPO_EDITS


# INPUT that names standard input, as for `complete -` and `summarize -`; OUTPUT that
# names standard output.
STDIN = "-"
STDOUT = "-"


def register(subparsers: Any) -> None:
    """Add the `batch` subcommand."""
    from gateway_client.cli import UINT32, int_in

    parser: argparse.ArgumentParser = subparsers.add_parser(
        "batch",
        help="run many completions from a JSONL file, resumably",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "input", type=file_path, help="JSONL file of items ('-' reads standard input)"
    )
    parser.add_argument(
        "-o",
        "--output",
        type=file_path,
        required=True,
        help="JSONL results file ('-' writes standard output)",
    )
    parser.add_argument(
        "--concurrency",
        type=int_in(UINT32),
        default=0,
        help="items in flight (default: the gateway's)",
    )
    parser.add_argument(
        "--model",
        type=text_argument,
        default=DEFAULT_MODEL,
        help="model for items without one (default: %(default)s)",
    )
    parser.add_argument(
        "--retry-failed", action="store_true", help="run again the items that failed before"
    )
    parser.add_argument(
        "--items-per-call",
        type=int_in((1, UINT32[1])),
        default=DEFAULT_ITEMS_PER_CALL,
        help="items per CompleteBatch call (default: %(default)s)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_connection_arguments(parser)
    parser.set_defaults(handler=batch_command, usage_error=parser.error)


# The gateway's refusals of a call with more items than its `batch.max_items`, and of a
# `concurrency` above its `batch.max_concurrency`.
_TOO_MANY_ITEMS = re.compile(r"at most (\d+) items, got \d+")
_TOO_MUCH_CONCURRENCY = re.compile(r"at most (\d+), got \d+")


def _options_to_lower(violations: Sequence[tuple[str, str]], items_per_call: int) -> list[str]:
    """For each of the gateway's batch limits an option passed, the most it takes and the
    option to run again with: the same command would be refused again, every run."""
    hints = []
    for name, why in violations:
        if name == "items" and (found := _TOO_MANY_ITEMS.fullmatch(why)):
            most = int(found[1])
            if most < items_per_call:
                hints.append(
                    f"the gateway takes at most {most} items a call: run again with "
                    f"--items-per-call {most}"
                )
        elif name == "concurrency" and (found := _TOO_MUCH_CONCURRENCY.fullmatch(why)):
            most = int(found[1])
            hints.append(
                f"the gateway runs at most {most} items at once: run again with "
                f"--concurrency {most}"
            )
    return hints


@dataclass(frozen=True, slots=True)
class InputItem:
    """One usable input line."""

    line: int
    id: str
    request: pb.CompleteRequest


@dataclass(frozen=True, slots=True)
class BadLine:
    """One input line that was skipped, and why."""

    line: int
    reason: str


def _tools_from(data: dict[str, Any]) -> tuple[list[pb.Tool], pb.ToolChoice | None]:
    """A prompt or messages line's `tools` and `tool_choice`, in the proto3 JSON a
    `request` line gives them in; raises ValueError saying what is wrong."""
    tools = data.get("tools") or []
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        raise ValueError("'tools' must be a list of Tool objects")
    choice = data.get("tool_choice")
    if choice is not None and not isinstance(choice, dict):
        raise ValueError("'tool_choice' must be a ToolChoice object")
    try:
        parsed = [json_format.ParseDict(tool, pb.Tool()) for tool in tools]
    except json_format.ParseError as exc:
        raise ValueError(f"'tools' is not a list of Tool objects: {exc}") from None
    try:
        return parsed, None if choice is None else json_format.ParseDict(choice, pb.ToolChoice())
    except json_format.ParseError as exc:
        raise ValueError(f"'tool_choice' is not a ToolChoice: {exc}") from None


def _model_from(data: dict[str, Any], default_model: str) -> str:
    """A line's `model`, else `default_model`; raises ValueError when it is not text."""
    model = data.get("model")
    if model is None or model == "":
        return default_model
    if not isinstance(model, str):
        raise ValueError("'model' must be a string")
    return model


def _request_from(data: dict[str, Any], default_model: str) -> pb.CompleteRequest:
    """The CompleteRequest a line describes; raises ValueError saying what is wrong."""
    if "request" in data:
        if not isinstance(data["request"], dict):
            raise ValueError("'request' must be an object")
        beside = sorted(key for key in _PROMPT_LINE_KEYS if key in data)
        if beside:
            # The request is sent as given: an option beside it would be silently left out.
            named = ", ".join(repr(key) for key in beside)
            raise ValueError(f"{named} beside 'request' would be left out: put it inside 'request'")
        try:
            request = json_format.ParseDict(data["request"], pb.CompleteRequest())
        except json_format.ParseError as exc:
            raise ValueError(f"'request' is not a CompleteRequest: {exc}") from None
        if not request.model:
            request.model = _model_from(data, default_model)
        return request
    params = {key: data[key] for key in _PARAM_KEYS if key in data}
    labels = data.get("labels") or {}
    # Text only, as a `request` line's labels: `str()` made null the label "None".
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
        raise ValueError("'labels' must be an object of strings")
    model = _model_from(data, default_model)
    tools, tool_choice = _tools_from(data)
    if "messages" in data and "prompt" in data:
        # One of them would be left out, as an option beside 'request' would be.
        raise ValueError("give 'prompt' or 'messages', not both")
    if "messages" in data:
        messages = data["messages"]
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages
        ):
            raise ValueError("'messages' must be a list of {role, content} objects")
        turns = [(str(m.get("role", "user")), m["content"]) for m in messages]
        if any(role not in ("system", "user", "assistant") for role, _ in turns):
            raise ValueError("a message role must be system, user or assistant")
        prompt: str | list[tuple[str, str]] = turns
    elif isinstance(data.get("prompt"), str):
        prompt = data["prompt"]
    else:
        raise ValueError("needs 'prompt', 'messages' or 'request'")
    try:
        return build_request(
            prompt,
            model=model,
            system=data.get("system"),
            labels=labels,
            tools=tools,
            tool_choice=tool_choice,
            **params,
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"bad parameter: {exc}") from None


def _call_bytes(item_id: str, request: pb.CompleteRequest) -> int:
    """About what one item adds to a CompleteBatch call."""
    return request.ByteSize() + len(item_id) + 16


def _json_line(raw: str | bytes) -> Any:
    """One line's JSON value; ValueError when it is not JSON, nested too deeply included."""
    try:
        return json.loads(raw)
    except RecursionError:
        # json's decoder recurses once a level: a line of thousands of `[` would end the
        # whole command with a traceback, where any other unusable line is skipped.
        raise ValueError("nested too deeply") from None


def _is_utf8(text: str) -> bool:
    """Whether `text` can be sent: JSON's `\\ud800` escapes decode to unpaired surrogates,
    which Protobuf (and the UTF-8 output) cannot encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class UnknownField:
    """A field no line uses, on the first line it appears, that looks like a misspelling
    of `known` (`max_token` for `max_tokens`)."""

    line: int
    name: str
    known: str


@dataclass(frozen=True, slots=True)
class BatchInput:
    """An input's usable lines, its skipped ones, and its misspelt-looking fields."""

    items: list[InputItem]
    bad: list[BadLine]
    unknown_fields: list[UnknownField]


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: the fewest one-character insertions, deletions and
    substitutions that turn `a` into `b`."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(
                min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b))
            )
        previous = current
    return previous[-1]


def known_field_like(name: str) -> str | None:
    """The known line field `name` (not one) looks like a misspelling of, if any: within
    `_typo_edits` of it, letter case aside (`topic` is no `top_p`, `code` no `model`)."""
    folded = name.casefold()
    close = [
        (distance, known)
        for known in _LINE_KEYS
        if abs(len(folded) - len(known)) <= MAX_TYPO_EDITS
        and (distance := edit_distance(folded, known)) <= _typo_edits(known)
    ]
    return min(close)[1] if close else None


def read_input(path: Path, default_model: str) -> BatchInput:
    """`read_lines` of the file at `path`, in the encoding its byte order mark names (a
    Windows tool's UTF-16), else UTF-8 (`text_lines`)."""
    with path.open("rb") as source, text_lines(source) as lines:
        return read_lines(lines, default_model)


def read_stdin(default_model: str) -> BatchInput:
    """`read_lines` of standard input, decoded as a file is."""
    # Read through to its end here, once: a pipe cannot be read again. Closing the
    # wrapper leaves stdin open.
    with ctrl_c_interrupts(), text_lines(stdin_bytes()) as lines:
        return read_lines(lines, default_model)


def read_lines(lines: Iterable[str], default_model: str) -> BatchInput:
    """Every usable line, every line that is not (with line numbers), and the first line
    of each field that looks like a misspelt known one."""
    items: list[InputItem] = []
    bad: list[BadLine] = []
    unknown_fields: list[UnknownField] = []
    checked_fields = set(_LINE_KEYS)
    first_line_of: dict[str, int] = {}
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            data = _json_line(raw)
        except ValueError as exc:
            bad.append(BadLine(number, f"not JSON ({exc.args[0]})"))
            continue
        if not isinstance(data, dict):
            bad.append(BadLine(number, "not a JSON object"))
            continue
        for name in sorted(data.keys() - checked_fields):
            checked_fields.add(name)
            known = known_field_like(name)
            # Not beside the field it would misspell: `prompts` next to `prompt` is the
            # dataset's own.
            if known is not None and known not in data:
                unknown_fields.append(UnknownField(number, name, known))
        item_id = data.get("id")
        if isinstance(item_id, bool) or not isinstance(item_id, str | int) or item_id == "":
            bad.append(BadLine(number, "needs an 'id' (a non-empty string)"))
            continue
        item_id = str(item_id)
        if not _is_utf8(item_id):
            bad.append(
                BadLine(number, "'id' is not UTF-8 text (an unpaired \\ud800-\\udfff escape)")
            )
            continue
        if len(item_id) > MAX_ID_CHARS or not item_id.isprintable():
            bad.append(
                BadLine(number, f"'id' must be printable, at most {MAX_ID_CHARS} characters")
            )
            continue
        if item_id in first_line_of:
            bad.append(
                BadLine(
                    number, f"duplicate id {item_id!r} (first on line {first_line_of[item_id]})"
                )
            )
            continue
        try:
            request = _request_from(data, default_model)
        except ValueError as exc:
            bad.append(BadLine(number, str(exc)))
            continue
        size = _call_bytes(item_id, request)
        if size > MAX_CALL_BYTES:
            # Alone in its call it would still fail the call, and stop every resume there.
            bad.append(
                BadLine(number, f"too large for one call ({size} bytes, at most {MAX_CALL_BYTES})")
            )
            continue
        first_line_of[item_id] = number
        items.append(InputItem(number, item_id, request))
    return BatchInput(items, bad, unknown_fields)


def _is_result(raw: bytes) -> bool:
    """Whether `raw` is a whole result line: a JSON object with an id."""
    try:
        record = _json_line(raw)
    except ValueError:
        return False
    return isinstance(record, dict) and "id" in record


@dataclass(frozen=True, slots=True)
class Done:
    """What the output already holds: every id in it, and those recorded as errors."""

    ids: frozenset[str] = frozenset()
    failed: frozenset[str] = frozenset()


def read_done(path: Path, *, retry_failed: bool) -> Done:
    """The ids already in the output; repairs a last line cut short by an interruption.

    With `retry_failed`, error lines are removed (the file is rewritten atomically) and
    their ids are not counted as done.
    """
    # Only a file holds earlier results. Reading anything else would never end: a pipe
    # (`-o /dev/stdout | jq`) waits for its own writer, /dev/zero fills the memory.
    if not path.is_file():
        return Done()
    data = path.read_bytes()
    good_end = data.rfind(b"\n") + 1
    if good_end < len(data):
        if _is_result(data[good_end:]):
            # Whole but for its line break (cut just before it, or an editor's last line):
            # a result paid for, kept rather than run and paid for again.
            with path.open("ab") as output:
                output.write(b"\n")
            data += b"\n"
        else:  # a line cut in the middle of writing: drop it
            with path.open("r+b") as output:
                output.truncate(good_end)
            data = data[:good_end]
    done: set[str] = set()
    failed: set[str] = set()
    kept: list[bytes] = []
    for raw in data.splitlines(keepends=True):
        try:
            record = _json_line(raw)
        except ValueError:
            kept.append(raw)
            continue
        if not isinstance(record, dict) or "id" not in record:
            kept.append(raw)
            continue
        if "error" in record:
            if retry_failed:
                continue
            failed.add(str(record["id"]))
        kept.append(raw)
        done.add(str(record["id"]))
    if retry_failed:
        # The file itself, beside it: replacing a symlink to the output would leave the
        # output (and its error lines) where it was, and this run's results elsewhere.
        real = path.resolve()
        temporary = real.with_name(real.name + ".tmp")
        _write_with_mode_of(real, temporary, b"".join(kept))
        os.replace(temporary, real)
    return Done(frozenset(done), frozenset(failed))


def _write_with_mode_of(original: Path, path: Path, data: bytes) -> None:
    """Write `data` to `path` with `original`'s permission bits: the results of an output
    made private (0600) must not become readable by all (the umask's 0644) when the file
    replacing it is written."""
    mode = stat.S_IMODE(original.stat().st_mode)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        os.fchmod(file.fileno(), mode)  # a file left there before keeps its own mode
        file.write(data)


class OutputHeld(Exception):
    """Another batch run holds the output's lock."""


def lock_output(path: Path) -> TextIO:
    """`path` opened for appending, under an exclusive lock for as long as it is open
    when it is a file (`is_lockable`).

    The lock is `flock`'s: advisory (only batch runs take it) and local to this machine
    (an NFS mount's other clients do not see it).

    Raises:
        OutputHeld: another open file holds the lock, at once rather than waiting.
        OSError: `path` cannot be opened for appending.
    """
    while True:
        output = path.open("a", encoding="utf-8")
        if not is_lockable(output):
            return output
        try:
            fcntl.flock(output, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            output.close()
            raise OutputHeld(path) from None
        if is_current(output, path):
            return output
        # `--retry-failed` replaced the file after this one opened it: its lock on the
        # file it replaced guards nothing, so take the lock of the file there now.
        output.close()


def is_lockable(output: TextIO) -> bool:
    """Whether `output` is a regular file, the only output a run resumes from: the lock of
    anything else (/dev/null, a terminal, a pipe) is one every run there shares, and
    would refuse unrelated runs as holding it."""
    return stat.S_ISREG(os.fstat(output.fileno()).st_mode)


def is_current(output: TextIO, path: Path) -> bool:
    """Whether `output` is still the file at `path` (not replaced or removed since)."""
    try:
        now = path.stat()
    except FileNotFoundError:
        return False
    opened = os.fstat(output.fileno())
    return (opened.st_dev, opened.st_ino) == (now.st_dev, now.st_ino)


def open_output(path: Path, *, retry_failed: bool) -> tuple[TextIO, Done]:
    """`path` locked for appending (`lock_output`), and what it holds (`read_done`)."""
    output = lock_output(path)
    try:
        done = read_done(path, retry_failed=retry_failed)
        if not is_current(output, path):  # --retry-failed replaced it
            # The new file is locked before the old one is let go: no run starts in between.
            replaced, output = output, lock_output(path)
            replaced.close()
    except BaseException:
        output.close()
        raise
    return output, done


def open_results(
    output: str, *, retry_failed: bool
) -> tuple[contextlib.AbstractContextManager[TextIO], Done]:
    """Where this run's results go, and what an earlier run left there: `open_output` of
    the file `output`, or standard output (`STDOUT`), which holds nothing to resume from
    and is left open at the end."""
    if output == STDOUT:
        return contextlib.nullcontext(sys.stdout), Done()
    return open_output(Path(output), retry_failed=retry_failed)


def _status_record(status: status_pb2.Status) -> dict[str, Any]:
    details = status_details(status)
    record: dict[str, Any] = {"code": details.code, "message": details.message}
    if details.reason:
        record["reason"] = details.reason
        if details.metadata:
            record["metadata"] = details.metadata
    if details.field_violations:
        record["field_violations"] = [
            {"field": name, "description": why} for name, why in details.field_violations
        ]
    if details.retry_after_s is not None:
        record["retry_after_s"] = details.retry_after_s
    if details.quota_violations:
        record["quota_violations"] = [subject for subject, _ in details.quota_violations]
    return record


def result_record(result: pb.BatchItemResult, line: int) -> dict[str, Any]:
    """One output line for one item's result."""
    if result.HasField("error"):
        return {"id": result.id, "line": line, "error": _status_record(result.error)}
    response = result.response
    meta = response.metadata
    record: dict[str, Any] = {
        "id": result.id,
        "line": line,
        "content": response.content,
        "model": meta.model,
        "finish_reason": enum_name(
            pb.FinishReason, meta.finish_reason, prefix="FINISH_REASON_"
        ).lower(),
        "usage": {
            "input_tokens": meta.usage.input_tokens,
            "output_tokens": meta.usage.output_tokens,
            "cached_input_tokens": meta.usage.cached_input_tokens,
            "reasoning_tokens": meta.usage.reasoning_tokens,
            "estimated": meta.usage.estimated,
        },
        "cost_usd": meta.cost_usd,
        "cache_hit": meta.cache_hit,
        "upstream": meta.upstream,
        "dropped_messages": meta.dropped_messages,
    }
    if response.reasoning:
        record["reasoning"] = response.reasoning
    if response.tool_calls:
        record["tool_calls"] = [
            {"id": call.id, "name": call.name, "arguments": call.arguments}
            for call in response.tool_calls
        ]
    return record


def slices(items: Sequence[InputItem], per_call: int) -> Iterator[list[InputItem]]:
    """Consecutive groups of at most `per_call` items and MAX_CALL_BYTES each."""
    group: list[InputItem] = []
    size = 0
    for item in items:
        item_size = _call_bytes(item.id, item.request)
        if group and (len(group) >= per_call or size + item_size > MAX_CALL_BYTES):
            yield group
            group, size = [], 0
        group.append(item)
        size += item_size
    if group:
        yield group


async def run_items(
    client: GatewayClient,
    pending: Sequence[InputItem],
    output: TextIO,
    progress: Progress,
    *,
    concurrency: int,
    per_call: int,
) -> int:
    """Run `pending`, appending each result to `output` as it arrives; return failures.

    A call the gateway ends because this replica cannot go on (it is shutting down: the
    `llm-gateway-retry-elsewhere` trailer) is sent again with the items it gave no result
    for, up to MAX_RESENDS times in a row, reaching another replica or the restarted one.
    """
    failed = 0
    # A stdout that cannot encode every character (`PYTHONIOENCODING=ascii`) would write
    # them as Python's backslash escapes, which JSON has not: JSON's own `\u00e9` then.
    is_ascii_only = not codecs.lookup(output.encoding or "ascii").name.startswith("utf")
    for group in slices(pending, max(1, per_call)):
        unanswered = group
        resends = 0
        while unanswered:
            answered: set[int] = set()
            try:
                items = [pb.BatchItem(id=item.id, request=item.request) for item in unanswered]
                async for event in client.complete_batch(items, concurrency=concurrency):
                    if not event.HasField("result"):
                        continue
                    result = event.result
                    answered.add(result.index)
                    record = result_record(result, unanswered[result.index].line)
                    output.write(json.dumps(record, ensure_ascii=is_ascii_only) + "\n")
                    output.flush()
                    is_failure = result.HasField("error")
                    failed += int(is_failure)
                    usage = result.response.metadata.usage
                    progress.advance(
                        is_failure=is_failure,
                        tokens=usage.input_tokens + usage.output_tokens,
                        cost_usd=result.response.metadata.cost_usd,
                    )
                unanswered = []
            except grpc.aio.AioRpcError as error:
                details = error_details(error)
                resends = 0 if answered else resends + 1
                if not details.retry_elsewhere or resends > MAX_RESENDS:
                    raise
                unanswered = [item for i, item in enumerate(unanswered) if i not in answered]
                progress.note(
                    f"the gateway ended the call ({details.reason or details.code}): "
                    f"sending its {len(unanswered)} unanswered items again"
                )
                await asyncio.sleep(_resend_delay_s(resends, details.retry_after_s))
    return failed


def _resend_delay_s(resends: int, retry_after_s: float | None) -> float:
    """How long to wait before sending a call again: what the gateway asked (zero when
    shutting down: at once, elsewhere), then a jittered back-off that grows with each
    resend that got no result, so that callers of one replica do not all arrive at once."""
    jitter_s = backoff_s(resends - 1, retry_after_s=None, rng=_RESEND_RNG, policy=_RESEND_BACKOFF)
    return (retry_after_s or 0.0) + jitter_s


def _is_no_regular_file(output: str) -> bool:
    """Whether `output` exists and is something other than a regular file (through any
    symlink): a pipe, a device, a directory."""
    try:
        return not stat.S_ISREG(os.stat(output).st_mode)
    except OSError:  # not there yet: a first run writes it
        return False


def _is_the_input(output: str, *, is_stdin: bool, input_path: str) -> bool:
    """Whether `output` is the regular file the input is read from (`input_path`, or
    standard input redirected from a file), by any name."""
    try:
        written = os.stat(output)
        read = os.fstat(stdin_bytes().fileno()) if is_stdin else os.stat(input_path)
    except (OSError, ValueError):  # either one not there (or stdin closed): read errors say so
        return False
    return stat.S_ISREG(written.st_mode) and os.path.samestat(written, read)


async def batch_command(args: argparse.Namespace) -> int:
    """Run `llm-gateway batch`."""
    is_stdout = args.output == STDOUT
    if is_stdout and args.retry_failed:
        # It reads the earlier run's error lines back from the output: a pipe keeps none.
        args.usage_error(
            "argument --retry-failed: not allowed with -o -: standard output holds no "
            "earlier results to read back (give -o FILE)"
        )  # exits 2, before any call and before reading standard input
    if args.retry_failed and not is_stdout and _is_no_regular_file(args.output):
        args.usage_error(
            f"argument --retry-failed: {args.output} is no regular file: it holds no "
            "earlier results to read back (give -o FILE)"
        )  # exits 2, as for -o -: a pipe or a device (/dev/stdout) keeps nothing
    is_stdin = args.input == STDIN
    if not is_stdout and _is_the_input(args.output, is_stdin=is_stdin, input_path=args.input):
        # Every input line has an id and no error: each would be taken for a result, and
        # the run would call nothing and exit 0, as if every item had been answered.
        args.usage_error(
            f"argument -o/--output: {args.output} is the input file: its lines would be "
            "taken for results and nothing run (give another -o FILE)"
        )  # exits 2, before any call
    try:
        batch_input = (
            read_stdin(args.model) if is_stdin else read_input(Path(args.input), args.model)
        )
    except OSError as exc:
        print(f"llm-gateway batch: cannot read {args.input}: {exc.strerror}", file=sys.stderr)
        return 1
    items, bad = batch_input.items, batch_input.bad
    source = "<stdin>" if is_stdin else args.input
    notes = [(line.line, f"skipped: {line.reason}") for line in bad] + [
        (field.line, f'unknown field "{field.name}" ignored (did you mean "{field.known}"?)')
        for field in batch_input.unknown_fields
    ]
    for line_number, note in sorted(notes, key=lambda pair: pair[0]):
        print(f"{source}:{line_number}: {note}", file=sys.stderr)
    try:
        opened, done = open_results(args.output, retry_failed=args.retry_failed)
    except OutputHeld:
        print(
            f"llm-gateway batch: {args.output} is held by another batch run; nothing was run",
            file=sys.stderr,
        )
        return 1
    except OSError as exc:
        print(f"llm-gateway batch: cannot write {args.output}: {exc.strerror}", file=sys.stderr)
        return 1
    pending = [item for item in items if item.id not in done.ids]
    failed_before = sum(1 for item in items if item.id in done.failed)
    skipped = len(items) - len(pending)
    if skipped:
        print(f"resuming: {skipped} items already in {args.output}", file=sys.stderr)
    progress = Progress(len(pending), stream=sys.stderr, is_enabled=not args.no_progress)
    failed = 0
    async with GatewayClient(args.address, **connection(args), timeout_s=None) as client:
        with opened as output:
            try:
                failed = await run_items(
                    client,
                    pending,
                    output,
                    progress,
                    concurrency=args.concurrency,
                    per_call=args.items_per_call,
                )
            except grpc.aio.AioRpcError as error:
                progress.close()
                details = error_details(error)
                print(details.describe(), file=sys.stderr)
                hints = _options_to_lower(details.field_violations, args.items_per_call)
                for hint in hints:
                    print(hint, file=sys.stderr)
                if not hints and not is_stdout:  # standard output keeps nothing to resume from
                    print("re-run the same command to resume", file=sys.stderr)
                return 1
    progress.close()
    print(
        f"done: {len(pending) - failed} succeeded, {failed} failed, {len(bad)} bad lines, "
        f"{skipped} already done; tokens {progress.tokens}, cost ${progress.cost_usd:.6f}",
        file=sys.stderr,
    )
    if failed_before:
        print(
            f"{failed_before} items failed in an earlier run (--retry-failed runs them again)",
            file=sys.stderr,
        )
    # The output is the result: it must hold an answer for every item, this run's or not.
    return 0 if failed == 0 and failed_before == 0 and not bad else 1
