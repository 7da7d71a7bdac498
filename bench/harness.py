"""Shared benchmark plumbing: child servers, load loops and percentile tables."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


@dataclass(frozen=True, slots=True)
class Figures:
    """Throughput and latency of one measured configuration."""

    name: str
    requests: int
    errors: int
    seconds: float
    per_second: float
    p50_ms: float
    p99_ms: float
    p90_ms: float = 0.0


@contextlib.asynccontextmanager
async def child_server(
    *args: str, env: dict[str, str] | None = None, module: str = "bench.servers"
) -> AsyncIterator[str]:
    """Start `python -m MODULE ARGS` (extra `env`) and yield the address it reports."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), timeout=60)).decode()
        if not line.startswith("ready "):
            raise RuntimeError(f"bench server {args} failed to start: {line!r}")
        yield line.split(" ", 1)[1].strip()
    finally:
        process.terminate()
        await process.wait()


async def measure(
    name: str, call: Callable[[], Awaitable[object]], *, requests: int, concurrency: int
) -> Figures:
    """Run `call` `requests` times with `concurrency` workers; latency of each call."""
    latencies: list[float] = []
    errors = 0
    remaining = requests

    async def worker() -> None:
        nonlocal remaining, errors
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            try:
                await call()
            except Exception:
                errors += 1
            latencies.append(time.perf_counter() - started)

    for _ in range(min(20, requests)):  # warm-up: connections, caches, JIT-free paths
        with contextlib.suppress(Exception):
            await call()
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.perf_counter() - started
    latencies.sort()
    return Figures(
        name=name,
        requests=requests,
        errors=errors,
        seconds=seconds,
        per_second=requests / seconds,
        p50_ms=statistics.median(latencies) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        p90_ms=percentile(latencies, 0.90) * 1000,
    )


def percentile(ordered: list[float], fraction: float) -> float:
    """The `fraction` percentile of an ascending list (nearest rank)."""
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def print_table(title: str, rows: list[Figures], baseline: Figures | None = None) -> None:
    """Print figures as an aligned table, with throughput ratios to `baseline`."""
    print(f"\n{title}")
    print(f"{'':28} {'req/s':>10} {'p50 ms':>9} {'p99 ms':>9} {'errors':>7} {'ratio':>7}")
    for row in rows:
        ratio = f"{row.per_second / baseline.per_second:.2f}" if baseline else ""
        print(
            f"{row.name:28} {row.per_second:10.0f} {row.p50_ms:9.3f} {row.p99_ms:9.3f} "
            f"{row.errors:7d} {ratio:>7}"
        )


def write_json(name: str, payload: dict[str, object]) -> Path:
    """Write a benchmark's figures to bench/results/NAME.json."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=asdict) + "\n")
    return path
