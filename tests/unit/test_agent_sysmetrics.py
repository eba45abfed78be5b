"""System metrics of a job: counter deltas to rates (pure), and samples of a real process tree."""

from __future__ import annotations

import asyncio
import sys

from hypothesis import given
from hypothesis import strategies as st

from ciuic_gpu_agent.inventory import simulated_inventory
from ciuic_gpu_agent.sysmetrics import IoCounters, SystemMetrics, io_rates

counter = st.none() | st.integers(0, 2**63)


def test_rates_are_bytes_per_second_between_two_snapshots() -> None:
    before = IoCounters(at=10.0, net_sent=1000, net_recv=0, disk_read=0, disk_write=500)
    after = IoCounters(at=12.0, net_sent=5000, net_recv=2048, disk_read=0, disk_write=500)
    assert io_rates(before, after) == {
        "net_sent_bytes_per_s": 2000.0,
        "net_recv_bytes_per_s": 1024.0,
        "disk_read_bytes_per_s": 0.0,
        "disk_write_bytes_per_s": 0.0,
    }


def test_a_counter_that_went_backwards_or_is_missing_gives_no_rate() -> None:
    before = IoCounters(at=0.0, net_sent=5000, net_recv=10, disk_read=None, disk_write=1)
    after = IoCounters(at=1.0, net_sent=100, net_recv=20, disk_read=7, disk_write=None)
    assert io_rates(before, after) == {"net_recv_bytes_per_s": 10.0}


def test_no_time_between_snapshots_gives_no_rates() -> None:
    same = IoCounters(at=5.0, net_sent=1, net_recv=1, disk_read=1, disk_write=1)
    assert io_rates(same, same) == {}


@given(
    st.floats(0, 1e6),
    st.floats(0, 1e6),
    st.tuples(counter, counter, counter, counter),
    st.tuples(counter, counter, counter, counter),
)
def test_rates_are_never_negative_and_only_for_counters_both_snapshots_have(
    t0: float, dt: float, a: tuple[int | None, ...], b: tuple[int | None, ...]
) -> None:
    before = IoCounters(t0, *a)
    after = IoCounters(t0 + dt, *b)
    rates = io_rates(before, after)
    assert all(rate >= 0 for rate in rates.values())
    names = ["net_sent", "net_recv", "disk_read", "disk_write"]
    for name, old, new in zip(names, a, b, strict=True):
        has_rate = any(key.startswith(name) for key in rates)
        elapsed = after.at - before.at  # not always dt: floats round
        assert has_rate == (old is not None and new is not None and new >= old and elapsed > 0)


async def test_a_sample_covers_the_jobs_processes_its_gpus_and_the_host() -> None:
    burn = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import time\nend = time.time() + 20\nwhile time.time() < end: pass"
    )
    try:
        metrics = SystemMetrics(gpus=[1])
        inventory = simulated_inventory(2, "host")
        first = await asyncio.to_thread(metrics.sample, [burn.pid], inventory)
        await asyncio.sleep(0.3)
        second = await asyncio.to_thread(metrics.sample, [burn.pid], inventory)
    finally:
        burn.kill()
        await burn.wait()
    first_keys = set(first.keys)
    values = dict(zip(second.keys, second.values, strict=True))
    assert "system/cpu_pct" not in first_keys  # no interval yet
    assert "system/net_sent_bytes_per_s" not in first_keys
    assert values["system/cpu_pct"] > 5
    assert values["system/memory_used_mib"] > 1
    assert values["system/gpu.1.utilization_pct"] == 0.0
    assert "system/gpu.1.memory_used_mib" in values
    assert not any(key.startswith("system/gpu.0.") for key in values)  # not the job's GPU
    assert "system/net_recv_bytes_per_s" in values
    assert set(first.steps) == {0}
    assert set(second.steps) == {1}


def test_a_job_whose_processes_are_gone_samples_without_error() -> None:
    metrics = SystemMetrics()
    metrics.sample([2**22 + 12345])  # no such pid
    sample = metrics.sample([2**22 + 12345])
    points = dict(zip(sample.keys, sample.values, strict=True))
    assert points["system/cpu_pct"] == 0.0
    assert points["system/memory_used_mib"] == 0.0
