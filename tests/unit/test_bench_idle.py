"""`make bench` holds the CPUs out of deep idle states through a PM QoS request.

On the VM the benchmarks run on, a vCPU that halts between a call's hops takes
milliseconds to wake, and the gateway's extra hops paid it as though it were its own
work; `/dev/cpu_dma_latency` at 0 (as cyclictest sets it) keeps them polling.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from bench.report import shallow_idle


def test_the_request_is_written_as_zero_and_held_while_in_the_block(tmp_path: Path) -> None:
    device = tmp_path / "cpu_dma_latency"
    device.write_bytes(b"")
    with shallow_idle(str(device)) as is_shallow:
        assert is_shallow
        assert device.read_bytes() == struct.pack("i", 0)


def test_without_the_device_the_run_goes_on_as_the_machine_is(tmp_path: Path) -> None:
    with shallow_idle(str(tmp_path / "missing")) as is_shallow:
        assert not is_shallow


def test_bench_idle_deep_leaves_idle_states_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BENCH_IDLE", "deep")
    device = tmp_path / "cpu_dma_latency"
    device.write_bytes(b"untouched")
    with shallow_idle(str(device)) as is_shallow:
        assert not is_shallow
    assert device.read_bytes() == b"untouched"
