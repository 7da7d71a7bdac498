"""Soak: the real gateway process under a long mix of upstream and caller faults.

Run: `python -m bench.soak [--seconds 120] [--rounds 4] [--concurrency 32] [--seed 1]`.

Three processes: a fault-injecting upstream (`python -m bench.soak upstream`: the fake of
the tests, drawing a behaviour for every request from `_behaviours`), the gateway
(`python -m service serve --workers 1`, Prometheus metrics on), and this one, whose
callers mix Complete (some cancelled early, some with short deadlines), CompleteStream
(read whole, read slowly, cancelled after the first delta, short deadlines) and
CompleteBatch (some cancelled after the first result), cacheable and not. Load runs in
rounds, each on fresh caller channels and followed by a quiet pause; the last pause
outlasts the pool's 30 s keep-alive. Every `--sample-s` seconds it records the gateway's
open fds, RSS and threads (/proc), its connections to the upstream (/proc/PID/net/tcp,
and the upstream's own count), calls in flight (`llm_gateway_rpc_in_flight` from
/metrics) and upstream calls in flight (`ListModels`).

It fails (exit 1) when, after the last quiet period, fds, connections, threads or
in-flight counts are not back to the idle baseline, RSS grows every round in the second
half of the run, a caller got an improper status (UNKNOWN, or any error but
DEADLINE_EXCEEDED or its own CANCELLED without google.rpc details), a call ended more
than 1 s past its deadline, or the gateway logged at ERROR. Figures go to
bench/results/soak.json, the gateway's log to bench/results/soak-gateway.log.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import json
import os
import random
import socket
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import yaml
from google.rpc import error_details_pb2, status_pb2

from bench.harness import REPO, RESULTS, write_json
from llmgateway.v1 import gateway_pb2 as pb
from llmgateway.v1 import gateway_pb2_grpc as pb_grpc

MODEL = "soak-model"
_LISTENING = "llm-gateway listening on "
# Late by more than this past its deadline, a call counts as hung.
_HANG_SLACK_S = 1.0
_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
M = TypeVar("M", pb.CompleteRequest, pb.CompleteStreamRequest)


# --- the upstream ---------------------------------------------------------------------


def _behaviours(rng: random.Random) -> Any:
    """One upstream behaviour, drawn with the weights of the mix."""
    from tests.fake_upstream import (
        CutStream,
        EndWithoutDone,
        Hang,
        MalformedSSE,
        Reply,
        Reset,
        Status,
    )

    mix: list[tuple[float, Any]] = [
        (40, Reply(content="soak " * 12, chunks=6)),
        (8, Reply(content="slow " * 8, chunks=8, chunk_delay_s=0.15, delay_s=0.1)),
        (6, Status(429, headers={"Retry-After": "1"})),
        (5, Status(500)),
        (5, Status(503)),
        (5, Reset()),
        (5, CutStream(after_chunks=2)),
        (4, Hang()),
        (4, MalformedSSE(after_chunks=1)),
        (4, EndWithoutDone(after_chunks=2)),
        (3, Status(503, delay_s=0.3)),
        (3, Reply(content="stall " * 4, chunks=4, chunk_delay_s=30)),  # stalls mid-stream
        (3, "cut-body"),  # headers and half a JSON body, then a reset
        (3, "stall-after-head"),  # headers, then nothing
    ]
    weights = [w for w, _ in mix]
    return rng.choices([b for _, b in mix], weights=weights)[0]


async def run_upstream(seed: int) -> None:
    """The fake upstream, a random behaviour per request; `GET /soak/connections` counts."""
    from aiohttp import web

    from tests.fake_upstream import Behaviour, FakeUpstream, _abort

    rng = random.Random(seed)

    class _Discard(list[Any]):
        def append(self, item: Any) -> None:
            """Keep nothing: a long soak must not grow the upstream's memory."""

    class SoakUpstream(FakeUpstream):
        async def _play(
            self, request: web.Request, body: dict[str, Any], behaviour: Behaviour
        ) -> web.StreamResponse:
            chosen = _behaviours(rng)
            if chosen == "cut-body":
                response = web.StreamResponse(headers={"Content-Type": "application/json"})
                response.content_length = 400
                await response.prepare(request)
                await response.write(b'{"id": "chatcmpl-cut", "object": "chat.compl')
                await asyncio.sleep(0.02)
                _abort(request)
            if chosen == "stall-after-head":
                response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
                await response.prepare(request)
                await asyncio.Event().wait()
            return await super()._play(request, body, chosen)

    upstream = SoakUpstream(models=(MODEL,))
    upstream.requests = _Discard()
    await upstream.start()
    assert upstream._runner is not None

    async def connections(_: web.Request) -> web.Response:
        return web.json_response({"open": upstream.open_connections()})

    # A second tiny server: the upstream app is frozen once started.
    app = web.Application()
    app.router.add_get("/soak/connections", connections)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    stats_port = runner.addresses[0][1]
    print(f"ready {upstream.base_url} http://127.0.0.1:{stats_port}", flush=True)
    await asyncio.Event().wait()


# --- the gateway ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def gateway_config(upstream_url: str, listen: str, metrics_port: int) -> dict[str, Any]:
    """The soak's gateway: one upstream, fast retries and breaker, short cache TTL."""
    return {
        "server": {"listen": listen, "grace_period_s": 2, "max_in_flight_calls": 1000},
        "upstreams": [
            {
                "name": "soak",
                "base_url": upstream_url,
                "models": [MODEL],
                "timeout_s": 4,
                "max_connections": 200,
                "max_concurrency": 200,
            }
        ],
        "models": {
            MODEL: {
                "context_window": 8192,
                "input_usd_per_million": 0.14,
                "output_usd_per_million": 0.42,
            }
        },
        "resilience": {
            "backoff_base_s": 0.05,
            "backoff_cap_s": 0.5,
            "max_retry_after_s": 1.0,
            "breaker_cool_down_s": 1.0,
            "breaker_min_calls": 50,
            "breaker_failure_ratio": 0.8,
            "breaker_consecutive_failures": 20,
        },
        "cache": {"default_ttl_s": 3},
        "batch": {"default_concurrency": 4},
        "local_model": {"enabled": "never"},
        "telemetry": {"prometheus_port": metrics_port},
    }


@dataclass
class Children:
    """The two child processes and how to reach them."""

    upstream_pid: int
    upstream_url: str
    upstream_stats_url: str
    gateway_pid: int
    gateway_address: str
    metrics_url: str


@contextlib.asynccontextmanager
async def children(seed: int) -> AsyncIterator[Children]:
    """Start the upstream, then the gateway in front of it; stop both at the end."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env = {k: v for k, v in env.items() if not k.startswith(("LLM_GATEWAY", "OTEL_"))}
    workdir = tempfile.TemporaryDirectory(prefix="llmgw-soak-")
    processes: list[asyncio.subprocess.Process] = []
    RESULTS.mkdir(parents=True, exist_ok=True)
    log = (RESULTS / "soak-gateway.log").open("wb")  # read back for ERROR lines
    try:
        upstream = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.soak", "upstream", "--seed", str(seed),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, cwd=REPO, env=env,
        )  # fmt: skip
        processes.append(upstream)
        assert upstream.stdout is not None
        line = (await asyncio.wait_for(upstream.stdout.readline(), timeout=60)).decode().split()
        if not line or line[0] != "ready":
            raise RuntimeError(f"soak upstream failed to start: {line!r}")
        upstream_url, stats_url = line[1], line[2]
        listen = f"127.0.0.1:{_free_port()}"
        metrics_port = _free_port()
        config_path = Path(workdir.name) / "gateway.yaml"
        config_path.write_text(yaml.safe_dump(gateway_config(upstream_url, listen, metrics_port)))
        gateway = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "service", "serve", "--config", str(config_path),
            "--workers", "1", "--log-level", "WARNING",
            stdout=asyncio.subprocess.PIPE, stderr=log, cwd=REPO, env=env,
        )  # fmt: skip
        processes.append(gateway)
        assert gateway.stdout is not None
        line_text = (await asyncio.wait_for(gateway.stdout.readline(), timeout=60)).decode()
        if not line_text.startswith(_LISTENING):
            raise RuntimeError(f"gateway failed to start: {line_text!r}")
        yield Children(
            upstream_pid=upstream.pid,
            upstream_url=upstream_url,
            upstream_stats_url=f"{stats_url}/soak/connections",
            gateway_pid=gateway.pid,
            gateway_address=listen,
            metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
        )
    finally:
        for process in reversed(processes):
            if process.returncode is None:
                process.terminate()
                try:
                    await asyncio.wait_for(process.wait(), timeout=10)
                except TimeoutError:
                    process.kill()
                    await process.wait()
        log.close()
        workdir.cleanup()


# --- what is sampled ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    """The gateway's resources at one moment."""

    at_s: float
    phase: str
    fds: int
    rss_kib: int
    threads: int
    upstream_conns: int  # gateway sockets connected to the upstream (/proc)
    upstream_side_conns: int  # connections the upstream sees open
    rpc_in_flight: float  # llm_gateway_rpc_in_flight, summed
    pool_in_flight: int  # ListModels: upstream calls in flight


def _proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    return inodes


def fd_kinds(pid: int) -> dict[str, int]:
    """The gateway's open fds by kind (`socket:`, `pipe:`, `anon_inode:`) or path."""
    kinds: collections.Counter[str] = collections.Counter()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            kinds[target.split("[")[0] if "[" in target else target] += 1
    return dict(kinds)


def _connections_to(pid: int, port: int) -> int:
    """Sockets of `pid` connected to 127.0.0.1:`port`, from /proc/PID/net/tcp."""
    inodes = _socket_inodes(pid)
    count = 0
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote_port = int(fields[2].split(":")[1], 16)
        if remote_port == port and fields[9] in inodes:
            count += 1
    return count


def _http_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def _metric_sum(url: str, name: str) -> float:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def take_sample(
    kids: Children, stub: pb_grpc.CompletionServiceStub, phase: str, started: float
) -> Sample:
    """Read every figure once."""
    pid = kids.gateway_pid
    status = _proc_status(pid)
    port = int(kids.upstream_url.rsplit(":", 1)[1].split("/")[0])
    models = await stub.ListModels(pb.ListModelsRequest(), timeout=5)
    pool_in_flight = sum(u.in_flight for m in models.models for u in m.upstreams)
    upstream_side = await asyncio.to_thread(_http_json, kids.upstream_stats_url)
    rpc_in_flight = await asyncio.to_thread(
        _metric_sum, kids.metrics_url, "llm_gateway_rpc_in_flight"
    )
    return Sample(
        at_s=round(time.monotonic() - started, 1),
        phase=phase,
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        rss_kib=int(status["VmRSS"].split()[0]),
        threads=int(status["Threads"]),
        upstream_conns=_connections_to(pid, port),
        upstream_side_conns=int(upstream_side["open"]),
        rpc_in_flight=rpc_in_flight,
        pool_in_flight=pool_in_flight,
    )


# --- the callers ----------------------------------------------------------------------


@dataclass
class Tally:
    """What the callers saw."""

    calls: collections.Counter[str] = field(default_factory=collections.Counter)
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    improper: list[str] = field(default_factory=list)
    hangs: list[str] = field(default_factory=list)
    batch_items: collections.Counter[str] = field(default_factory=collections.Counter)


def _reason(error: grpc.aio.AioRpcError) -> str | None:
    """The ErrorInfo reason of a failed call; "" with details but no ErrorInfo; None: none."""
    raw = dict(error.trailing_metadata() or ()).get("grpc-status-details-bin")
    if raw is None:
        return None
    status = status_pb2.Status.FromString(raw)
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return ""


def _check_error(tally: Tally, kind: str, error: grpc.aio.AioRpcError, *, cancelled: bool) -> None:
    code = error.code()
    reason = _reason(error)
    tally.outcomes[f"{code.name}{'/' + reason if reason else ''}"] += 1
    if code is grpc.StatusCode.CANCELLED and cancelled:
        return
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return  # no details by design (DESIGN.md): the caller's own deadline
    if code is grpc.StatusCode.UNKNOWN or reason is None:
        tally.improper.append(f"{kind}: {code.name} {error.details()!r}")


def _messages(rng: random.Random, *, cacheable: bool) -> list[pb.Message]:
    text = f"prompt {rng.randrange(40)}" if cacheable else f"unique {rng.random()}"
    return [pb.Message(role=pb.ROLE_USER, content=text)]


def _params(cacheable: bool) -> pb.GenerationParams:
    return pb.GenerationParams(temperature=0.0 if cacheable else 0.7, max_tokens=64)


def _request(rng: random.Random, *, cacheable: bool, message: type[M]) -> M:
    """One prompt as `message`, cacheable (a few recurring ones, temperature 0) or unique."""
    return message(
        model=MODEL, messages=_messages(rng, cacheable=cacheable), params=_params(cacheable)
    )


async def one_call(stub: pb_grpc.CompletionServiceStub, rng: random.Random, tally: Tally) -> None:
    """One caller action drawn from the mix; errors checked, lateness measured."""
    cacheable = rng.random() < 0.3
    kind = rng.choices(
        ["unary", "stream", "stream-cancel", "stream-short", "unary-short", "batch",
         "batch-cancel", "unary-cancel", "stream-slow-reader"],
        weights=[25, 20, 12, 8, 8, 8, 6, 7, 6],
    )[0]  # fmt: skip
    deadline_s = {"stream-short": 0.4, "unary-short": 0.4}.get(kind, 5.0)
    deadline_s = 8.0 if kind.startswith("batch") else deadline_s
    deadline_s *= rng.uniform(0.8, 1.2)
    tally.calls[kind] += 1
    started = time.monotonic()
    cancelled = False
    try:
        if kind.startswith("unary"):
            unary = stub.Complete(
                _request(rng, cacheable=cacheable, message=pb.CompleteRequest), timeout=deadline_s
            )
            waiting = asyncio.ensure_future(unary)
            if kind == "unary-cancel":  # the caller gives up before its deadline
                done, _ = await asyncio.wait([waiting], timeout=rng.uniform(0, 0.5))
                if not done:
                    cancelled = True
                    unary.cancel()
            await waiting
        elif kind.startswith("batch"):
            items = [
                pb.BatchItem(
                    id=str(i),
                    request=_request(rng, cacheable=cacheable, message=pb.CompleteRequest),
                )
                for i in range(rng.randint(2, 6))
            ]
            batch = stub.CompleteBatch(pb.CompleteBatchRequest(items=items), timeout=deadline_s)
            async for event in batch:
                if kind == "batch-cancel":  # the caller leaves after the first result
                    cancelled = True
                    batch.cancel()
                    break
                if event.HasField("result") and event.result.HasField("error"):
                    item_code = _CODE_NAMES.get(event.result.error.code, "?")
                    tally.batch_items[item_code] += 1
                    if item_code in ("UNKNOWN", "?"):
                        tally.improper.append(f"batch item: UNKNOWN {event.result.error.message}")
                elif event.HasField("result"):
                    tally.batch_items["OK"] += 1
        else:
            stream_request = _request(rng, cacheable=cacheable, message=pb.CompleteStreamRequest)
            call = stub.CompleteStream(stream_request, timeout=deadline_s)
            async for event in call:
                if kind == "stream-cancel" and event.HasField("delta"):
                    cancelled = True
                    call.cancel()
                    break
                if kind == "stream-slow-reader":
                    await asyncio.sleep(0.3)
        tally.outcomes["CANCELLED (by caller)" if cancelled else "OK"] += 1
    except grpc.aio.AioRpcError as error:
        _check_error(tally, kind, error, cancelled=cancelled)
    except asyncio.CancelledError:
        if not cancelled:
            raise
        tally.outcomes["CANCELLED (by caller)"] += 1
    late_s = time.monotonic() - started - deadline_s
    if late_s > _HANG_SLACK_S:
        tally.hangs.append(f"{kind}: {late_s:.2f} s past its deadline")


async def load(
    channels: list[grpc.aio.Channel], *, seconds: float, concurrency: int, rng: random.Random,
    tally: Tally,
) -> None:  # fmt: skip
    """`concurrency` callers, each calling back to back for `seconds`."""
    stop_at = time.monotonic() + seconds
    stubs = [pb_grpc.CompletionServiceStub(c) for c in channels]

    async def caller(index: int) -> None:
        stub = stubs[index % len(stubs)]
        own = random.Random(rng.random())
        while time.monotonic() < stop_at:
            await one_call(stub, own, tally)

    async with asyncio.TaskGroup() as group:
        for index in range(concurrency):
            group.create_task(caller(index))


# --- the run --------------------------------------------------------------------------


@dataclass
class Run:
    """Everything one soak recorded."""

    baseline: Sample
    samples: list[Sample] = field(default_factory=list)
    round_ends: list[Sample] = field(default_factory=list)
    tally: Tally = field(default_factory=Tally)
    wall_s: float = 0.0
    log_errors: list[str] = field(default_factory=list)
    fds_at_start: dict[str, int] = field(default_factory=dict)
    fds_after_round: list[dict[str, int]] = field(default_factory=list)


async def soak(args: argparse.Namespace) -> int:
    """Run the rounds, sample throughout, check the end against the baseline."""
    rng = random.Random(args.seed)
    async with children(args.seed) as kids:
        control = grpc.aio.insecure_channel(kids.gateway_address)
        control_stub = pb_grpc.CompletionServiceStub(control)
        started = time.monotonic()
        phase = "idle"
        await asyncio.sleep(1)
        run = Run(await take_sample(kids, control_stub, "baseline", started))
        run.fds_at_start = fd_kinds(kids.gateway_pid)
        run.samples.append(run.baseline)
        print(f"baseline: {run.baseline}", flush=True)

        async def sampler() -> None:
            while True:
                await asyncio.sleep(args.sample_s)
                sample = await take_sample(kids, control_stub, phase, started)
                run.samples.append(sample)
                print(sample, flush=True)

        sampling = asyncio.create_task(sampler())
        try:
            for number in range(args.rounds):
                phase = f"load {number + 1}"
                # Fresh caller channels each round: gRPC connections come and go too.
                channels = [grpc.aio.insecure_channel(kids.gateway_address) for _ in range(4)]
                await load(
                    channels,
                    seconds=args.seconds / args.rounds,
                    concurrency=args.concurrency,
                    rng=rng,
                    tally=run.tally,
                )
                for channel in channels:
                    await channel.close()
                phase = f"quiet {number + 1}"
                is_last = number == args.rounds - 1
                await asyncio.sleep(args.final_quiet_s if is_last else args.quiet_s)
                end = await take_sample(kids, control_stub, f"after round {number + 1}", started)
                run.round_ends.append(end)
                run.fds_after_round.append(fd_kinds(kids.gateway_pid))
                run.samples.append(end)
                print(f"after round {number + 1}: {end}", flush=True)
        finally:
            sampling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampling
            await control.close()
        run.wall_s = time.monotonic() - started
    log = (RESULTS / "soak-gateway.log").read_text(errors="replace").splitlines()
    run.log_errors = [line for line in log if " ERROR " in line or " CRITICAL " in line]
    return report(args, run)


_FIGURES = (
    "fds",
    "rss_kib",
    "threads",
    "upstream_conns",
    "upstream_side_conns",
    "rpc_in_flight",
    "pool_in_flight",
)


def verdicts(run: Run) -> list[str]:
    """What is wrong at the end of a run; empty when nothing is."""
    baseline, end, tally = run.baseline, run.round_ends[-1], run.tally
    failures: list[str] = []
    # Sockets, pipes and event fds come back to the baseline. A library may open a file
    # once, lazily (gRPC core a second /dev/null): files may not grow after round 1.
    start, first, last = run.fds_at_start, run.fds_after_round[0], run.fds_after_round[-1]
    for kind, count in last.items():
        allowed = start.get(kind, 0) if kind.endswith(":") else first.get(kind, 0)
        if count > allowed:
            failures.append(
                f"fds not back: {start} at start, {first} after round 1, {last} at the end"
            )
            break
    if end.upstream_conns > baseline.upstream_conns:
        failures.append(f"{end.upstream_conns} upstream connections left open")
    if end.rpc_in_flight or end.pool_in_flight:
        failures.append(f"in flight at the end: rpc {end.rpc_in_flight}, pool {end.pool_in_flight}")
    if end.threads > baseline.threads:
        failures.append(f"threads: {baseline.threads} at start, {end.threads} at the end")
    # Bounded caches (decoded entries, token estimates) fill during the first rounds;
    # a leak keeps growing after them.
    rss = [s.rss_kib for s in run.round_ends]
    later = rss[len(rss) // 2 :]
    if len(later) >= 2 and all(b > a for a, b in itertools.pairwise(later)):
        per_round = (later[-1] - later[0]) / (len(later) - 1)
        if per_round > 1024:
            failures.append(f"RSS grows every round: {rss} KiB")
    if tally.improper:
        failures.append(f"{len(tally.improper)} improper statuses: {tally.improper[:5]}")
    if tally.hangs:
        failures.append(f"{len(tally.hangs)} calls past deadline + 1 s: {tally.hangs[:5]}")
    if run.log_errors:
        failures.append(
            f"{len(run.log_errors)} ERROR lines in the gateway's log: {run.log_errors[:3]}"
        )
    return failures


def report(args: argparse.Namespace, run: Run) -> int:
    """Print the figures and the verdicts, write bench/results/soak.json; 0 when all passed."""
    failures = verdicts(run)
    tally, baseline, end = run.tally, run.baseline, run.round_ends[-1]
    peak = {name: max(getattr(s, name) for s in run.samples) for name in _FIGURES}
    total = sum(tally.calls.values())
    print(f"\nsoak: {run.wall_s:.0f} s, {total} calls at concurrency {args.concurrency}")
    print(f"calls: {dict(tally.calls)}")
    print(f"outcomes: {dict(tally.outcomes.most_common())}")
    print(f"batch items: {dict(tally.batch_items)}")
    print(f"{'':20} {'start':>8} {'peak':>8} {'end':>8}")
    for name in _FIGURES:
        print(f"{name:20} {getattr(baseline, name):>8} {peak[name]:>8} {getattr(end, name):>8}")
    print(f"RSS after each round (KiB): {[s.rss_kib for s in run.round_ends]}")
    print("PASS" if not failures else "FAIL:\n  " + "\n  ".join(failures))
    write_json(
        "soak",
        {
            "seconds": run.wall_s,
            "calls": dict(tally.calls),
            "outcomes": dict(tally.outcomes),
            "batch_items": dict(tally.batch_items),
            "improper": tally.improper,
            "hangs": tally.hangs,
            "log_errors": run.log_errors[:20],
            "samples": [_as_dict(s) for s in run.samples],
            "failures": failures,
        },
    )
    return 1 if failures else 0


def _as_dict(sample: Sample) -> dict[str, Any]:
    return {name: getattr(sample, name) for name in Sample.__annotations__}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m bench.soak")
    parser.add_argument("role", nargs="?", default="driver", choices=["driver", "upstream"])
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--quiet-s", type=float, default=8)
    parser.add_argument(
        "--final-quiet-s",
        type=float,
        default=35,
        help="the last quiet period; past the pool's 30 s keep-alive no idle connection is left",
    )
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--sample-s", type=float, default=5)
    parser.add_argument("--seed", type=int, default=1)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the driver, or (as a child) the upstream."""
    args = parse_args(argv)
    if args.role == "upstream":
        asyncio.run(run_upstream(args.seed))
        return
    sys.exit(asyncio.run(soak(args)))


if __name__ == "__main__":
    main()
