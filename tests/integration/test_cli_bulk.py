"""The `batch`, `summarize` and `check` commands against a real gateway and upstream."""

import argparse
import asyncio
import codecs
import io
import json
import os
import signal
import socket
import ssl
import sys
from pathlib import Path

import pytest
import yaml

from gateway_client.commands import batch, check, summarize
from llmgateway.v1 import gateway_pb2 as pb
from service.config import LocalModelConfig
from service.local_model import missing_install
from service.validation import MAX_CALLER_ID
from tests.conftest import FAKE_MODEL, gateway_config
from tests.fake_upstream import FakeUpstream, Hang, Reply, Status
from tests.integration.pki import make_pki
from tests.scripted_upstream import ScriptedUpstream, system_text, user_text
from tests.secret_capture import record_emitted, register_secret


def parse(module, *argv: str) -> argparse.Namespace:
    """Arguments for one subcommand, parsed by its own parser."""
    parser = argparse.ArgumentParser()
    module.register(parser.add_subparsers())
    return parser.parse_args(list(argv))


def write_items(path, ids) -> None:
    """One prompt item per id."""
    path.write_text("".join(json.dumps({"id": i, "prompt": f"ok {i}"}) + "\n" for i in ids))


def output_records(path) -> list[dict]:
    """The JSON records of an output file."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def asked_ids(upstream) -> list[str]:
    """The item ids the upstream was asked about, in order."""
    return [user_text(r.body).removeprefix("ok ") for r in upstream.requests]


@pytest.fixture
async def scripted():
    """An upstream answering 'ok X' with 'answer X' after 30 ms, and 'fail X' with a 500."""

    def respond(body):
        text = user_text(body)
        if text.startswith("fail"):
            return Status(500)
        if system_text(body).startswith("You are given summaries"):
            return Reply(content="FINAL")
        return Reply(content="answer " + text.split()[-1], delay_s=0.03)

    async with ScriptedUpstream(models=(FAKE_MODEL,), respond=respond) as fake:
        yield fake


@pytest.fixture
async def address(scripted, start_gateway) -> str:
    """The address of a gateway in front of the scripted upstream."""
    gateway = await start_gateway(gateway_config(scripted.base_url))
    return gateway.server.address


async def wait_for_lines(path, count: int) -> None:
    """Wait until `path` has at least `count` complete lines."""
    for _ in range(1000):
        if path.exists() and path.read_text().count("\n") >= count:
            return
        await asyncio.sleep(0.01)
    raise TimeoutError(f"{path} never reached {count} lines")


async def test_interrupted_batch_resumes_and_runs_each_id_once(tmp_path, scripted, address):
    """An interrupted run keeps its results; the re-run asks only for the rest; each id once."""
    ids = [f"q{i}" for i in range(40)]
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_items(source, ids)
    argv = (str(source), "-o", str(output), "--concurrency", "4", "--address", address)
    argv += ("--model", FAKE_MODEL)
    first = asyncio.create_task(batch.batch_command(parse(batch, "batch", *argv)))
    await wait_for_lines(output, 10)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await scripted.wait_until(lambda: scripted.in_flight == 0)
    done_first = {r["id"] for r in output_records(output)}
    assert 10 <= len(done_first) < 40
    asked_before = len(scripted.requests)

    code = await batch.batch_command(parse(batch, "batch", *argv))

    assert code == 0
    records = output_records(output)
    assert sorted(r["id"] for r in records) == sorted(ids)  # each id exactly once
    assert all(r["content"] == "answer " + r["id"] for r in records)
    assert all(r["line"] == int(r["id"][1:]) + 1 for r in records)
    resumed = asked_ids(scripted)[asked_before:]
    assert not set(resumed) & done_first  # nothing paid twice
    assert set(resumed) == set(ids) - done_first


async def _batch_drained_under(gateway, fake, argv) -> int:
    """`batch` run with `argv`, `gateway` beginning its drain once two items are held
    at `fake` (which then answers them): the command's exit status."""
    run = asyncio.create_task(batch.batch_command(parse(batch, "batch", *argv)))
    await fake.wait_until(lambda: fake.in_flight == 2)
    stop = asyncio.ensure_future(gateway.server.stop(grace_s=30))
    while not gateway.server.pipeline.is_stopping:
        await asyncio.sleep(0.01)
    fake.gate.set()
    code = await run
    await stop
    return code


async def test_a_batch_a_draining_gateway_ends_is_sent_again_for_the_rest(
    tmp_path, start_gateway, capsys
):
    """A gateway that begins its drain mid-batch delivers the items it runs and ends the
    call SHUTTING_DOWN; the command sends the other items again, here reaching the second
    gateway of its address list, and ends with every answer, each item asked once. Before,
    it stopped there with exit 1 ("re-run the same command to resume")."""
    async with ScriptedUpstream(models=(FAKE_MODEL,)) as fake:
        first = await start_gateway(gateway_config(fake.base_url))
        second = await start_gateway(gateway_config(fake.base_url))
        fake.gate.clear()  # the first two items are held upstream
        ids = [f"q{i}" for i in range(6)]
        source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
        write_items(source, ids)
        address = f"ipv4:{first.server.address},{second.server.address}"
        argv = (str(source), "-o", str(output), "--concurrency", "2", "--address", address)
        code = await _batch_drained_under(first, fake, (*argv, "--model", FAKE_MODEL))

    assert code == 0
    records = output_records(output)
    assert sorted(r["id"] for r in records) == ids
    assert all(r["content"] == "Hello from fake" for r in records)
    assert sorted(asked_ids(fake)) == ids  # each item asked once, none paid twice
    assert "sending its 4 unanswered items again" in capsys.readouterr().err


async def test_a_batch_whose_only_gateway_drains_away_stops_resumable(
    tmp_path, start_gateway, capsys
):
    """With no other replica to reach, the resend fails and the command stops as it did:
    the answers delivered are kept, the rest left for the same command to resume."""
    async with ScriptedUpstream(models=(FAKE_MODEL,)) as fake:
        gateway = await start_gateway(gateway_config(fake.base_url))
        fake.gate.clear()
        source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
        write_items(source, [f"q{i}" for i in range(6)])
        argv = (str(source), "-o", str(output), "--concurrency", "2")
        argv += ("--address", gateway.server.address, "--model", FAKE_MODEL)
        code = await _batch_drained_under(gateway, fake, argv)

    assert code == 1
    assert len(output_records(output)) == len(fake.requests) == 2
    assert "re-run the same command to resume" in capsys.readouterr().err


async def test_a_last_result_without_its_line_break_is_kept_not_paid_for_again(
    tmp_path, scripted, address
):
    """A whole last result whose line break is missing (cut just before it, or an editor
    that drops the file's last one) is a result: the resumed run adds the break and asks
    only for the rest. Before, it was dropped as a cut line and its item paid for twice."""
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_items(source, ["q0", "q1"])
    argv = (str(source), "-o", str(output), "--address", address, "--model", FAKE_MODEL)
    assert await batch.batch_command(parse(batch, "batch", *argv, "--no-progress")) == 0
    output.write_bytes(output.read_bytes().rstrip(b"\n"))
    write_items(source, ["q0", "q1", "q2"])
    asked_before = len(scripted.requests)

    assert await batch.batch_command(parse(batch, "batch", *argv, "--no-progress")) == 0

    assert asked_ids(scripted)[asked_before:] == ["q2"]
    assert sorted(r["id"] for r in output_records(output)) == ["q0", "q1", "q2"]


async def test_a_last_line_cut_in_the_middle_is_run_again(tmp_path, scripted, address):
    """A last line cut inside its JSON is no result: it is dropped and its item run."""
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_items(source, ["q0", "q1"])
    argv = (str(source), "-o", str(output), "--address", address, "--model", FAKE_MODEL)
    assert await batch.batch_command(parse(batch, "batch", *argv, "--no-progress")) == 0
    lines = output.read_bytes().splitlines(keepends=True)
    cut_id = json.loads(lines[-1])["id"]
    output.write_bytes(lines[0] + lines[1][:-5])
    asked_before = len(scripted.requests)

    assert await batch.batch_command(parse(batch, "batch", *argv, "--no-progress")) == 0

    assert asked_ids(scripted)[asked_before:] == [cut_id]
    assert sorted(r["id"] for r in output_records(output)) == ["q0", "q1"]


async def test_malformed_lines_are_reported_and_skipped(tmp_path, scripted, address, capsys):
    """Bad lines are named by line number on stderr; the good ones still run."""
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text(
        "\n".join(
            [
                json.dumps({"id": "a", "prompt": "ok a"}),
                "{not json",
                json.dumps(["a", "list"]),
                json.dumps({"prompt": "no id"}),
                json.dumps({"id": "a", "prompt": "ok again"}),
                json.dumps({"id": "b", "messages": [{"role": "robot", "content": "x"}]}),
                "",
                json.dumps({"id": "c", "messages": [{"role": "user", "content": "ok c"}]}),
                json.dumps({"id": "d", "request": {"model": FAKE_MODEL, "nope": 1}}),
                # Protobuf takes true as 1.0 for a float: it would have run at temperature 1.
                json.dumps({"id": "e", "prompt": "x", "temperature": True}),
            ]
        )
        + "\n"
    )
    code = await batch.batch_command(
        parse(
            batch,
            "batch",
            str(source),
            "-o",
            str(output),
            "--address",
            address,
            "--model",
            FAKE_MODEL,
        )
    )
    err = capsys.readouterr().err
    assert code == 1
    for line, reason in [
        (2, "not JSON"),
        (3, "not a JSON object"),
        (4, "needs an 'id'"),
        (5, "duplicate id 'a' (first on line 1)"),
        (6, "a message role must be system, user or assistant"),
        (9, "'request' is not a CompleteRequest"),
        (10, "bad parameter: temperature: expected a float, got bool"),
    ]:
        assert f"in.jsonl:{line}: skipped: {reason}" in err
    assert sorted(r["id"] for r in output_records(output)) == ["a", "c"]
    assert "done: 2 succeeded, 0 failed, 7 bad lines" in err


async def test_a_line_whose_id_the_gateway_refuses_is_skipped(tmp_path, address, capsys):
    """An id the gateway would refuse (not printable, over 256 characters) makes a bad
    line, as a duplicate does: the other lines still run.

    Otherwise the gateway refuses the whole call, and every resume stops at it again.
    """
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [
        {"id": "a", "prompt": "ok a"},
        {"id": "tab\there", "prompt": "ok tab"},
        {"id": "x" * 257, "prompt": "ok long"},
        {"id": "x" * 256, "prompt": "ok b"},
    ]
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    argv = (str(source), "-o", str(output), "--address", address, "--model", FAKE_MODEL)

    code = await batch.batch_command(parse(batch, "batch", *argv))

    err = capsys.readouterr().err
    assert code == 1
    for line in (2, 3):
        assert f"in.jsonl:{line}: skipped: 'id' must be printable, at most 256 characters" in err
    assert sorted(r["id"] for r in output_records(output)) == ["a", "x" * 256]
    assert "done: 2 succeeded, 0 failed, 2 bad lines" in err


async def test_calls_of_more_items_than_the_gateway_takes_say_the_option_to_lower(
    tmp_path, scripted, start_gateway, capsys
):
    """A gateway whose `batch.max_items` is under `--items-per-call` refuses every call
    whole, on every rerun: the CLI says the most it takes and the option that sets it,
    not to run the same command again. With that option the run goes through."""
    gateway = await start_gateway(gateway_config(scripted.base_url, batch={"max_items": 4}))
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_items(source, [f"i{n}" for n in range(10)])
    argv = [str(source), "-o", str(output), "--address", gateway.server.address]
    argv += ["--model", FAKE_MODEL, "--no-progress"]

    assert await batch.batch_command(parse(batch, "batch", *argv)) == 1
    err = capsys.readouterr().err
    assert "the gateway takes at most 4 items a call: run again with --items-per-call 4" in err
    assert "re-run the same command" not in err
    assert not scripted.requests

    assert await batch.batch_command(parse(batch, "batch", *argv, "--items-per-call", "4")) == 0
    assert len(output_records(output)) == 10


async def test_a_concurrency_above_the_gateways_says_the_most_it_takes(
    tmp_path, scripted, start_gateway, capsys
):
    """A `--concurrency` above the gateway's `batch.max_concurrency` is refused on every
    rerun: the CLI says the most it takes and the option to lower, not to run the same
    command again. With that concurrency the run goes through."""
    limits = {"max_concurrency": 4, "default_concurrency": 2}
    gateway = await start_gateway(gateway_config(scripted.base_url, batch=limits))
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_items(source, ["a", "b", "c"])
    argv = [str(source), "-o", str(output), "--address", gateway.server.address]
    argv += ["--model", FAKE_MODEL, "--no-progress"]

    assert await batch.batch_command(parse(batch, "batch", *argv, "--concurrency", "5")) == 1
    err = capsys.readouterr().err
    assert "the gateway runs at most 4 items at once: run again with --concurrency 4" in err
    assert "re-run the same command" not in err
    assert not scripted.requests

    assert await batch.batch_command(parse(batch, "batch", *argv, "--concurrency", "4")) == 0
    assert len(output_records(output)) == 3


def test_the_clis_id_rule_is_the_gateways() -> None:
    """The CLI skips exactly the ids the gateway refuses."""
    assert batch.MAX_ID_CHARS == MAX_CALLER_ID


async def test_a_line_nested_too_deeply_is_skipped_and_the_rest_still_run(
    tmp_path, scripted, address, capsys
):
    """A line of thousands of nested arrays, in the input or in the output of an earlier
    run, is one more unusable line: the others still run.

    Before, json's decoder ran out of recursion on it, and the command ended with a
    RecursionError traceback before any item ran."""
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    nested = "[" * 100_000
    source.write_text(
        "\n".join(
            [
                json.dumps({"id": "a", "prompt": "ok a"}),
                nested,
                json.dumps({"id": "b", "prompt": "ok b"}),
            ]
        )
        + "\n"
    )
    output.write_text(nested + "\n")
    argv = (str(source), "-o", str(output), "--address", address, "--model", FAKE_MODEL)

    code = await batch.batch_command(parse(batch, "batch", *argv))

    err = capsys.readouterr().err
    assert code == 1
    assert "in.jsonl:2: skipped: not JSON (nested too deeply)" in err
    lines = output.read_text().splitlines()
    assert lines[0] == nested  # not ours to remove
    assert sorted(json.loads(line)["id"] for line in lines[1:]) == ["a", "b"]


async def test_an_id_with_an_unpaired_surrogate_escape_is_skipped_and_the_rest_still_run(
    tmp_path, scripted, address, capsys
):
    """An id JSON spells with an unpaired surrogate escape (`"\\ud800"`), which no
    Protobuf string can carry, makes its line unusable: the others still run.

    Before, it passed as an id, and building the first call failed with a
    UnicodeEncodeError traceback, so no item of the file ever ran."""
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text(
        json.dumps({"id": "a", "prompt": "ok a"})
        + "\n"
        + '{"id": "b\\ud800", "prompt": "ok b"}\n'
        + json.dumps({"id": "c", "prompt": "ok c"})
        + "\n"
    )
    argv = (str(source), "-o", str(output), "--address", address, "--model", FAKE_MODEL)

    code = await batch.batch_command(parse(batch, "batch", *argv))

    err = capsys.readouterr().err
    assert code == 1
    assert "in.jsonl:2: skipped: 'id' is not UTF-8 text" in err
    assert sorted(r["id"] for r in output_records(output)) == ["a", "c"]


async def test_a_byte_order_mark_does_not_make_the_first_line_unusable(
    tmp_path, scripted, address, capsys
):
    """An input file saved with a UTF-8 byte order mark (as Windows editors and PowerShell
    write one) runs every line. Before, the mark made line 1 "not JSON": skipped, exit 1."""
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_items(source, ["a", "b"])
    source.write_bytes(b"\xef\xbb\xbf" + source.read_bytes())
    argv = ("batch", str(source), "-o", str(output), "--address", address, "--no-progress")
    code = await batch.batch_command(parse(batch, *argv, "--model", FAKE_MODEL))
    assert "skipped" not in capsys.readouterr().err
    assert code == 0
    assert sorted(r["id"] for r in output_records(output)) == ["a", "b"]
    assert sorted(asked_ids(scripted)) == ["a", "b"]


# Text as Windows "Unicode" (UTF-16 LE, Notepad's) and PowerShell 5's `>` save it, and
# UTF-32 in the other byte order: a byte order mark, then the text.
MARKED_ENCODINGS = {
    "utf-16-le": codecs.BOM_UTF16_LE,
    "utf-32-be": codecs.BOM_UTF32_BE,
}


def marked(text: str, encoding: str) -> bytes:
    """`text` in `encoding`, after its byte order mark."""
    return MARKED_ENCODINGS[encoding] + text.encode(encoding)


async def run_cli(*argv: str, stdin: bytes = b"") -> tuple[int, str, str]:
    """The real `llm-gateway ARGV` command line, `stdin` its standard input: its exit
    status, stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway_client.cli", *argv,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(60):
        out, err = await process.communicate(stdin)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.mark.parametrize("encoding", list(MARKED_ENCODINGS))
@pytest.mark.parametrize("from_stdin", [False, True], ids=["file", "stdin"])
async def test_a_batch_input_in_utf16_or_utf32_with_its_byte_order_mark_runs_every_line(
    tmp_path, scripted, address, encoding, from_stdin
):
    """A batch input saved as UTF-16 (Windows "Unicode", PowerShell 5's `>`) or UTF-32,
    with the byte order mark such a file opens with, is read in that encoding, from a file
    or standard input. Before, read as UTF-8, every line was skipped as "not JSON"."""
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_items(source, ["a", "b"])
    source.write_bytes(marked(source.read_text(), encoding))
    argv = ("batch", "-" if from_stdin else str(source), "-o", str(output), "--no-progress")
    stdin = source.read_bytes() if from_stdin else b""
    code, _, err = await run_cli(*argv, "--address", address, "--model", FAKE_MODEL, stdin=stdin)
    assert "skipped" not in err
    assert code == 0, err
    assert sorted(r["id"] for r in output_records(output)) == ["a", "b"]
    assert sorted(asked_ids(scripted)) == ["a", "b"]


@pytest.mark.parametrize("encoding", list(MARKED_ENCODINGS))
@pytest.mark.parametrize("command", ["complete", "summarize", "summarize-file"])
async def test_a_prompt_or_document_in_utf16_or_utf32_with_its_byte_order_mark_is_its_text(
    tmp_path, scripted, address, encoding, command
):
    """`complete -` and `summarize` (a file, or `-`) read text saved as UTF-16 or UTF-32
    with its byte order mark in that encoding, and send the text alone. Before, read as
    UTF-8, its NUL bytes were refused as control characters: "must not contain control
    characters", as though the text itself were at fault."""
    text = "The report begins here. It goes on ok."
    document = tmp_path / "doc.txt"
    document.write_bytes(marked(text, encoding))
    name = command.removesuffix("-file")
    given = str(document) if command == "summarize-file" else "-"
    stdin = b"" if command == "summarize-file" else document.read_bytes()
    code, out, err = await run_cli(
        name, given, "--address", address, "--model", FAKE_MODEL, stdin=stdin
    )
    assert code == 0, err
    assert out.splitlines()[0] == "answer ok."
    sent = user_text(scripted.requests[0].body)
    assert text in sent
    assert "\ufeff" not in sent


async def test_a_line_too_large_for_any_call_is_skipped_and_the_rest_still_run(
    tmp_path, scripted, address, capsys
):
    """An item larger than one call may carry (past gRPC's 4 MiB message limit) is an
    unusable line: reported, and the items after it still run. Sent alone it would fail
    its whole call, stopping the run there on every resume."""
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [
        {"id": "a", "prompt": "ok a"},
        {"id": "big", "prompt": "ok " + "x" * (batch.MAX_CALL_BYTES + 1024 * 1024)},
        {"id": "c", "prompt": "ok c"},
    ]
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    argv = ("batch", str(source), "-o", str(output), "--address", address, "--no-progress")
    code = await batch.batch_command(parse(batch, *argv, "--model", FAKE_MODEL))
    err = capsys.readouterr().err
    assert code == 1  # a line was unusable
    assert "in.jsonl:2: skipped: too large for one call" in err
    assert sorted(r["id"] for r in output_records(output)) == ["a", "c"]
    assert sorted(asked_ids(scripted)) == ["a", "c"]


async def test_failures_are_recorded_and_retried_only_when_asked(
    tmp_path, scripted, address, capsys
):
    """Failed items are written as errors, skipped on resume (which still exits 1: the
    output holds an error), and rerun with --retry-failed."""
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text(
        json.dumps({"id": "good", "prompt": "ok good"})
        + "\n"
        + json.dumps({"id": "flaky", "prompt": "fail flaky"})
        + "\n"
    )
    argv = ("batch", str(source), "-o", str(output), "--address", address, "--no-progress")
    argv += ("--model", FAKE_MODEL)
    assert await batch.batch_command(parse(batch, *argv)) == 1
    errors = [r for r in output_records(output) if "error" in r]
    assert [(r["id"], r["error"]["code"]) for r in errors] == [("flaky", "UNAVAILABLE")]
    asked = len(scripted.requests)
    capsys.readouterr()
    assert await batch.batch_command(parse(batch, *argv)) == 1  # nothing to do, one error
    assert "1 items failed in an earlier run" in capsys.readouterr().err
    assert len(scripted.requests) == asked
    source.write_text(source.read_text().replace("fail flaky", "ok flaky"))
    assert await batch.batch_command(parse(batch, *argv, "--retry-failed")) == 0
    records = output_records(output)
    assert sorted(r["id"] for r in records) == ["flaky", "good"]
    assert all("error" not in r for r in records)
    assert asked_ids(scripted)[asked:] == ["flaky"]


async def test_retry_failed_on_a_symlinked_output_rewrites_the_file_it_links_to(
    tmp_path, scripted, address
):
    """`--retry-failed` through a symlink rewrites the file it points to, and the rerun's
    results land there. Before, the symlink was replaced by a new file: the linked output
    kept its error lines and the rerun's answers went to the new file beside it."""
    source, results = tmp_path / "in.jsonl", tmp_path / "results"
    results.mkdir()
    target, link = results / "out.jsonl", tmp_path / "out.jsonl"
    link.symlink_to(target)
    source.write_text(json.dumps({"id": "flaky", "prompt": "fail flaky"}) + "\n")
    argv = ("batch", str(source), "-o", str(link), "--address", address, "--no-progress")
    argv += ("--model", FAKE_MODEL)
    assert await batch.batch_command(parse(batch, *argv)) == 1
    source.write_text(source.read_text().replace("fail flaky", "ok flaky"))
    assert await batch.batch_command(parse(batch, *argv, "--retry-failed")) == 0
    assert link.is_symlink()
    assert [(r["id"], r.get("content")) for r in output_records(target)] == [
        ("flaky", "answer flaky")
    ]


async def test_retry_failed_keeps_a_private_outputs_permissions(tmp_path, scripted, address):
    """`--retry-failed` rewrites the output with its own permission bits. Before, the
    rewritten file took the umask's: a results file made private (0600) became readable
    by every user of the machine (0644)."""
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text(json.dumps({"id": "flaky", "prompt": "fail flaky"}) + "\n")
    output.touch(mode=0o600)
    output.chmod(0o600)  # whatever the umask
    argv = ("batch", str(source), "-o", str(output), "--address", address, "--no-progress")
    argv += ("--model", FAKE_MODEL)
    assert await batch.batch_command(parse(batch, *argv)) == 1
    source.write_text(source.read_text().replace("fail flaky", "ok flaky"))
    previous = os.umask(0o022)
    try:
        assert await batch.batch_command(parse(batch, *argv, "--retry-failed")) == 0
    finally:
        os.umask(previous)
    assert [(r["id"], r.get("content")) for r in output_records(output)] == [
        ("flaky", "answer flaky")
    ]
    assert output.stat().st_mode & 0o777 == 0o600


async def test_summarize_command_prints_summary_and_stats(tmp_path, scripted, address, capsys):
    """`summarize FILE` prints the summary on stdout and chunks and cost on stderr."""
    document = tmp_path / "doc.txt"
    document.write_text("\n\n".join(f"Paragraph {i} says something." * 40 for i in range(40)))
    code = await summarize.summarize_command(
        parse(summarize, "summarize", str(document), "--model", FAKE_MODEL, "--address", address)
    )
    captured = capsys.readouterr()
    assert code == 0
    assert captured.out.strip() == "FINAL"
    assert "chunks=" in captured.err
    assert "levels=1" in captured.err


async def test_summarize_command_warns_when_the_summary_was_cut_off(
    tmp_path, scripted, address, capsys
):
    """A summary cut off by its length limit is printed and exits 0, as the gateway
    answered it OK, with a one-line warning on stderr saying what to raise. Before,
    nothing told a summary ending mid-sentence from a whole one."""
    scripted.respond = lambda body: Reply(
        content="The report says that the", finish_reason="length"
    )
    document = tmp_path / "doc.txt"
    document.write_text("A short report. It says little.")
    code = await summarize.summarize_command(
        parse(summarize, "summarize", str(document), "--model", FAKE_MODEL, "--address", address)
    )
    captured = capsys.readouterr()
    assert code == 0
    assert captured.out == "The report says that the\n"
    assert [line for line in captured.err.splitlines() if "warning" in line] == [
        "llm-gateway summarize: warning: the summary was cut off by its length limit "
        "(finish LENGTH); raise --target-tokens for a whole summary"
    ]


@pytest.mark.parametrize(
    ("finish_reason", "parts_cut", "warning"),
    [
        (pb.FINISH_REASON_STOP, 0, None),
        (
            pb.FINISH_REASON_STOP,
            1,
            "1 part summary was cut off by the length limit before combining; "
            "raise --target-tokens for a whole summary",
        ),
        (
            pb.FINISH_REASON_LENGTH,
            2,
            "the summary was cut off by its length limit (finish LENGTH), and 2 part "
            "summaries were cut off before combining; raise --target-tokens for a whole summary",
        ),
    ],
    ids=["nothing", "a-part", "the-summary-and-parts"],
)
def test_summarize_warns_of_each_cut(finish_reason, parts_cut, warning):
    """The warning names the summary cut off, the parts cut off before combining, or
    both; none for a summary nothing cut."""
    response = pb.SummarizeResponse(finish_reason=finish_reason, parts_cut=parts_cut)
    assert summarize.cut_warning(response) == warning


@pytest.mark.parametrize("from_stdin", [False, True], ids=["file", "stdin"])
async def test_summarize_leaves_a_byte_order_mark_out_of_the_document(
    tmp_path, scripted, address, monkeypatch, from_stdin
):
    """A document a Windows editor saved with a byte order mark is summarised without it,
    as `batch` reads its input. Before, U+FEFF went upstream as the document's first
    character."""
    data = "\ufeffThe report begins here. It goes on.".encode()
    document = tmp_path / "doc.txt"
    document.write_bytes(data)
    if from_stdin:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))
    argv = ("summarize", "-" if from_stdin else str(document), "--model", FAKE_MODEL)
    code = await summarize.summarize_command(parse(summarize, *argv, "--address", address))
    assert code == 0
    sent = user_text(scripted.requests[0].body)
    assert "The report begins here." in sent
    assert "\ufeff" not in sent


@pytest.mark.parametrize("from_stdin", [False, True], ids=["file", "stdin"])
async def test_summarize_reads_windows_line_ends_as_newlines(
    tmp_path, scripted, address, monkeypatch, from_stdin
):
    """A document with CRLF line ends is sent with `\\n` ones whether it is named as a file
    or piped in, so the same text is the same request (one cache key). Before, standard
    input kept each `\\r`, where a file was read with universal newlines."""
    data = b"The report begins here.\r\nIt goes on.\r\n"
    document = tmp_path / "doc.txt"
    document.write_bytes(data)
    if from_stdin:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))
    argv = ("summarize", "-" if from_stdin else str(document), "--model", FAKE_MODEL)
    code = await summarize.summarize_command(parse(summarize, *argv, "--address", address))
    assert code == 0
    sent = user_text(scripted.requests[0].body)
    assert "The report begins here.\nIt goes on." in sent
    assert "\r" not in sent


@pytest.mark.parametrize("errors", ["strict", "surrogateescape"])
async def test_summarize_reads_a_document_that_is_not_utf8_from_stdin(
    scripted, address, capsys, monkeypatch, errors
):
    """`summarize -` takes standard input as `summarize FILE` takes a file: bytes that are
    not UTF-8 become U+FFFD. Before, it ended with a UnicodeDecodeError traceback (or, in
    the C locale, a UnicodeEncodeError building the request)."""
    data = b"Caf\xe9 ol\xe9. The document goes on."
    stdin = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors=errors)
    monkeypatch.setattr(sys, "stdin", stdin)
    code = await summarize.summarize_command(
        parse(summarize, "summarize", "-", "--model", FAKE_MODEL, "--address", address)
    )
    assert code == 0
    assert capsys.readouterr().out.strip() == "answer on."
    assert "Caf\ufffd ol\ufffd" in user_text(scripted.requests[0].body)


async def test_check_reports_every_upstream(tmp_path, monkeypatch, capsys, refused_port):
    """`check` shows valid, rejected, unreachable and skipped upstreams, and fails on any."""
    async with FakeUpstream(models=(FAKE_MODEL, "other"), api_key="sk-right") as fake:
        config = tmp_path / "gateway.yaml"
        config.write_text(
            f"""
upstreams:
  - {{name: good, base_url: "{fake.base_url}", api_key_env: GOOD_KEY, models: [{FAKE_MODEL}]}}
  - {{name: badkey, base_url: "{fake.base_url}", api_key_env: BAD_KEY, models: [missing-model]}}
  - {{name: down, base_url: "http://127.0.0.1:{refused_port}/v1", models: [{FAKE_MODEL}]}}
  - {{name: unset, base_url: "{fake.base_url}", api_key_env: UNSET_KEY, models: [x]}}
"""
        )
        monkeypatch.setenv("GOOD_KEY", "sk-right")
        monkeypatch.setenv("BAD_KEY", "sk-wrong")
        monkeypatch.delenv("UNSET_KEY", raising=False)
        code = await check.check_command(parse(check, "check", "--config", str(config)))
    out = capsys.readouterr().out
    assert code == 1
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert rows["good"][1:4] == ["yes", "valid", "2"]
    assert rows["good"][4].endswith("ms")
    assert rows["badkey"][1:3] == ["yes", "invalid"]
    assert rows["down"][1] == "no"
    assert rows["unset"][1:3] == ["skipped", "not"]
    assert "sk-right" not in out
    assert "sk-wrong" not in out


async def test_check_never_prints_a_key_pasted_as_its_variable_name(tmp_path, capsys):
    """A provider key written as `api_key_env` (not the variable's name) is a config error
    that `check` reports without printing the key.

    Before, `check` listed the upstream as skipped, `not set ($sk-...)`: the key on stdout.
    """
    pasted = "sk-proj-PASTEDKEY-4d9a7c1e3b5f"
    config = tmp_path / "gateway.yaml"
    config.write_text(
        f"""
upstreams:
  - {{name: pasted, base_url: "https://api.example.test/v1", api_key_env: {pasted}, models: [m]}}
local_model: {{enabled: never}}
"""
    )
    code = await check.check_command(parse(check, "check", "--config", str(config)))
    captured = capsys.readouterr()
    assert code == 2
    assert "upstreams[0]: api_key_env must name an environment variable" in captured.err
    assert "PASTEDKEY" not in captured.out + captured.err


# A key that is a valid variable name all the same (Stripe's `sk_live_...`).
KEY_LIKE_NAME = register_secret("sk_live_51HPASTEDKEYasITSvariable4d9a7c1e")


@pytest.mark.parametrize(
    ("upstreams", "environ", "refusal"),
    [
        pytest.param(
            f"api_key_env: {KEY_LIKE_NAME}",
            {},
            "upstreams[0]: api_key_env must name an environment variable",
            id="api_key_env",
        ),
        pytest.param(
            "api_key_env: GW_CHECK_KEY",
            {
                "GW_CHECK_KEY": "k",
                "LLM_GATEWAY__LEDGER": "{redis_url: 'redis://127.0.0.1:1/0', "
                f"redis_password_env: {KEY_LIKE_NAME}}}",
            },
            "ledger.redis_password_env: must name an environment variable",
            id="redis_password_env-of-a-section-set-whole",
        ),
    ],
)
async def test_check_never_prints_a_key_that_is_a_valid_variable_name(
    tmp_path, monkeypatch, capsys, *, upstreams, environ, refusal
):
    """A key pasted as a variable's name that is a valid name all the same (16 or more
    letters and digits in a row, mixed) is a config error that `check` reports without a
    word of the key, from the file or from a section the environment sets whole.

    Before, `check` listed the upstream as skipped, `not set ($sk_live_...)`, or said the
    password variable `sk_live_...` was not set: the key on stdout or stderr.
    """
    config = tmp_path / "gateway.yaml"
    config.write_text(
        f"""
upstreams:
  - {{name: pasted, base_url: "https://api.example.test/v1", {upstreams}, models: [m]}}
local_model: {{enabled: never}}
"""
    )
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    code = await check.check_command(parse(check, "check", "--config", str(config)))
    captured = capsys.readouterr()
    record_emitted(captured.out, captured.err)
    assert code == 2
    assert refusal in captured.err
    assert "PASTEDKEY" not in captured.out + captured.err


async def _check_one_upstream_keyed(tmp_path, monkeypatch, key: str) -> tuple[int, int]:
    """`check`'s exit code for one upstream (which takes `sk-right`) keyed with `key`, and
    how many requests the upstream got."""
    async with FakeUpstream(models=(FAKE_MODEL,), api_key="sk-right") as fake:
        config = tmp_path / "gateway.yaml"
        config.write_text(
            f"""
upstreams:
  - {{name: good, base_url: "{fake.base_url}", api_key_env: GOOD_KEY, models: [{FAKE_MODEL}]}}
"""
        )
        monkeypatch.setenv("GOOD_KEY", key)
        code = await check.check_command(parse(check, "check", "--config", str(config)))
        return code, len(fake.requests)


async def test_check_refuses_a_key_with_a_trailing_newline(tmp_path, monkeypatch, capsys):
    """A provider key read with its file's trailing newline is a config error (exit 2)
    naming its variable, never printing the key. Before, `check` crashed with a
    traceback, and `serve` started and failed every call INTERNAL."""
    code, requests = await _check_one_upstream_keyed(tmp_path, monkeypatch, "sk-right\n")
    captured = capsys.readouterr()
    assert code == 2
    assert "upstreams[0].api_key_env: the environment variable GOOD_KEY holds a line break" in (
        captured.err
    )
    assert "sk-right" not in captured.out + captured.err
    assert requests == 0


async def test_check_refuses_a_key_with_a_control_character(tmp_path, monkeypatch, capsys):
    """A provider key holding a control character (a terminal's escape pasted with it) is
    a config error (exit 2) naming its variable, never printing the key. Before, it was
    sent as it was: the upstream refused every call with 400, which `serve`'s callers got
    as INVALID_ARGUMENT (UPSTREAM_REJECTED_REQUEST), as if their request were at fault."""
    code, requests = await _check_one_upstream_keyed(tmp_path, monkeypatch, "sk-right\x7f")
    captured = capsys.readouterr()
    assert code == 2
    assert "upstreams[0].api_key_env: the environment variable GOOD_KEY holds a control" in (
        captured.err
    )
    assert "sk-right" not in captured.out + captured.err
    assert requests == 0


@pytest.mark.parametrize(
    ("environment", "said"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER: unknown exporter 'zipkin'"),
        (
            {"OTEL_METRICS_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
            "OTEL_EXPORTER_OTLP_PROTOCOL: OTLP protocol 'http/json' is not one of",
        ),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "abc"},
            "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT: OTLP timeout 'abc' is not a number of seconds",
        ),
        (
            {"OTEL_METRICS_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_COMPRESSION": "zstd"},
            "OTEL_EXPORTER_OTLP_COMPRESSION: OTLP compression 'zstd' is not one of",
        ),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "4096"},
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE: a span export batch of 4096",
        ),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SPAN_LINK_COUNT_LIMIT": "lots"},
            "OTEL_SPAN_LINK_COUNT_LIMIT: 'lots' is not a whole number from 0",
        ),
    ],
)
async def test_check_refuses_the_telemetry_environment_serve_would(
    tmp_path, monkeypatch, capsys, environment, said
):
    """An OTEL_* exporter or protocol `serve` refuses at start (exit 2) is a config error
    for `check` too. Before, `check` said the config was ok."""
    config = tmp_path / "gateway.yaml"
    config.write_text("local_model: {enabled: never}\n")
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    code = await check.check_command(parse(check, "check", "--config", str(config)))
    captured = capsys.readouterr()
    assert code == 2
    assert f"config error: environment: {said}" in captured.err
    assert "ok" not in captured.out


@pytest.mark.parametrize(
    ("setting", "environment"),
    [
        ("telemetry: {enabled: false}\n", {}),
        ("", {"OTEL_SDK_DISABLED": "true"}),
    ],
)
async def test_check_passes_an_unknown_exporter_when_telemetry_is_off(
    tmp_path, monkeypatch, capsys, setting, environment
):
    """With telemetry off (the config's `telemetry.enabled: false`, or OTEL_SDK_DISABLED),
    `serve` reads no OTEL_* exporter and starts: `check` must not call one a config error.
    Before, it exited 2 for a deployment that serves."""
    async with FakeUpstream(models=(FAKE_MODEL,)) as fake:
        config = tmp_path / "gateway.yaml"
        config.write_text(
            f"""{setting}
upstreams:
  - {{name: good, base_url: "{fake.base_url}", models: [{FAKE_MODEL}]}}
local_model: {{enabled: never}}
"""
        )
        monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
        for name, value in environment.items():
            monkeypatch.setenv(name, value)
        code = await check.check_command(parse(check, "check", "--config", str(config)))
    captured = capsys.readouterr()
    assert "config error" not in captured.err
    assert code == 0
    assert "good" in captured.out


async def test_check_refuses_a_certificate_grpc_cannot_serve(tmp_path, capsys):
    """A certificate and key Python loads but grpc's TLS cannot use (secp256k1) is the
    config error `serve` exits 2 with, for `check` too."""
    from tests.integration.pki import _openssl

    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:secp256k1",
             "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
             "-keyout", "k1.key", "-out", "k1.pem", cwd=tmp_path)  # fmt: skip
    config = tmp_path / "gateway.yaml"
    config.write_text(
        f"server: {{tls: {{cert_file: {tmp_path / 'k1.pem'}, key_file: {tmp_path / 'k1.key'}}}}}\n"
        "local_model: {enabled: never}\n"
    )
    code = await check.check_command(parse(check, "check", "--config", str(config)))
    assert code == 2
    assert "server.tls.cert_file: grpc cannot serve TLS" in capsys.readouterr().err


async def test_check_passes_when_all_upstreams_answer(tmp_path, monkeypatch, capsys):
    """`check` exits 0 when every enabled upstream is reachable with a valid key."""
    code, _ = await _check_one_upstream_keyed(tmp_path, monkeypatch, "sk-right")
    assert code == 0
    assert "good" in capsys.readouterr().out


async def test_check_warns_of_a_listen_port_another_process_holds(tmp_path, capsys):
    """A port something listens on now is named on stderr, where `serve` would exit 1,
    and the exit status stays 0: `check` may run beside the gateway it checks. A free
    port gets no warning."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = f"127.0.0.1:{holder.getsockname()[1]}"
        async with FakeUpstream(models=(FAKE_MODEL,)) as fake:
            config = tmp_path / "gateway.yaml"
            body = f"""
upstreams:
  - {{name: good, base_url: "{fake.base_url}", models: [{FAKE_MODEL}]}}
"""
            config.write_text(f"server: {{listen: '{taken}'}}\n{body}")
            code = await check.check_command(parse(check, "check", "--config", str(config)))
            warned = capsys.readouterr().err
            config.write_text(f"server: {{listen: '127.0.0.1:0'}}\n{body}")
            code_free = await check.check_command(parse(check, "check", "--config", str(config)))
            warned_free = capsys.readouterr().err
    assert code == code_free == 0
    assert f"warning: server.listen {taken} is in use now: serve would exit 1" in warned
    assert "in use" not in warned_free


async def test_check_reports_an_upstream_listing_its_models_as_null(tmp_path, capsys):
    """A model list of `"data": null` (a Go server's empty list) is a row listing no model,
    not a crash of the whole check.

    Before, iterating the null raised TypeError out of `check`: a traceback, and no row
    for any upstream.
    """
    async with FakeUpstream() as fake, FakeUpstream() as other:
        fake.models = None
        config = tmp_path / "gateway.yaml"
        config.write_text(
            f"""
upstreams:
  - {{name: gonull, base_url: "{fake.base_url}", models: [{FAKE_MODEL}]}}
  - {{name: fine, base_url: "{other.base_url}", models: [{FAKE_MODEL}]}}
"""
        )
        code = await check.check_command(parse(check, "check", "--config", str(config)))
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert rows["gonull"][1:4] == ["yes", "none", "needed"]
    assert f"(not listed: {FAKE_MODEL})" in out
    assert rows["fine"][1:5] == ["yes", "none", "needed", "1"]
    assert code == 0


@pytest.mark.parametrize(
    ("status", "code", "shown"),
    [
        (404, 0, ["yes", "unknown", "no", "list", "(HTTP", "404)"]),
        (405, 0, ["yes", "unknown", "no", "list", "(HTTP", "405)"]),
        (402, 1, ["yes", "unknown", "-"]),
        (500, 1, ["yes", "unknown", "-"]),
    ],
)
async def test_check_passes_a_server_without_a_model_list_and_fails_an_account_out_of_credit(
    tmp_path, capsys, status, code, shown
):
    """A server with no `/models` (404, 405) answered: `check` passes it, its key unknown,
    as the README says (exit 1 only for an upstream unreachable, refusing its key or
    account, or failing). A 402 (out of credit) or a 500 fails the check.

    Before, any status but 200 failed the check, a server without the list included."""
    async with FakeUpstream() as fake:
        fake.models_status = status
        config = tmp_path / "gateway.yaml"
        config.write_text(
            f'upstreams:\n  - {{name: up, base_url: "{fake.base_url}", models: [{FAKE_MODEL}]}}\n'
        )
        result = await check.check_command(parse(check, "check", "--config", str(config)))
    out = capsys.readouterr().out
    row = next(line.split() for line in out.splitlines() if line.startswith("up "))
    assert row[1 : 1 + len(shown)] == shown
    assert result == code
    if status == 402:
        assert "account out of credit (HTTP 402)" in out


async def test_check_stops_reading_a_model_list_past_the_answer_limit(tmp_path, capsys):
    """A `/models` answer that does not end is read up to the 16 MiB any answer may take,
    and reported as malformed.

    Before, `check` held all of it until its timeout: 4.9 GB in 8 seconds on loopback,
    then said the upstream timed out."""
    piece = b"x" * (1024 * 1024)
    chunk = b"%x\r\n%s\r\n" % (len(piece), piece)

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(20):  # past the limit, then held open (no end) until the reader goes
            writer.write(chunk)
            await writer.drain()
        await reader.read()
        writer.close()

    server = await asyncio.start_server(endless, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = tmp_path / "gateway.yaml"
    config.write_text(
        f'upstreams:\n  - {{name: up, base_url: "http://127.0.0.1:{port}/v1", '
        f"models: [{FAKE_MODEL}]}}\n"
    )
    async with server:
        code = await check.check_command(
            parse(check, "check", "--config", str(config), "--timeout", "10")
        )
    assert code == 1
    assert f"malformed answer: the answer is larger than {16 * 1024 * 1024} bytes" in (
        capsys.readouterr().out
    )


async def test_check_says_what_failed_below_http(tmp_path, capsys):
    """An upstream whose certificate is not trusted, whose name does not resolve or which
    does not speak HTTP/1.1 is a failed check that says which.

    Before, the first two read "refused or could not be reached", as a refused port does,
    and the last "dropped the connection": nothing to tell an operator what to mend."""
    pki = make_pki(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.server_cert, pki.server_key)

    async def not_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"\x00\x00\x12\x04\x00\x00\x00\x00\x00")  # an HTTP/2 SETTINGS frame
        await writer.drain()
        writer.close()

    tls = await asyncio.start_server(not_http, "127.0.0.1", 0, ssl=context)
    plain = await asyncio.start_server(not_http, "127.0.0.1", 0)
    config = tmp_path / "gateway.yaml"
    config.write_text(
        "upstreams:\n"
        f'  - {{name: untrusted, base_url: "https://127.0.0.1:{tls.sockets[0].getsockname()[1]}"'
        f", models: [{FAKE_MODEL}]}}\n"
        f'  - {{name: unnamed, base_url: "http://no-such-host.invalid", models: [{FAKE_MODEL}]}}\n'
        f'  - {{name: h2, base_url: "http://127.0.0.1:{plain.sockets[0].getsockname()[1]}"'
        f", models: [{FAKE_MODEL}]}}\n"
    )
    async with tls, plain:
        code = await check.check_command(parse(check, "check", "--config", str(config)))
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert code == 1
    assert "certificate verify failed" in rows["untrusted"]
    assert "cannot connect: [Errno" in rows["unnamed"]  # the resolver's words vary by libc
    assert "malformed HTTP response" in rows["h2"]


@pytest.mark.parametrize(
    ("text", "served"),
    [
        ("summarize: {concurrency: 2}\n", True),
        ("local_model: {enabled: never}\n", False),
    ],
)
async def test_check_says_the_local_model_is_served_when_no_upstream_is_configured(
    tmp_path, capsys, text, served
):
    """A config without upstreams (as README's summarize example alone) serves the local
    model: `check` says so, as it does when the upstreams' keys are unset. Before, it said
    only "no upstreams configured", as if `serve` would have nothing to call."""
    if served and missing_install(LocalModelConfig()) is not None:
        pytest.skip("the local model is not installed here: check exits 1 saying so")
    config = tmp_path / "gateway.yaml"
    config.write_text(text)
    code = await check.check_command(parse(check, "check", "--config", str(config)))
    captured = capsys.readouterr()
    assert code == 0
    assert ("the gateway will serve the local model" in captured.out) is served
    assert "no upstreams configured" in captured.out
    assert ("warning: no upstream serves any model" in captured.err) is not served


async def test_check_warns_of_a_config_whose_every_upstream_lacks_its_key_and_no_local_model(
    tmp_path, monkeypatch, capsys
):
    """Every upstream skipped (its key variable unset) and the local model off: `serve`
    would start and answer every call NOT_FOUND, so `check` warns as `serve` does, saying
    what mends it. Before, it said nothing under a table of skipped rows."""
    monkeypatch.delenv("NOT_SET_KEY", raising=False)
    config = tmp_path / "gateway.yaml"
    config.write_text(
        "local_model: {enabled: never}\n"
        "upstreams:\n"
        "  - {name: keyless, base_url: 'https://api.example.com/v1', "
        f"api_key_env: NOT_SET_KEY, models: [{FAKE_MODEL}]}}\n"
    )
    code = await check.check_command(parse(check, "check", "--config", str(config)))
    captured = capsys.readouterr()
    assert code == 0
    assert "skipped" in captured.out
    assert (
        "warning: no upstream serves any model: set an upstream's api_key_env variable"
        in captured.err
    )


async def test_check_config_error_exits_2(tmp_path, capsys):
    """A broken config is reported with its key and exits 2, before any probe."""
    config = tmp_path / "gateway.yaml"
    config.write_text("upstreams:\n  - {name: x, base_url: ftp://nope, models: [m]}\n")
    code = await check.check_command(parse(check, "check", "--config", str(config)))
    assert code == 2
    assert "base_url" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "named"),
    [
        pytest.param(
            "server: {listen: '0.0.0.0:50051'}\n",
            "server.listen: refusing to listen on 0.0.0.0:50051 with auth.mode: off",
            id="auth-off-on-a-public-address",
        ),
        pytest.param(
            "auth: {mode: keys, keys_file: KEYS}\n",
            "auth.keys_file: ",
            id="malformed-keys-file",
        ),
        pytest.param(
            "server: {listen: '127.0.0.1:50051', health_listen: 'localhost:50051'}\n",
            "server: health_listen localhost:50051 and listen 127.0.0.1:50051 would listen "
            "on the same port",
            id="health-listen-at-the-gateways-address",
        ),
    ],
)
async def test_check_exits_2_on_a_config_error_serve_finds_at_start(tmp_path, capsys, text, named):
    """What `serve` refuses as a config error (exit 2) at start, `check` refuses too,
    rather than saying "ok" about a config the gateway will not start with.

    Before, `check` printed the config as ok and exited 0 for both.
    """
    keys = tmp_path / "keys"
    keys.write_text("not-a-digest search\n")
    config = tmp_path / "gateway.yaml"
    config.write_text(text.replace("KEYS", str(keys)) + "local_model: {enabled: never}\n")
    code = await check.check_command(parse(check, "check", "--config", str(config)))
    captured = capsys.readouterr()
    assert code == 2
    assert f"llm-gateway: config error: {config}: {named}" in captured.err
    assert ": ok" not in captured.out


@pytest.mark.parametrize("workers", ["-1", "100000"])
async def test_check_names_a_bad_workers_flag(tmp_path, capsys, workers):
    """`check --workers -1` is refused naming `--workers` alone, as `serve` refuses it;
    so is a count no machine has cores for (a typo `serve` would fork).

    Before, the error named `--listen/--workers`, a flag `check` does not have, and
    100000 was taken.
    """
    config = tmp_path / "gateway.yaml"
    config.write_text("local_model: {enabled: never}\n")
    args = parse(check, "check", "--config", str(config), "--workers", workers)
    assert await check.check_command(args) == 2
    err = capsys.readouterr().err
    problem = "workers must be 0..1024 (0: one per core)"
    assert err == f"llm-gateway: config error: command line: --workers: {problem}\n"


@pytest.mark.parametrize(("workers", "warned"), [("2", True), ("1", False)])
async def test_check_warns_of_workers_that_would_each_keep_the_ledger(
    tmp_path, capsys, workers, warned
):
    """`check --workers 2` with the usage ledger in memory says it is ok, exits 0, and
    warns on stderr as `serve --workers 2` does (`workers.state_per_worker`); one worker
    keeps nothing apart.

    Before, `check` said nothing of it.
    """
    config = tmp_path / "gateway.yaml"
    async with FakeUpstream(models=(FAKE_MODEL,)) as fake:
        config.write_text(
            "local_model: {enabled: never}\n"
            f"upstreams: [{{name: up, base_url: '{fake.base_url}', models: [{FAKE_MODEL}]}}]\n"
        )
        args = parse(check, "check", "--config", str(config), "--workers", workers)
        assert await check.check_command(args) == 0
    captured = capsys.readouterr()
    assert ": ok" in captured.out
    warning = (
        "warning: 2 workers keep state per worker: the usage ledger is in memory "
        "(set ledger.redis_url to share it)\n"
    )
    assert (warning in captured.err) is warned, captured.err


@pytest.mark.parametrize(
    ("auth", "warning"),
    [
        (
            f"auth: {{mode: keys, keys: [{{sha256: '{'ab' * 32}', tenant: search}}]}}\n",
            "warning: server.listen 0.0.0.0:0 takes caller keys without server.tls: they "
            "cross the network in clear text unless a proxy or mesh in front terminates "
            "TLS (security.keys_without_tls)\n",
        ),
        (
            "auth: {mode: off, allow_auth_off_on_public_listen: true}\n",
            "warning: server.listen 0.0.0.0:0 serves every caller with no key (auth.mode: "
            "off, forced): anyone who reaches the port is served "
            "(security.auth_off_on_public_listen)\n",
        ),
    ],
    ids=["keys_without_tls", "auth_off_forced"],
)
async def test_check_warns_of_a_public_listen_in_words(tmp_path, capsys, caplog, auth, warning):
    """`check` of a config `serve` would warn of its listen address (caller keys on
    `0.0.0.0` without `server.tls`, auth off forced there) says it is ok, exits 0 and
    warns on stderr in words, as it warns of workers that keep state apart.

    Before, the listen policy it shares with `serve` logged the event through logging,
    which `check` does not set up: Python's last-resort handler printed the bare event
    name (`security.keys_without_tls`) on stderr, without the address or what it means.
    """
    config = tmp_path / "gateway.yaml"
    async with FakeUpstream(models=(FAKE_MODEL,)) as fake:
        config.write_text(
            "server: {listen: '0.0.0.0:0'}\n" + auth + "local_model: {enabled: never}\n"
            f"upstreams: [{{name: up, base_url: '{fake.base_url}', models: [{FAKE_MODEL}]}}]\n"
        )
        args = parse(check, "check", "--config", str(config), "--workers", "1")
        assert await check.check_command(args) == 0
    captured = capsys.readouterr()
    assert ": ok" in captured.out
    assert warning in captured.err, captured.err
    assert [r for r in caplog.records if r.name == "llm_gateway.security"] == []


@pytest.mark.parametrize("workers", ["flag", "config"])
async def test_check_refuses_worker_metrics_ports_past_65535_as_serve_does(
    tmp_path, capsys, workers
):
    """`serve --workers 2` with `telemetry.prometheus_port: 65535` exits 2 at start (the
    second worker's port would be 65536): `check`, given the same count by the flag or
    by `server.workers`, exits 2 with the same line.

    Before, `check` printed the config as ok and exited 0.
    """
    config = tmp_path / "gateway.yaml"
    server = "" if workers == "flag" else "server: {workers: 2}\n"
    config.write_text(
        server + "telemetry: {prometheus_port: 65535}\nlocal_model: {enabled: never}\n"
    )
    flag = ["--workers", "2"] if workers == "flag" else []
    serve = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service", "serve", "--config", str(config), *flag,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, serve_err = await asyncio.wait_for(serve.communicate(), timeout=60)
    refusal = f"llm-gateway: config error: {config}: telemetry.prometheus_port: 2 workers"
    assert serve.returncode == 2
    assert refusal in serve_err.decode()
    code = await check.check_command(parse(check, "check", "--config", str(config), *flag))
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.strip() == serve_err.decode().strip().splitlines()[-1]
    assert ": ok" not in captured.out


@pytest.mark.parametrize(
    ("server", "metrics_port", "problem"),
    [
        pytest.param(
            "{listen: '127.0.0.1:PORT'}",
            "PORT",
            "the Prometheus endpoint would listen on 127.0.0.1:PORT, the port server.listen "
            "127.0.0.1:PORT listens on",
            id="listen",
        ),
        pytest.param(
            "{listen: '127.0.0.1:0', health_listen: 'localhost:PORT'}",
            "PORT",
            "the Prometheus endpoint would listen on 127.0.0.1:PORT, the port "
            "server.health_listen localhost:PORT listens on",
            id="health-listen",
        ),
        pytest.param(
            "{listen: '127.0.0.1:PORT', workers: 2}",
            "PREVIOUS",
            "worker 1's Prometheus endpoint (prometheus_port + 1) would listen on "
            "127.0.0.1:PORT, the port server.listen 127.0.0.1:PORT listens on",
            id="a-workers-port",
        ),
    ],
)
async def test_a_prometheus_port_on_the_gateways_own_port_is_a_config_error(  # noqa: PLR0917
    tmp_path, capsys, server, metrics_port, problem, refused_port
):
    """A Prometheus endpoint (a worker's too) on the port `server.listen` or
    `server.health_listen` listens on is a config error on `telemetry.prometheus_port`
    from `serve` (exit 2) and, in the same line, from `check`.

    Before, `check` said ok, and `serve` opened the endpoint first and then exited 1 with
    "cannot listen on 127.0.0.1:PORT: the address is taken or not local", the gateway
    having taken its own port.
    """
    port = refused_port  # held: no other test's server listens there meanwhile
    ports = {"PREVIOUS": str(port - 1), "PORT": str(port)}
    config = tmp_path / "gateway.yaml"
    config.write_text(
        f"server: {server.replace('PORT', str(port))}\nlocal_model: {{enabled: never}}\n"
        f"telemetry: {{prometheus_port: {ports[metrics_port]}}}\n"
    )
    serve = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service", "serve", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, serve_err = await asyncio.wait_for(serve.communicate(), timeout=60)
    refusal = (
        f"llm-gateway: config error: {config}: telemetry.prometheus_port: "
        f"{problem.replace('PORT', str(port))}: give it another port"
    )
    assert serve.returncode == 2
    assert serve_err.decode().strip().splitlines()[-1] == refusal
    code = await check.check_command(parse(check, "check", "--config", str(config)))
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.strip() == refusal
    assert ": ok" not in captured.out


@pytest.mark.parametrize(
    ("key", "host", "problem"),
    [
        (
            "server.listen",
            "127.1",
            "127.1 is IPv4 shorthand, which grpc and the C library read differently: "
            "write 127.0.0.1",
        ),
        ("server.health_listen", "no-such-host.invalid", "no name resolves 'no-such-host.invalid'"),
        ("telemetry.prometheus_host", "192.0.2.7", "192.0.2.7 is no address of this machine"),
    ],
)
async def test_check_refuses_a_listen_host_as_serve_does(tmp_path, capsys, key, host, problem):
    """A listen host the gateway cannot listen on (shorthand, unresolvable, another
    machine's): `serve` exits 2 naming the key, and `check` with the same line.

    Before, `check` resolved no listen host: it printed the config as ok and exited 0.
    """
    text = {
        "server.listen": f"server: {{listen: '{host}:0', allow_insecure_public_listen: true}}\n",
        "server.health_listen": f"server: {{listen: '127.0.0.1:0', health_listen: '{host}:0'}}\n",
        "telemetry.prometheus_host": (
            f"server: {{listen: '127.0.0.1:0'}}\n"
            f"telemetry: {{prometheus_port: 0, prometheus_host: '{host}'}}\n"
        ),
    }[key]
    config = tmp_path / "gateway.yaml"
    config.write_text(text + "local_model: {enabled: never}\n")
    serve = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service", "serve", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, serve_err = await asyncio.wait_for(serve.communicate(), timeout=60)
    assert serve.returncode == 2
    refusal = serve_err.decode().strip().splitlines()[-1]
    assert refusal.startswith(f"llm-gateway: config error: {config}: {key}: cannot listen on ")
    assert refusal.endswith(f": {problem}")
    code = await check.check_command(parse(check, "check", "--config", str(config)))
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.strip() == refusal
    assert ": ok" not in captured.out


async def _serve_and_check_refusal(config: Path, capsys) -> str:
    """The config error `serve` exits 2 with on `config`, after asserting that `check`
    exits 2 with the same line and says no "ok"."""
    serve = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service", "serve", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, serve_err = await asyncio.wait_for(serve.communicate(), timeout=60)
    refusal = serve_err.decode().strip().splitlines()[-1]
    assert serve.returncode == 2
    code = await check.check_command(parse(check, "check", "--config", str(config)))
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.strip() == refusal
    assert ": ok" not in captured.out
    return refusal


async def test_check_and_serve_refuse_an_empty_prometheus_host(tmp_path, capsys):
    """`telemetry.prometheus_host: ""` is a config error on load, from `serve` and `check`
    alike (exit 2).

    Before, `check` said ok, and `serve` exited 1 naming no key: the endpoint found no
    address for "" ("Name or service not known").
    """
    config = tmp_path / "gateway.yaml"
    config.write_text(
        "server: {listen: '127.0.0.1:0'}\nlocal_model: {enabled: never}\n"
        "telemetry: {prometheus_port: 0, prometheus_host: ''}\n"
    )
    assert await _serve_and_check_refusal(config, capsys) == (
        f"llm-gateway: config error: {config}: telemetry: prometheus_host must name a host: "
        "0.0.0.0 for every address, 127.0.0.1 for this machine alone"
    )


@pytest.mark.parametrize("key", ["listen", "health_listen"])
@pytest.mark.parametrize("host", ["[127.0.0.1]", "[localhost]", "[]"])
async def test_check_and_serve_refuse_brackets_around_no_ipv6_address(tmp_path, capsys, key, host):
    """A listen address whose brackets hold no IPv6 address (`[127.0.0.1]:0`) is a config
    error on load naming the key, from `serve` and `check` alike (exit 2).

    Before, `check` said ok, and `serve` exited 1 saying the address was taken or not
    local: grpc parses no such address.
    """
    server = {"listen": "127.0.0.1:0", key: f"{host}:0"}
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({"server": server, "local_model": {"enabled": "never"}}))
    assert await _serve_and_check_refusal(config, capsys) == (
        f"llm-gateway: config error: {config}: server: {key}'s brackets hold an IPv6 address "
        "alone, as in [::1]:50051; write another host without them, as in 127.0.0.1:50051"
    )


async def test_batch_process_killed_by_ctrl_c_resumes(tmp_path, scripted, address):
    """The real `llm-gateway batch` process, stopped with SIGINT, resumes to each id once."""
    ids = [f"q{i}" for i in range(40)]
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_items(source, ids)
    command = [sys.executable, "-m", "gateway_client.cli", "batch", str(source), "-o", str(output)]
    command += ["--concurrency", "2", "--address", address, "--model", FAKE_MODEL]
    # A run started with SIGINT ignored (nohup, `&` in a script) would pass that on to
    # the child, which then finishes instead of stopping: a handler is reset on exec.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        first = await asyncio.create_subprocess_exec(*command, stderr=asyncio.subprocess.DEVNULL)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        for _ in range(3000):
            if output.exists() and output.read_text().count("\n") >= 4:
                break
            await asyncio.sleep(0.01)
        first.send_signal(signal.SIGINT)
        async with asyncio.timeout(30):
            assert await first.wait() == -signal.SIGINT  # a shell's status 130
    finally:
        if first.returncode is None:
            first.kill()
    done_first = {r["id"] for r in output_records(output)}
    assert 4 <= len(done_first) < 40
    second = await asyncio.create_subprocess_exec(*command, stderr=asyncio.subprocess.DEVNULL)
    async with asyncio.timeout(60):
        assert await second.wait() == 0
    assert sorted(r["id"] for r in output_records(output)) == sorted(ids)


async def test_a_ctrl_c_stops_the_shell_script_running_the_command(tmp_path, scripted, address):
    """A Ctrl-C (SIGINT to the terminal's process group: the shell and the command) during
    a call ends the script too, as for any command SIGINT ends. Before, the command exited
    130, which a shell takes for a Ctrl-C the command handled: the script went on, in a
    loop to its next call, each paid for."""
    script = '"$0" -m gateway_client.cli complete "$@"; echo "the script went on: $?"'
    arguments = ["Say hi", "--model", FAKE_MODEL, "--address", address]
    scripted.gate.clear()  # the call stays in flight until the Ctrl-C
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal's
    try:
        shell = await asyncio.create_subprocess_exec(
            "bash", "-c", script, sys.executable, *arguments,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # its own process group, as a terminal's foreground job
        )  # fmt: skip
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        await scripted.wait_until(lambda: scripted.in_flight == 1)
        os.killpg(shell.pid, signal.SIGINT)
        out, err = await asyncio.wait_for(shell.communicate(), timeout=30)
    finally:
        if shell.returncode is None:
            os.killpg(shell.pid, signal.SIGKILL)
            await shell.wait()
    assert (shell.returncode, out.decode(), err.decode()) == (-signal.SIGINT, "", "")


async def test_a_second_batch_run_on_the_same_output_exits_1_and_calls_nothing(
    tmp_path, scripted, address
):
    """Two real `llm-gateway batch` processes on one output (a retried cron job while the
    first still runs): the second exits 1 at once naming the file, and each item is asked
    for once. Before, both ran the pending items: asked and billed twice, lines mixed."""
    ids = [f"q{i}" for i in range(3)]
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_items(source, ids)
    command = [sys.executable, "-m", "gateway_client.cli", "batch", str(source), "-o", str(output)]
    command += ["--concurrency", "1", "--address", address, "--model", FAKE_MODEL, "--no-progress"]
    scripted.gate.clear()  # the upstream holds every answer: the first run is still going
    first = await asyncio.create_subprocess_exec(*command, stderr=asyncio.subprocess.DEVNULL)
    try:
        await scripted.wait_until(lambda: scripted.in_flight == 1)
        second = await asyncio.create_subprocess_exec(*command, stderr=asyncio.subprocess.PIPE)
        async with asyncio.timeout(30):
            _, err = await second.communicate()
        assert second.returncode == 1
        assert err.decode().splitlines() == [
            f"llm-gateway batch: {output} is held by another batch run; nothing was run"
        ]
        assert len(scripted.requests) == 1
        scripted.gate.set()
        async with asyncio.timeout(30):
            assert await first.wait() == 0
    finally:
        scripted.gate.set()
        if first.returncode is None:
            first.kill()
            await first.wait()
    assert sorted(asked_ids(scripted)) == ids
    assert sorted(r["id"] for r in output_records(output)) == ids


async def test_two_batch_runs_to_dev_null_both_run(tmp_path, scripted, address):
    """Two unrelated `llm-gateway batch` processes with `-o /dev/null` (smoke tests, cache
    warmers) both run: an output that is no file is not locked. Before, the second exited 1
    "held by another batch run", as every run on the machine locked the one /dev/null."""
    source = tmp_path / "in.jsonl"
    write_items(source, ["q1"])
    command = [sys.executable, "-m", "gateway_client.cli", "batch", str(source), "-o", "/dev/null"]
    command += ["--address", address, "--model", FAKE_MODEL, "--no-progress"]
    scripted.gate.clear()  # the first run's call is held: it still runs when the second starts
    first = await asyncio.create_subprocess_exec(*command, stderr=asyncio.subprocess.DEVNULL)
    second = None
    try:
        await scripted.wait_until(lambda: scripted.in_flight == 1)
        second = await asyncio.create_subprocess_exec(*command, stderr=asyncio.subprocess.PIPE)
        second_asked = asyncio.ensure_future(scripted.wait_until(lambda: scripted.in_flight == 2))
        second_ended = asyncio.ensure_future(second.wait())
        await asyncio.wait([second_asked, second_ended], return_when=asyncio.FIRST_COMPLETED)
        second_asked.cancel()
        scripted.gate.set()
        async with asyncio.timeout(30):
            _, err = await second.communicate()
            assert second.returncode == 0, err.decode()
            assert await first.wait() == 0
    finally:
        scripted.gate.set()
        for process in (first, second):
            if process is not None and process.returncode is None:
                process.kill()
                await process.wait()
    assert asked_ids(scripted) == ["q1", "q1"]


async def test_batch_output_to_a_pipe_writes_each_result_there(tmp_path, scripted, address):
    """`-o /dev/stdout` piped into a reader gets each result as a JSON line, and the run
    ends; nothing there to resume from. Before, the run read the pipe for earlier results,
    waiting on its own writer: it hung before any call (and `-o /dev/zero` filled memory)."""
    ids = ["q1", "q2"]
    source = tmp_path / "in.jsonl"
    write_items(source, ids)
    command = [sys.executable, "-m", "gateway_client.cli", "batch", str(source)]
    command += ["-o", "/dev/stdout", "--address", address, "--model", FAKE_MODEL, "--no-progress"]
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(60):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, err.decode()
    records = [json.loads(line) for line in out.decode().splitlines()]
    assert sorted((r["id"], r["content"]) for r in records) == [
        ("q1", "answer q1"),
        ("q2", "answer q2"),
    ]
    assert sorted(asked_ids(scripted)) == ids


def batch_to_stdout(source, address, *options: str) -> list[str]:
    """The real `llm-gateway batch SOURCE -o -` command line, with `options`."""
    command = [sys.executable, "-m", "gateway_client.cli", "batch", str(source), "-o", "-"]
    return [*command, "--address", address, "--model", FAKE_MODEL, *options]


async def test_batch_output_dash_writes_the_results_to_stdout_and_all_else_to_stderr(
    tmp_path, scripted, address
):
    """`-o -` writes each result line to standard output and nothing else there: the
    progress bar and the summary go to stderr. Before, the results went to a file named
    `-` in the current directory, and standard output stayed empty."""
    source = tmp_path / "in.jsonl"
    write_items(source, ["q1", "q2"])
    process = await asyncio.create_subprocess_exec(
        *batch_to_stdout(source, address), cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    records = [json.loads(line) for line in out.decode().splitlines()]
    assert sorted((r["id"], r["content"]) for r in records) == [
        ("q1", "answer q1"),
        ("q2", "answer q2"),
    ]
    assert "done: 2 succeeded, 0 failed" in err.decode()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["in.jsonl"]


async def test_batch_output_dash_writes_each_result_as_it_completes(tmp_path, scripted, address):
    """With `-o -`, an answered item's line reaches standard output while another item is
    still waiting on the upstream, not when the run ends."""
    answer = scripted.respond
    scripted.respond = lambda body: Hang() if user_text(body) == "ok q2" else answer(body)
    source = tmp_path / "in.jsonl"
    write_items(source, ["q1", "q2"])
    process = await asyncio.create_subprocess_exec(
        *batch_to_stdout(source, address, "--concurrency", "2", "--no-progress"), cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert process.stdout is not None
    try:
        async with asyncio.timeout(30):
            first = await process.stdout.readline()
        assert json.loads(first)["content"] == "answer q1"
        assert scripted.in_flight == 1  # q2, held
    finally:
        process.kill()
        await process.wait()


@pytest.mark.parametrize(
    ("output", "why"),
    [
        ("-", "not allowed with -o -: standard output holds no earlier results"),
        ("/dev/stdout", "/dev/stdout is no regular file: it holds no earlier results"),
    ],
    ids=["dash", "dev-stdout"],
)
async def test_retry_failed_into_no_regular_file_is_a_usage_error(
    tmp_path, scripted, address, output, why
):
    """`--retry-failed` reads the earlier run's errors back from the output file, and
    standard output (`-o -`, or `/dev/stdout` into a pipe, or any output that is no
    regular file) keeps none: refused, exit 2 naming both, before any call. Before, `-o -`
    ran every item into a file named `-`, and `/dev/stdout` read nothing back from the
    pipe and ran (and paid for) every item again, exit 0."""
    source = tmp_path / "in.jsonl"
    write_items(source, ["q1"])
    command = [sys.executable, "-m", "gateway_client.cli", "batch", str(source), "-o", output]
    process = await asyncio.create_subprocess_exec(
        *command, "--address", address, "--model", FAKE_MODEL, "--retry-failed", cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(30):
        out, err = await process.communicate()
    assert process.returncode == 2
    assert out == b""
    assert err.decode().splitlines()[-1] == (
        f"llm-gateway batch: error: argument --retry-failed: {why} to read back (give -o FILE)"
    )
    assert scripted.requests == []
    assert sorted(path.name for path in tmp_path.iterdir()) == ["in.jsonl"]


@pytest.mark.parametrize("through", ["path", "symlink", "stdin"])
async def test_an_output_that_is_the_input_file_is_a_usage_error(
    tmp_path, scripted, address, through
):
    """`batch in.jsonl -o in.jsonl` (by any name, or with the input on standard input) is
    refused, exit 2, before any call, the input left as it was. Before, every input line
    (an id, no error) was read back as a result: nothing ran, and it exited 0, as if every
    item had been answered."""
    source = tmp_path / "in.jsonl"
    write_items(source, ["q1", "q2"])
    before = source.read_bytes()
    (tmp_path / "link.jsonl").symlink_to(source)
    input_arg, output = {
        "path": ("in.jsonl", "in.jsonl"),
        "symlink": ("in.jsonl", "link.jsonl"),
        "stdin": ("-", "in.jsonl"),
    }[through]
    command = [sys.executable, "-m", "gateway_client.cli", "batch", input_arg, "-o", output]
    with source.open("rb") as stdin:
        process = await asyncio.create_subprocess_exec(
            *command, "--address", address, "--model", FAKE_MODEL, cwd=tmp_path, stdin=stdin,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        async with asyncio.timeout(30):
            out, err = await process.communicate()
    assert process.returncode == 2
    assert out == b""
    assert err.decode().splitlines()[-1] == (
        f"llm-gateway batch: error: argument -o/--output: {output} is the input file: its "
        "lines would be taken for results and nothing run (give another -o FILE)"
    )
    assert scripted.requests == []
    assert source.read_bytes() == before


async def run_batch_reading_stdin(lines: list[str], output, address) -> tuple[int, str]:
    """The real `llm-gateway batch - -o OUTPUT` process, `lines` piped into it: its exit
    status and stderr."""
    command = [sys.executable, "-m", "gateway_client.cli", "batch", "-", "-o", str(output)]
    command += ["--address", address, "--model", FAKE_MODEL, "--no-progress"]
    process = await asyncio.create_subprocess_exec(
        *command, stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(60):
            _, err = await process.communicate("".join(lines).encode())
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, err.decode()


async def test_batch_reads_its_input_from_stdin_and_resumes_from_the_output(
    tmp_path, scripted, address
):
    """`cat in.jsonl | llm-gateway batch - -o out.jsonl` runs each line, and piping the
    grown input in again runs only the new ids, its unusable lines named as from <stdin>,
    as `complete -` and `summarize -` read stdin. Before, it was "cannot read -"."""
    output = tmp_path / "out.jsonl"
    lines = [json.dumps({"id": i, "prompt": f"ok {i}"}) + "\n" for i in ("q1", "q2")]
    code, err = await run_batch_reading_stdin(lines, output, address)
    assert code == 0, err
    assert sorted((r["id"], r["content"]) for r in output_records(output)) == [
        ("q1", "answer q1"),
        ("q2", "answer q2"),
    ]
    lines += [json.dumps({"id": "q3", "prompt": "ok q3"}) + "\n", "{not json\n"]
    code, err = await run_batch_reading_stdin(lines, output, address)
    assert code == 1  # the unusable line
    assert err.splitlines()[:2] == [
        "<stdin>:4: skipped: not JSON (Expecting property name enclosed in double quotes: "
        "line 1 column 2 (char 1))",
        f"resuming: 2 items already in {output}",
    ]
    assert sorted(asked_ids(scripted)) == ["q1", "q2", "q3"]
    assert sorted(r["id"] for r in output_records(output)) == ["q1", "q2", "q3"]


async def test_a_field_a_misspelling_away_from_a_known_one_is_named_once_and_the_line_runs(
    tmp_path, scripted, address, capsys
):
    """`max_token` (for `max_tokens`) is named on stderr once, on the first line with it,
    and its lines still run, without it; a dataset's own fields are left out without a
    word: `uid`, `topic`, and `prompts` beside the `prompt` it would misspell.
    Before, the misspelt field was left out silently."""
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    own = {"source": "wiki", "uid": "u1", "topic": "t", "prompts": ["a", "b"]}
    lines = [
        {"id": "q1", "prompt": "ok q1", **own},
        {"id": "q2", "prompt": "ok q2", "max_token": 5},
        {"id": "q3", "prompt": "ok q3", "max_token": 5},
    ]
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    argv = (str(source), "-o", str(output), "--address", address, "--model", FAKE_MODEL)
    code = await batch.batch_command(parse(batch, "batch", *argv, "--no-progress"))
    err = capsys.readouterr().err
    assert code == 0
    assert [line for line in err.splitlines() if "unknown field" in line] == [
        f'{source}:2: unknown field "max_token" ignored (did you mean "max_tokens"?)'
    ]
    assert sorted(asked_ids(scripted)) == ["q1", "q2", "q3"]
    assert not any("max_tokens" in request.body for request in scripted.requests)


@pytest.mark.parametrize("where", ["missing directory", "a directory"])
async def test_batch_output_that_cannot_be_written_is_one_line_and_exit_1(
    tmp_path, scripted, address, where
):
    """An output path that cannot be opened is reported in one line, before any item runs."""
    source = tmp_path / "in.jsonl"
    write_items(source, ["q1"])
    output = tmp_path / "nowhere" / "out.jsonl" if where == "missing directory" else tmp_path
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway_client.cli", "batch", str(source), "-o", str(output),
        "--address", address, "--model", FAKE_MODEL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(30):
        _, err = await process.communicate()
    assert process.returncode == 1
    assert err.decode().splitlines() == [
        f"llm-gateway batch: cannot write {output}: "
        + ("No such file or directory" if where == "missing directory" else "Is a directory")
    ]
    assert scripted.requests == []


@pytest.mark.parametrize(
    ("command", "option"),
    [
        ("complete", "--max-tokens=99999999999"),
        ("complete", "--max-tokens=0"),
        ("complete", "--temperature=2.5"),
        ("complete", "--temperature=-0.1"),
        ("complete", "--temperature=nan"),
        ("batch", "--concurrency=-5"),
        ("batch", "--items-per-call=0"),
        ("summarize", "--target-tokens=-1"),
    ],
)
async def test_numbers_a_request_cannot_carry_are_usage_errors(
    tmp_path, scripted, address, command, option
):
    """A number outside its protobuf field's range is an exit-2 usage error, not a traceback,
    and so is a `--max-tokens` under 1 or a `--temperature` outside 0..2, which every
    gateway refuses: before, those were sent, and failed INVALID_ARGUMENT, exit 1."""
    source = tmp_path / "in.txt"
    write_items(source, ["q1"])
    args = {
        "complete": ["hi"],
        "batch": [str(source), "-o", str(tmp_path / "out.jsonl")],
        "summarize": [str(source)],
    }[command]
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway_client.cli", command, *args, option,
        "--address", address, "--model", FAKE_MODEL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(30):
        _, err = await process.communicate()
    text = err.decode()
    assert process.returncode == 2, text
    assert f"argument {option.split('=')[0]}: " in text.splitlines()[-1]
    assert "Traceback" not in text
    assert scripted.requests == []


WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Weather by city",
    "parameters": '{"type": "object", "properties": {"city": {"type": "string"}}}',
}
SENT_WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather by city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


async def test_batch_prompt_and_messages_lines_send_their_tools(tmp_path, upstream, gateway):
    """`tools` and `tool_choice` on a prompt or messages line reach the upstream as they
    do from a whole `request` line (the same proto3 JSON shape); before, they were
    silently dropped, and the model answered without them."""
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    tools = [WEATHER_TOOL]
    required = {"mode": "TOOL_CHOICE_MODE_REQUIRED"}
    lines = [
        {"id": "p", "prompt": "p?", "tools": tools, "tool_choice": required},
        {
            "id": "m",
            "messages": [{"role": "user", "content": "m?"}],
            "tools": tools,
            "tool_choice": {"functionName": "get_weather"},
        },
        {"id": "t", "prompt": "t?", "tools": tools},
        {
            "id": "r",
            "request": {
                "messages": [{"role": "ROLE_USER", "content": "r?"}],
                "tools": tools,
                "toolChoice": required,
            },
        },
    ]
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    argv = (str(source), "-o", str(output), "--address", gateway.server.address)
    code = await batch.batch_command(parse(batch, "batch", *argv, "--model", FAKE_MODEL))
    assert code == 0
    sent = {user_text(r.body): r.body for r in upstream.requests}
    assert sorted(sent) == ["m?", "p?", "r?", "t?"]
    assert all(body["tools"] == [SENT_WEATHER_TOOL] for body in sent.values())
    assert sent["p?"]["tool_choice"] == sent["r?"]["tool_choice"] == "required"
    assert sent["m?"]["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert "tool_choice" not in sent["t?"]


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"tools": {"name": "get_weather"}}, "'tools' must be a list"),
        ({"tools": [{"name": "x", "parameters": {"type": "object"}}]}, "'tools'"),
        ({"tools": [WEATHER_TOOL], "tool_choice": "auto"}, "'tool_choice'"),
    ],
    ids=["tools-not-a-list", "parameters-not-json-text", "tool-choice-a-bare-string"],
)
async def test_batch_lines_with_unusable_tools_are_skipped_with_why(
    tmp_path, upstream, gateway, capsys, *, extra, reason
):
    """A line whose tools cannot be read is reported and skipped, not run without them."""
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    code, skipped = await _batch_of_one_line(
        source, output, gateway, capsys, {"id": "a", "prompt": "hi", **extra}
    )
    assert code == 1
    assert len(skipped) == 1
    assert f"{source}:1: skipped: " in skipped[0]
    assert reason in skipped[0]
    assert upstream.requests == []


async def _batch_of_one_line(source, output, gateway, capsys, line) -> tuple[int, list[str]]:
    """`llm-gateway batch` of `line` alone, written to `source`, into `output`: its exit
    status and the lines it printed about lines it skipped."""
    source.write_text(json.dumps(line) + "\n")
    argv = (str(source), "-o", str(output), "--address", gateway.server.address)
    code = await batch.batch_command(parse(batch, "batch", *argv, "--model", FAKE_MODEL))
    return code, [text for text in capsys.readouterr().err.splitlines() if "skipped" in text]


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"labels": {"team": None}}, "'labels' must be an object of strings"),
        ({"labels": {"team": {"name": "ads"}}}, "'labels' must be an object of strings"),
        ({"labels": {"team": 7}}, "'labels' must be an object of strings"),
        ({"model": [FAKE_MODEL]}, "'model' must be a string"),
        ({"model": 7}, "'model' must be a string"),
    ],
    ids=["label-null", "label-object", "label-number", "model-list", "model-number"],
)
async def test_batch_lines_whose_labels_or_model_are_not_text_are_skipped_with_why(
    tmp_path, upstream, gateway, capsys, *, extra, reason
):
    """A prompt line's label values and model are text, as a `request` line's must be.

    Before, each was sent as Python's `str()` of it: a null label as the label value
    "None", an object as its Python repr, so the call ran and its cost was recorded
    under a label nobody wrote."""
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    code, skipped = await _batch_of_one_line(
        source, output, gateway, capsys, {"id": "a", "prompt": "hi", **extra}
    )
    assert code == 1
    assert skipped == [f"{source}:1: skipped: {reason}"]
    assert output.read_text() == ""
    assert upstream.requests == []


async def test_a_batch_line_with_both_prompt_and_messages_is_skipped_with_why(
    tmp_path, upstream, gateway, capsys
):
    """A line giving both a prompt and messages is unusable, as an option beside
    `request` is: before, the prompt was left out without a word and the call ran on the
    messages alone."""
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    line = {"id": "a", "prompt": "the question", "messages": [{"content": "another one"}]}
    code, skipped = await _batch_of_one_line(source, output, gateway, capsys, line)
    assert code == 1
    assert skipped == [f"{source}:1: skipped: give 'prompt' or 'messages', not both"]
    assert output.read_text() == ""
    assert upstream.requests == []


async def wait_until_reading_stdin(pid: int) -> None:
    """Wait until the process's main thread is blocked in read(2) of its standard input."""
    for _ in range(3000):
        if Path(f"/proc/{pid}/syscall").read_text().startswith("0 0x0 "):
            return
        await asyncio.sleep(0.01)
    raise TimeoutError("the process never read its standard input")


@pytest.mark.skipif(not Path("/proc/self/syscall").exists(), reason="needs Linux's /proc")
@pytest.mark.parametrize(
    "command", [("complete", "-"), ("summarize", "-"), ("batch", "-", "-o", "out.jsonl")]
)
async def test_one_ctrl_c_stops_a_command_waiting_on_standard_input(tmp_path, command):
    """`llm-gateway batch -` (or `complete -`, `summarize -`) waiting on a terminal that
    sends nothing stops at the first Ctrl-C, status 130 (by SIGINT). Before, it took a second one:
    asyncio's SIGINT handler only asked the loop, blocked by the read, to cancel it."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as a shell's
    try:
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "gateway_client.cli", *command),
            stdin=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=tmp_path,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    assert process.stdin is not None
    try:
        await wait_until_reading_stdin(process.pid)
        process.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(process.communicate(), timeout=30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == -signal.SIGINT, err.decode()  # a shell's status 130
    assert err == b""


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        (("summarize", ""), "argument file"),
        (("batch", "", "-o", "out.jsonl"), "argument input"),
        (("batch", "in.jsonl", "-o", ""), "argument -o/--output"),
    ],
)
async def test_an_empty_file_path_is_a_usage_error(tmp_path, monkeypatch, arguments, named):
    """An empty FILE, INPUT or OUTPUT (a script's unset variable) is a usage error, exit
    2, as an empty `--config` is. Before, it was read as the current directory: exit 1,
    "cannot read : Is a directory", naming neither the option nor the empty value."""
    write_items(tmp_path / "in.jsonl", ["q1"])
    monkeypatch.chdir(tmp_path)
    code, out, err = await run_cli(*arguments, "--address", "127.0.0.1:1")
    assert (code, out) == (2, "")
    assert err.splitlines()[-1].endswith(f"error: {named}: names no file")
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("command", ["complete", "summarize"])
async def test_reading_a_closed_standard_input_is_one_line_and_status_1(command):
    """`llm-gateway complete -` (or `summarize -`) with standard input closed (`<&-`)
    says it cannot read it, exit status 1, as `batch -` does.

    Before, it ended in a traceback (`'NoneType' object has no attribute 'buffer'`)."""
    # A shell closes it, not a `preexec_fn`: that runs Python in the forked child of this
    # threaded test process, where grpc's fork handler can abort it before the exec (-6).
    process = await asyncio.create_subprocess_exec(
        *("sh", "-c", 'exec "$@" <&-', "sh"),
        *(sys.executable, "-m", "gateway_client.cli", command, "-"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=30)
    assert (process.returncode, out) == (1, b""), err.decode()
    assert err.decode() == f"llm-gateway {command}: cannot read -: standard input is closed\n"
