"""Usable CPUs: the affinity capped by the container's CPU quota (cgroup v2 and v1)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.config import LocalModelConfig
from service.cpus import cpu_quota, usable_cpus
from service.local_model import LocalModelServer

AFFINITY = len(os.sched_getaffinity(0))


def cgroup_tree(tmp_path: Path, files: dict[str, str], membership: str) -> dict[str, Path]:
    """A cgroup mount under tmp_path with `files` in it, and a /proc/self/cgroup file."""
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    root.mkdir(exist_ok=True)
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(membership)
    return {"cgroup_root": root, "proc_cgroup": proc}


def test_a_v2_quota_of_one_and_a_half_cpus_rounds_up_to_two(tmp_path: Path) -> None:
    """`cpu.max` "150000 100000" in the process's own cgroup: 1.5 CPUs, so 2 (if it has them)."""
    paths = cgroup_tree(
        tmp_path, {"kubepods/pod1/cpu.max": "150000 100000\n"}, "0::/kubepods/pod1\n"
    )
    assert cpu_quota(**paths) == 1.5
    assert usable_cpus(**paths) == min(AFFINITY, 2)


def test_a_v2_quota_of_a_tenth_of_a_cpu_still_gives_one(tmp_path: Path) -> None:
    paths = cgroup_tree(tmp_path, {"cpu.max": "10000 100000\n"}, "0::/\n")
    assert usable_cpus(**paths) == 1


def test_the_tightest_quota_among_the_ancestors_wins(tmp_path: Path) -> None:
    """A parent limited to 1 CPU caps a child that says "max"."""
    paths = cgroup_tree(
        tmp_path,
        {"parent/cpu.max": "100000 100000\n", "parent/child/cpu.max": "max 100000\n"},
        "0::/parent/child\n",
    )
    assert cpu_quota(**paths) == 1.0
    assert usable_cpus(**paths) == 1


def test_no_quota_leaves_the_affinity(tmp_path: Path) -> None:
    paths = cgroup_tree(tmp_path, {"cpu.max": "max 100000\n"}, "0::/\n")
    assert cpu_quota(**paths) is None
    assert usable_cpus(**paths) == AFFINITY


def test_a_v1_cfs_quota_is_read_from_the_cpu_controller(tmp_path: Path) -> None:
    paths = cgroup_tree(
        tmp_path,
        {
            "cpu/docker/abc/cpu.cfs_quota_us": "100000\n",
            "cpu/docker/abc/cpu.cfs_period_us": "100000\n",
        },
        "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n",
    )
    assert cpu_quota(**paths) == 1.0
    assert usable_cpus(**paths) == 1


def test_a_v1_quota_of_minus_one_means_none(tmp_path: Path) -> None:
    paths = cgroup_tree(
        tmp_path,
        {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"},
        "3:cpu,cpuacct:/\n",
    )
    assert cpu_quota(**paths) is None


@pytest.mark.parametrize("garbage", ["", "max", "abc 100000", "100000 0"])
def test_an_unreadable_cpu_max_is_ignored(tmp_path: Path, garbage: str) -> None:
    paths = cgroup_tree(tmp_path, {"cpu.max": garbage}, "0::/\n")
    assert cpu_quota(**paths) is None
    assert usable_cpus(**paths) == AFFINITY


def test_no_cgroup_files_at_all_leaves_the_affinity(tmp_path: Path) -> None:
    assert usable_cpus(cgroup_root=tmp_path / "none", proc_cgroup=tmp_path / "none") == AFFINITY


def test_the_local_model_runs_one_thread_per_usable_cpu_unless_configured() -> None:
    """llama.cpp's `--n_threads` and `--n_threads_batch`: the usable CPUs by default,
    `local_model.threads` when set."""
    default = LocalModelServer(LocalModelConfig())._command(Path("m.gguf"))
    pinned = LocalModelServer(LocalModelConfig(threads=3))._command(Path("m.gguf"))
    for option in ("--n_threads", "--n_threads_batch"):
        assert default[default.index(option) + 1] == str(usable_cpus())
        assert pinned[pinned.index(option) + 1] == "3"
