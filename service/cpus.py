"""How many CPUs this process may really use: its CPU affinity and its container's quota.

`os.cpu_count()` reports the node's cores. A container limited to 2 CPUs on a 64-core
node would then start 64 workers and give llama.cpp 64 threads, which the quota then
throttles. Python 3.13's `os.process_cpu_count()` covers affinity only, not quotas.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def usable_cpus(*, cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """The CPUs this process may run on, capped by its cgroup's CPU quota (at least 1)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    quota = cpu_quota(cgroup_root=cgroup_root, proc_cgroup=proc_cgroup)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def cpu_quota(*, cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """CPUs' worth of time the process's cgroup may use (v2 `cpu.max` or v1 CFS), or None."""
    paths = _cgroup_paths(proc_cgroup)
    v2 = _quota_v2(cgroup_root, paths.get(""))
    if v2 is not None:
        return v2
    return _quota_v1(cgroup_root / "cpu", paths.get("cpu"))


def _cgroup_paths(proc_cgroup: Path) -> dict[str, str]:
    """Controller name ("" for the v2 hierarchy) -> this process's cgroup path."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return {}
    paths: dict[str, str] = {}
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for controller in parts[1].split(","):
            paths[controller] = parts[2]
    return paths


def _candidates(mount: Path, path: str | None) -> list[Path]:
    """The process's own cgroup directory and its ancestors up to the mount, innermost first.

    In a container with its own cgroup namespace the path is "/" and the mount is its own.
    """
    if path is None:
        return [mount]
    found = [mount / path.strip("/")]
    found.extend(found[0].parents[: len(Path(path.strip("/")).parts)])
    return found


def _quota_v2(mount: Path, path: str | None) -> float | None:
    quotas = []
    for directory in _candidates(mount, path):
        try:
            limit, period = (directory / "cpu.max").read_text().split()
            if limit != "max" and int(period) > 0:
                quotas.append(int(limit) / int(period))
        except (OSError, ValueError):
            continue
    return min(quotas, default=None)


def _quota_v1(mount: Path, path: str | None) -> float | None:
    quotas = []
    for directory in _candidates(mount, path):
        try:
            limit = int((directory / "cpu.cfs_quota_us").read_text())
            period = int((directory / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        if limit > 0 and period > 0:  # -1: no quota
            quotas.append(limit / period)
    return min(quotas, default=None)
