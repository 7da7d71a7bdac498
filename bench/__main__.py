"""`make bench`: the one report of every performance target (`bench.report`).

`python -m bench NAME...` runs the named detailed benchmarks instead (`all`: every one).
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import sys

DETAILED = [
    "bench.overhead",
    "bench.open_streams",
    "bench.load_failures",
    "bench.batch_throughput",
    "bench.cache_hits",
    "bench.telemetry_overhead",
    "bench.telemetry_calls",
]


def main() -> None:
    """Run the report, or the detailed benchmarks named on the command line."""
    only = sys.argv[1:]
    if not only:
        importlib.import_module("bench.report").main()
        return
    for name in DETAILED:
        if "all" in only or name.rsplit(".", 1)[-1] in only:
            print(f"\n===== {name} =====", flush=True)
            _run(importlib.import_module(name))


def _run(module: object) -> None:
    """Call a benchmark's `main` with its defaults (never this command line), sync or async."""
    main = module.main  # type: ignore[attr-defined]
    if hasattr(module, "parse_args"):
        result = main(module.parse_args([]))
    elif inspect.signature(main).parameters:
        result = main([])
    else:
        result = main()
    if inspect.iscoroutine(result):
        asyncio.run(result)


if __name__ == "__main__":
    main()
