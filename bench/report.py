"""`make bench`: every target of the performance issue, measured in one run, in one table.

    python -m bench.report            # BENCH_ROUNDS=3, BENCH_SCALE=1, BENCH_STREAMS=2000

Each server runs in its own process, driven from this one: the mock upstream (answers
at once from canned bytes, bench/lean_upstream.py), a trivial grpc.aio server (the
ceiling for Python gRPC here), the gateway in front of the mock, the same gateway with
every span and metric recorded, and
`python -m service serve --workers N`. The load-sensitive figures are measured in
BENCH_ROUNDS interleaved rounds (so background load hits every server alike) and the
median of each is reported. Prints one table (figure, target, ratio, pass/fail), writes
bench/results/report.json and renders bench/results/latency.png.

While it runs it holds the CPUs out of deep idle states (`/dev/cpu_dma_latency` at 0, as
latency tools such as cyclictest do), when it may (root on Linux): on this VM a vCPU that
halts between a call's hops takes milliseconds to wake, and the gateway's extra hops paid
that as though it were its own work. `BENCH_IDLE=deep` leaves idle states as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import yaml

from bench.harness import REPO, RESULTS, Figures, child_server, measure, percentile, write_json
from bench.open_streams import _server_pid, hold_streams
from bench.servers import MODEL, STREAM_CHUNKS, gateway_config_data
from llmgateway.v1 import gateway_pb2 as pb
from llmgateway.v1 import gateway_pb2_grpc as pb_grpc

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
SCALE = float(os.environ.get("BENCH_SCALE", "1"))
OPEN_STREAMS = int(os.environ.get("BENCH_STREAMS", "2000"))
UNARY_C1 = max(50, int(500 * SCALE))
UNARY_C64 = max(300, int(3000 * SCALE))
STREAM_C1 = max(20, int(100 * SCALE))
STREAMS_C16 = max(32, int(96 * SCALE))
ADDED_MS_BUDGET = 0.25
PACED_GAP_MS = 2  # between a paced stream's events: 0.4 s for 200
# Before the rest of a stream, for the first token measured without the rest's burst.
FIRST_EVENT_GAP_MS = 5
PACED_STREAMS = max(16, int(48 * SCALE))

MESSAGES = [pb.Message(role=pb.ROLE_USER, content="Say hi")]
MISS = pb.CompleteRequest(model=MODEL, messages=MESSAGES)  # not cacheable: no temperature
HIT = pb.CompleteRequest(
    model=MODEL, messages=MESSAGES, params=pb.GenerationParams(temperature=0.0)
)  # temperature 0: cached after the first call
STREAM = pb.CompleteStreamRequest(model=MODEL, messages=MESSAGES)
# Every metric, and the spans of one call in ten (the OpenTelemetry SDK's own sampler).
SAMPLED_TRACES = {
    "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
    "OTEL_TRACES_SAMPLER_ARG": "0.1",
}
HTTP_MESSAGES = [{"role": "user", "content": "Say hi"}]
HTTP_UNARY = {"model": MODEL, "messages": HTTP_MESSAGES}
HTTP_STREAM = {**HTTP_UNARY, "stream": True, "stream_options": {"include_usage": True}}


# ---- the calls -----------------------------------------------------------------------


@dataclass
class Calls:
    """The unary call, the whole stream and the time to its first message, per target."""

    unary: Callable[[], Awaitable[object]]
    stream: Callable[[], Awaitable[object]]
    first_token: Callable[[], Awaitable[float]]  # seconds to the first message


def _grpc_calls(
    stub: pb_grpc.CompletionServiceStub,
    request: pb.CompleteRequest,
    messages: list[int] | None = None,
) -> Calls:
    """`messages`, when given, gets the number of messages of each whole stream."""

    async def unary() -> None:
        await stub.Complete(request)

    async def stream() -> None:
        count = 0
        async for _ in stub.CompleteStream(STREAM):
            count += 1
        if messages is not None:
            messages.append(count)

    async def first_token() -> float:
        started = time.perf_counter()
        call = stub.CompleteStream(STREAM)
        await call.read()
        first = time.perf_counter() - started
        while await call.read() is not grpc.aio.EOF:  # drained outside the timing
            pass
        return first

    return Calls(unary, stream, first_token)


def _http_calls(session: aiohttp.ClientSession, base_url: str) -> Calls:
    url = base_url + "/chat/completions"

    async def unary() -> None:
        async with session.post(url, json=HTTP_UNARY) as response:
            await response.json()

    async def stream() -> None:
        async with session.post(url, json=HTTP_STREAM) as response:
            async for _ in response.content.iter_chunked(65536):
                pass

    async def first_token() -> float:
        started = time.perf_counter()
        async with session.post(url, json=HTTP_STREAM) as response:
            # The first event carries only the role: time the first one with content.
            line = b"data:"
            while line and b'"content"' not in line:
                line = await response.content.readline()
            first = time.perf_counter() - started
            async for _ in response.content.iter_chunked(65536):  # outside the timing
                pass
        return first

    return Calls(unary, stream, first_token)


# ---- measuring -----------------------------------------------------------------------


def _median(rows: list[Figures]) -> Figures:
    """The median of each figure across rounds."""
    return Figures(
        name=rows[0].name,
        requests=sum(r.requests for r in rows),
        errors=sum(r.errors for r in rows),
        seconds=sum(r.seconds for r in rows),
        per_second=statistics.median(r.per_second for r in rows),
        p50_ms=statistics.median(r.p50_ms for r in rows),
        p99_ms=statistics.median(r.p99_ms for r in rows),
        p90_ms=statistics.median(r.p90_ms for r in rows),
    )


async def _figures(name: str, calls: Calls, *, unary_c64: bool = True) -> dict[str, Figures]:
    figures = {
        "unary_c1": await measure(
            f"{name} unary c=1", calls.unary, requests=UNARY_C1, concurrency=1
        ),
        "ttft_c1": await _first_token(f"{name} first token c=1", calls.first_token),
        "stream_c16": await measure(
            f"{name} stream c=16", calls.stream, requests=STREAMS_C16, concurrency=16
        ),
    }
    if unary_c64:
        figures["unary_c64"] = await measure(
            f"{name} unary c=64", calls.unary, requests=UNARY_C64, concurrency=64
        )
    return figures


async def _first_token(name: str, first_token: Callable[[], Awaitable[float]]) -> Figures:
    """Time to the first streamed message, one stream at a time."""
    for _ in range(5):
        await first_token()
    started = time.perf_counter()
    latencies = sorted([await first_token() for _ in range(STREAM_C1)])
    seconds = time.perf_counter() - started
    return Figures(
        name=name,
        requests=STREAM_C1,
        errors=0,
        seconds=seconds,
        per_second=STREAM_C1 / seconds,
        p50_ms=statistics.median(latencies) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        p90_ms=percentile(latencies, 0.90) * 1000,
    )


@contextlib.asynccontextmanager
async def _grpc_stub(address: str) -> AsyncIterator[pb_grpc.CompletionServiceStub]:
    async with grpc.aio.insecure_channel(address) as channel:
        yield pb_grpc.CompletionServiceStub(channel)


async def _rounds() -> tuple[dict[str, dict[str, Figures]], dict[str, float]]:
    """Direct, trivial, gateway (miss and hit), gateway with telemetry and with a metered
    tenant, interleaved.

    Also the mean number of messages in one whole stream, per gRPC server.
    """
    rounds: dict[str, dict[str, list[Figures]]] = {}
    messages: dict[str, list[int]] = {"trivial": [], "gateway": []}

    def keep(target: str, figures: dict[str, Figures]) -> None:
        for key, row in figures.items():
            rounds.setdefault(target, {}).setdefault(key, []).append(row)

    async with contextlib.AsyncExitStack() as stack:
        upstream_url = await stack.enter_async_context(child_server("lean-mock"))
        trivial_at = await stack.enter_async_context(child_server("trivial"))
        gateway_at = await stack.enter_async_context(child_server("gateway", upstream_url))
        telemetry_at = await stack.enter_async_context(
            child_server("gateway-telemetry", upstream_url)
        )
        sampled_at = await stack.enter_async_context(
            child_server("gateway-telemetry", upstream_url, env=SAMPLED_TRACES)
        )
        metered_at = await stack.enter_async_context(child_server("gateway-metered", upstream_url))
        session = await stack.enter_async_context(
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100))
        )
        trivial = await stack.enter_async_context(_grpc_stub(trivial_at))
        gateway = await stack.enter_async_context(_grpc_stub(gateway_at))
        telemetry = await stack.enter_async_context(_grpc_stub(telemetry_at))
        sampled = await stack.enter_async_context(_grpc_stub(sampled_at))
        metered = await stack.enter_async_context(_grpc_stub(metered_at))
        for index in range(ROUNDS):
            print(f"round {index + 1}/{ROUNDS}", flush=True)
            keep("direct", await _figures("direct", _http_calls(session, upstream_url)))
            keep(
                "trivial",
                await _figures("trivial", _grpc_calls(trivial, MISS, messages["trivial"])),
            )
            keep(
                "gateway",
                await _figures("gateway", _grpc_calls(gateway, MISS, messages["gateway"])),
            )
            hit = _grpc_calls(gateway, HIT).unary
            keep(
                "gateway",
                {
                    "hit_c64": await measure(
                        "gateway hit c=64", hit, requests=UNARY_C64, concurrency=64
                    )
                },
            )
            for request, key in ((MISS, "unary_c64"), (HIT, "hit_c64")):
                call = _grpc_calls(metered, request).unary
                keep(
                    "metered",
                    {
                        key: await measure(
                            f"metered {key}", call, requests=UNARY_C64, concurrency=64
                        )
                    },
                )
            for target, stub in (("telemetry", telemetry), ("telemetry_sampled", sampled)):
                on = _grpc_calls(stub, MISS).unary
                keep(
                    target,
                    {
                        "unary_c64": await measure(
                            f"{target} unary c=64", on, requests=UNARY_C64, concurrency=64
                        )
                    },
                )
    medians = {
        target: {key: _median(rows) for key, rows in figures.items()}
        for target, figures in rounds.items()
    }
    return medians, {name: statistics.mean(counts) for name, counts in messages.items()}


async def _first_token_alone() -> dict[str, Figures]:
    """Time to first token with the rest of the stream 5 ms behind the first event.

    In the burst the main rounds use, the mock, the gateway and the caller all want a
    core the moment the first event is out: on 2 cores the caller waits for one while
    the others relay the rest. A provider's next token comes milliseconds later; here the
    mock and the trivial server hold the rest back for FIRST_EVENT_GAP_MS, so the first
    token is timed on its own. Direct, trivial and gateway interleaved, medians of rounds.
    """
    alone = {"BENCH_FIRST_EVENT_GAP_MS": str(FIRST_EVENT_GAP_MS)}
    rounds: dict[str, list[Figures]] = {"direct": [], "trivial": [], "gateway": []}
    async with contextlib.AsyncExitStack() as stack:
        upstream_url = await stack.enter_async_context(child_server("lean-mock", env=alone))
        trivial_at = await stack.enter_async_context(child_server("trivial", env=alone))
        gateway_at = await stack.enter_async_context(child_server("gateway", upstream_url))
        session = await stack.enter_async_context(aiohttp.ClientSession())
        trivial = await stack.enter_async_context(_grpc_stub(trivial_at))
        gateway = await stack.enter_async_context(_grpc_stub(gateway_at))
        calls = {
            "direct": _http_calls(session, upstream_url),
            "trivial": _grpc_calls(trivial, MISS),
            "gateway": _grpc_calls(gateway, MISS),
        }
        for _ in range(ROUNDS):
            for name, call in calls.items():
                figures = await _first_token(f"{name} first token alone", call.first_token)
                rounds[name].append(figures)
    return {name: _median(rows) for name, rows in rounds.items()}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def _served(upstream_url: str, workers: int) -> AsyncIterator[str]:
    """`python -m service serve --workers N` in front of the mock; yields its address."""
    address = f"127.0.0.1:{_free_port()}"
    config = gateway_config_data(upstream_url, listen=address, server={"grace_period_s": 1})
    workdir = tempfile.TemporaryDirectory(prefix="llmgw-bench-")
    config_path = os.path.join(workdir.name, "gateway.yaml")
    with open(config_path, "w", encoding="utf-8") as file:  # noqa: ASYNC230 (tiny, once)
        yaml.safe_dump(config, file)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service", "serve", "--config", config_path,
        "--workers", str(workers), "--log-level", "WARNING",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, cwd=REPO,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), timeout=120)).decode()
        if "listening on" not in line:
            raise RuntimeError(f"gateway with {workers} workers failed to start: {line!r}")
        yield address
    finally:
        process.terminate()
        await process.wait()
        workdir.cleanup()


async def _workers_throughput(upstream_url: str, workers: int) -> Figures:
    """Unary c=64 over 8 connections, so the kernel spreads them over the workers."""
    async with _served(upstream_url, workers) as address:
        # A local subchannel pool gives each channel its own TCP connection.
        channels = [
            grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(8)
        ]
        stubs = [pb_grpc.CompletionServiceStub(c) for c in channels]
        turn = 0

        async def unary() -> None:
            nonlocal turn
            turn += 1
            await stubs[turn % len(stubs)].Complete(MISS)

        try:
            rows = [
                await measure(
                    f"{workers} worker(s) unary c=64", unary, requests=UNARY_C64, concurrency=64
                )
                for _ in range(ROUNDS)
            ]
        finally:
            for channel in channels:
                await channel.close()
    return _median(rows)


async def _scaling() -> dict[str, Figures]:
    async with child_server("lean-mock") as upstream_url:
        return {
            "workers_1": await _workers_throughput(upstream_url, 1),
            "workers_2": await _workers_throughput(upstream_url, 2),
        }


def _cpu_s(pid: int) -> float:
    """CPU seconds (user and system, all threads) the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _cpu_per_message(stub: pb_grpc.CompletionServiceStub, pid: int) -> tuple[float, float]:
    """Streams at c=16 on `stub`: the server's CPU µs per message, and messages a stream."""
    counts: list[int] = []
    stream = _grpc_calls(stub, MISS, counts).stream
    await measure("warm-up", stream, requests=16, concurrency=16)
    counts.clear()
    started = _cpu_s(pid)
    await measure("paced", stream, requests=PACED_STREAMS, concurrency=16)
    messages = sum(counts)
    return (_cpu_s(pid) - started) * 1e6 / messages, messages / len(counts)


async def _paced_relay() -> dict[str, float]:
    """CPU per relayed event with the upstream pacing its events, against the trivial server
    streaming its messages at once and paced alike.

    Paced, each event reaches the gateway on its own and goes on as its own message: the
    per-event cost the burst figure does not show. At this rate the gateway is not
    saturated, which if anything counts against it (no work shared between events).
    """
    async with child_server("trivial") as address, _grpc_stub(address) as stub:
        trivial_us, trivial_messages = await _cpu_per_message(stub, _server_pid("trivial"))
    paced = {"BENCH_EVENT_GAP_MS": str(PACED_GAP_MS)}
    async with child_server("trivial", env=paced) as address, _grpc_stub(address) as stub:
        trivial_paced_us, _ = await _cpu_per_message(stub, _server_pid("trivial"))
    async with (
        child_server("lean-mock", env=paced) as upstream_url,
        child_server("gateway", upstream_url) as address,
        _grpc_stub(address) as stub,
    ):
        gateway_us, gateway_messages = await _cpu_per_message(stub, _server_pid("gateway"))
    return {
        "trivial_us_per_message": trivial_us,
        "trivial_messages_per_stream": trivial_messages,
        "trivial_paced_us_per_message": trivial_paced_us,
        "gateway_us_per_message": gateway_us,
        "gateway_messages_per_stream": gateway_messages,
    }


async def _open_streams() -> dict[str, dict[str, float]]:
    """OPEN_STREAMS slow streams held at once by the trivial server, then the gateway."""
    slow = {"BENCH_SLOW_STREAM": "1"}
    async with child_server("trivial", env=slow) as address:
        trivial = await hold_streams(address, _server_pid("trivial"), OPEN_STREAMS)
    async with (
        child_server("mock", env=slow) as upstream_url,
        child_server("gateway", upstream_url, env=slow) as address,
    ):
        gateway = await hold_streams(address, _server_pid("gateway"), OPEN_STREAMS)
    return {"trivial": trivial, "gateway": gateway}


# ---- the table -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Row:
    """One target: what was measured against what was asked."""

    target: str
    measured: str
    wanted: str
    ratio: float
    passed: bool | None  # None: a figure reported for operators, not a target


def _rows(
    figures: dict[str, dict[str, Figures]],
    *,
    scaling: dict[str, Figures],
    streams: dict[str, dict[str, float]],
    messages: dict[str, float],
    paced: dict[str, float],
    first_token: dict[str, Figures],
) -> list[Row]:
    direct, trivial, gateway = figures["direct"], figures["trivial"], figures["gateway"]
    latencies = [
        ("unary p50 c=1", direct["unary_c1"], trivial["unary_c1"], gateway["unary_c1"]),
        (
            "stream first token p50 c=1, the rest of the stream at once",
            direct["ttft_c1"],
            trivial["ttft_c1"],
            gateway["ttft_c1"],
        ),
        (
            f"stream first token p50 c=1, the rest {FIRST_EVENT_GAP_MS} ms later",
            first_token["direct"],
            first_token["trivial"],
            first_token["gateway"],
        ),
    ]
    rows = []
    for what, via_direct, via_trivial, via_gateway in latencies:
        bound = via_direct.p50_ms + via_trivial.p50_ms + ADDED_MS_BUDGET
        measured = via_gateway.p50_ms
        added = measured - via_direct.p50_ms - via_trivial.p50_ms
        rows.append(
            Row(
                f"{what} (added {added:+.2f} ms)",
                f"{measured:.2f} ms",
                f"<= {bound:.2f} ms",
                measured / bound,
                measured <= bound,
            )
        )
    ceiling = trivial["unary_c64"].per_second
    for key, what, floor in (
        ("unary_c64", "unary c=64, cache miss", 0.5),
        ("hit_c64", "unary c=64, cache hit", 0.8),
    ):
        ratio = gateway[key].per_second / ceiling
        rows.append(
            Row(
                f"{what} vs trivial",
                f"{gateway[key].per_second:.0f}/s of {ceiling:.0f}/s",
                f">= {floor:.2f}",
                ratio,
                ratio >= floor,
            )
        )
    chunks = STREAM_CHUNKS + 1
    ratio = gateway["stream_c16"].per_second / trivial["stream_c16"].per_second
    # The gateway relays the chunks that arrive in one read as one message; say how many.
    rows.append(
        Row(
            f"stream chunks/s c=16, {STREAM_CHUNKS}-chunk bursts (in {messages['gateway']:.0f} "
            f"messages vs {messages['trivial']:.0f}) vs trivial",
            f"{gateway['stream_c16'].per_second * chunks:.0f} of "
            f"{trivial['stream_c16'].per_second * chunks:.0f}",
            ">= 0.60",
            ratio,
            ratio >= 0.6,
        )
    )
    # Against the trivial server pacing its messages alike: a message written on its own
    # costs grpc and the event loop far more than one of a burst.
    ratio = paced["trivial_paced_us_per_message"] / paced["gateway_us_per_message"]
    rows.append(
        Row(
            f"stream, events paced {PACED_GAP_MS} ms (in "
            f"{paced['gateway_messages_per_stream']:.0f} messages): CPU per event vs trivial "
            "paced alike",
            f"{paced['gateway_us_per_message']:.0f} µs vs "
            f"{paced['trivial_paced_us_per_message']:.0f} µs a message "
            f"({paced['trivial_us_per_message']:.0f} µs unpaced)",
            "(report)",
            ratio,
            None,
        )
    )
    held = streams["gateway"]
    rows.append(
        Row(
            f"{OPEN_STREAMS} open streams: RSS ({held['rss_per_stream_kb']:.0f} KiB/stream)",
            f"{held['rss_all_open_mb']:.0f} MiB, {held['errors']:.0f} errors "
            f"(trivial {streams['trivial']['errors']:.0f})",
            "< 300 MiB, 0 errors",
            held["rss_all_open_mb"] / 300,
            held["rss_all_open_mb"] < 300 and held["errors"] == 0,
        )
    )
    ratio = figures["telemetry"]["unary_c64"].per_second / gateway["unary_c64"].per_second
    rows.append(
        Row(
            "telemetry on: unary c=64 vs off",
            f"{figures['telemetry']['unary_c64'].per_second:.0f}/s of "
            f"{gateway['unary_c64'].per_second:.0f}/s",
            ">= 0.90",
            ratio,
            ratio >= 0.9,
        )
    )
    sampled = figures["telemetry_sampled"]["unary_c64"].per_second
    rows.append(
        Row(
            "telemetry on, 10% of traces sampled, vs off",
            f"{sampled:.0f}/s of {gateway['unary_c64'].per_second:.0f}/s",
            "(report)",
            sampled / gateway["unary_c64"].per_second,
            None,
        )
    )
    for key, what in (("unary_c64", "cache miss"), ("hit_c64", "cache hit")):
        ratio = figures["metered"][key].per_second / gateway[key].per_second
        rows.append(
            Row(
                f"tenant with limits (caller gate's full path): {what} c=64 vs without",
                f"{figures['metered'][key].per_second:.0f}/s of {gateway[key].per_second:.0f}/s",
                "(report)",
                ratio,
                None,
            )
        )
    one, two = scaling["workers_1"].per_second, scaling["workers_2"].per_second
    rows.append(
        Row(
            "--workers 2 vs --workers 1, unary c=64",
            f"{two:.0f}/s vs {one:.0f}/s",
            "> 1.00 (report)",
            two / one,
            two > one,
        )
    )
    return rows


def _verdict(passed: bool | None) -> str:
    if passed is None:
        return ""
    return "pass" if passed else "MISS"


def _table(rows: list[Row]) -> str:
    header = ("target", "measured", "wanted", "ratio", "")
    lines = [header] + [
        (r.target, r.measured, r.wanted, f"{r.ratio:.2f}", _verdict(r.passed)) for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for number, line in enumerate(lines):
        out.append("| " + " | ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)) + " |")
        if number == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def _chart(figures: dict[str, dict[str, Figures]], path: Path) -> bool:
    """p50/p90/p99 of unary calls at c=1 for direct, gateway and trivial, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: `pip install -e '.[bench]'` for the chart)")
        return False
    targets = [("direct HTTP", "direct"), ("trivial gRPC", "trivial"), ("gateway", "gateway")]
    marks = [("p50", "p50_ms"), ("p90", "p90_ms"), ("p99", "p99_ms")]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, key, title in (
        (axes[0], "unary_c1", "unary, concurrency 1"),
        (axes[1], "unary_c64", "unary, concurrency 64"),
    ):
        width = 0.25
        for offset, (label, attr) in enumerate(marks):
            values = [getattr(figures[t][key], attr) for _, t in targets]
            positions = [i + (offset - 1) * width for i in range(len(targets))]
            bars = axis.bar(positions, values, width, label=label)
            axis.bar_label(bars, fmt="%.2f", fontsize=7)
        axis.set_xticks(range(len(targets)), [name for name, _ in targets])
        axis.set_ylabel("latency, ms")
        axis.set_title(title)
        axis.legend()
    figure.suptitle(f"Latency percentiles (median of {ROUNDS} rounds, {os.cpu_count()} cores)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


@contextlib.contextmanager
def shallow_idle(device: str = "/dev/cpu_dma_latency") -> Iterator[bool]:
    """Hold the CPUs out of deep idle states while in the block (a PM QoS request of 0 µs,
    dropped when its file closes); True if held, False if it may not be (not root, no
    such device) or `BENCH_IDLE=deep` says not to."""
    if os.environ.get("BENCH_IDLE") == "deep":
        yield False
        return
    try:
        request = os.open(device, os.O_WRONLY)
    except OSError:
        yield False
        return
    try:
        os.write(request, struct.pack("i", 0))
        yield True
    finally:
        os.close(request)


async def run() -> dict[str, Any]:
    """Measure everything, print the table, write the JSON and the chart."""
    with shallow_idle() as is_shallow:
        return await _run(is_shallow=is_shallow)


async def _run(*, is_shallow: bool) -> dict[str, Any]:
    started = time.perf_counter()
    idle = "held shallow" if is_shallow else "as the machine has them"
    print(
        f"bench: {ROUNDS} rounds, {os.cpu_count()} cores, idle states {idle}; "
        "per-round figures, then the table"
    )
    figures, messages = await _rounds()
    scaling = await _scaling()
    streams = await _open_streams()
    paced = await _paced_relay()
    first_token = await _first_token_alone()
    rows = _rows(
        figures,
        scaling=scaling,
        streams=streams,
        messages=messages,
        paced=paced,
        first_token=first_token,
    )
    table = _table(rows)
    print()
    print(table)
    result: dict[str, Any] = {
        "rounds": ROUNDS,
        "cores": os.cpu_count(),
        "shallow_idle": is_shallow,
        "seconds": round(time.perf_counter() - started, 1),
        "table": [asdict(r) for r in rows],
        "figures": figures,
        "stream_messages": messages,
        "paced_relay": paced,
        "first_token_alone": first_token,
        "workers": scaling,
        "open_streams": streams,
    }
    print(f"written {write_json('report', result)}")
    if _chart(figures, RESULTS / "latency.png"):
        print(f"written {RESULTS / 'latency.png'}")
    return result


def main() -> None:
    """Entry point."""
    asyncio.run(run())


if __name__ == "__main__":
    main()
