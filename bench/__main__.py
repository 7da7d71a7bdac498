"""`make bench`: every benchmark module in turn."""

from __future__ import annotations

import importlib
import sys

MODULES = [
    "bench.overhead",
    "bench.open_streams",
    "bench.load_failures",
    "bench.batch_throughput",
    "bench.cache_hits",
    "bench.telemetry_overhead",
]


def main() -> None:
    """Run each benchmark's `main`."""
    only = sys.argv[1:]
    for name in MODULES:
        if only and name.rsplit(".", 1)[-1] not in only:
            continue
        print(f"\n===== {name} =====", flush=True)
        importlib.import_module(name).main()


if __name__ == "__main__":
    main()
