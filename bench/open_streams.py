"""Many concurrent open streams held by one gateway process: errors and RSS per stream.

The mock upstream streams slowly, so every stream stays open while we measure the
gateway's resident memory. Run: `python -m bench.open_streams` (BENCH_STREAMS=2000).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import grpc

from bench.harness import child_server, write_json
from bench.servers import MODEL
from llmgateway.v1 import gateway_pb2 as pb
from llmgateway.v1 import gateway_pb2_grpc as pb_grpc

STREAMS = int(os.environ.get("BENCH_STREAMS", "2000"))
CHANNELS = 20
REQUEST = pb.CompleteStreamRequest(
    model=MODEL, messages=[pb.Message(role=pb.ROLE_USER, content="hold on")]
)


def rss_mb(pid: int) -> float:
    """Resident set size of a process in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _server_pid(kind: str) -> int:
    """The `bench.servers KIND` process this benchmark started: a child of this process,
    never a server some other run left on the machine."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if parent == os.getpid() and b"bench.servers" in cmdline and kind.encode() in cmdline:
                found.append(int(entry.name))
    if len(found) != 1:
        raise RuntimeError(f"{len(found)} {kind} processes of this benchmark, not one")
    return found[0]


async def hold_streams(address: str, pid: int, streams: int = STREAMS) -> dict[str, float]:
    """Open `streams` streams at once on `address`, measure RSS of `pid`, then drain them."""
    channels = [grpc.aio.insecure_channel(address) for _ in range(CHANNELS)]
    stubs = [pb_grpc.CompletionServiceStub(c) for c in channels]
    await stubs[0].Complete(pb.CompleteRequest(model=MODEL, messages=REQUEST.messages))
    baseline = rss_mb(pid)
    opened = 0
    all_open = asyncio.Event()
    errors = 0

    async def one(index: int) -> None:
        nonlocal opened, errors
        try:
            call = stubs[index % CHANNELS].CompleteStream(REQUEST, timeout=120)
            first = True
            async for _ in call:
                if first:
                    first = False
                    opened += 1
                    if opened == streams:
                        all_open.set()
        except grpc.aio.AioRpcError as error:
            errors += 1
            if errors <= 3:
                print(f"stream error: {error.code().name} {error.details()}")
            opened += 1
            if opened == streams:
                all_open.set()

    started = time.perf_counter()
    tasks = [asyncio.ensure_future(one(i)) for i in range(streams)]
    await asyncio.wait_for(all_open.wait(), timeout=120)
    open_s = time.perf_counter() - started
    peak = rss_mb(pid)
    await asyncio.gather(*tasks)
    for channel in channels:
        await channel.close()
    return {
        "streams": streams,
        "errors": errors,
        "seconds_to_open_all": round(open_s, 2),
        "rss_idle_mb": round(baseline, 1),
        "rss_all_open_mb": round(peak, 1),
        "rss_per_stream_kb": round((peak - baseline) * 1024 / streams, 1),
    }


async def run() -> dict[str, object]:
    """Hold STREAMS streams on the trivial server, then on the gateway; print both."""
    os.environ["BENCH_SLOW_STREAM"] = "1"
    async with child_server("trivial") as address:
        trivial = await hold_streams(address, _server_pid("trivial"))
    async with (
        child_server("mock") as upstream_url,
        child_server("gateway", upstream_url) as address,
    ):
        gateway = await hold_streams(address, _server_pid("gateway"))
    for name, row in (("trivial", trivial), ("gateway", gateway)):
        print(
            f"{name:8} {STREAMS} concurrent streams: errors={row['errors']}, all open after "
            f"{row['seconds_to_open_all']}s, RSS {row['rss_idle_mb']:.0f} MiB idle -> "
            f"{row['rss_all_open_mb']:.0f} MiB all open ({row['rss_per_stream_kb']} KiB/stream)"
        )
    print("target: gateway RSS with all open < 300 MiB and no error beyond the trivial server's")
    result: dict[str, object] = {"trivial": trivial, "gateway": gateway}
    print(f"written {write_json('open_streams', result)}")
    return result


def main() -> None:
    """Entry point."""
    asyncio.run(run())


if __name__ == "__main__":
    main()
