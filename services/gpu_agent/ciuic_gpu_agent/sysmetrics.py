"""System metrics of a running job, as metric points (columns) under `system/`.

Every few seconds (the caller's loop; `sample` blocks on /proc, so run it in a thread):
- `system/cpu_pct` (100 = one core busy) and `system/memory_used_mib` (RSS) of the job's
  process tree, from psutil; CPU is the delta of each process's CPU time between two samples;
- `system/gpu.<i>.utilization_pct`, `.memory_used_mib`, `.temperature_c`, `.power_w` of each GPU
  assigned to the job (host indices, not the job's renumbered CUDA ones), from the inventory
  the agent already reads for its heartbeat (NVML, or the simulation: it says so);
- `system/net_sent_bytes_per_s`, `system/net_recv_bytes_per_s`, `system/disk_read_bytes_per_s`,
  `system/disk_write_bytes_per_s`: host-wide rates (Linux does not count a process tree's
  network traffic, and its disk counters miss page-cache writes), from counter deltas.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import psutil

from ciuic_common.events import GpuInfo, Inventory, MetricColumns

__all__ = [
    "IoCounters",
    "ProcessTreeUsage",
    "SystemMetrics",
    "TreeUsage",
    "io_rates",
    "read_io_counters",
]

MIB = 1024 * 1024
PREFIX = "system/"


@dataclass(frozen=True)
class IoCounters:
    """Host-wide cumulative I/O counters at one moment (`at`: monotonic seconds).

    A counter the host does not have (no disks visible in a container) is None.
    """

    at: float
    net_sent: int | None = None
    net_recv: int | None = None
    disk_read: int | None = None
    disk_write: int | None = None


_RATE_KEYS = {
    "net_sent": "net_sent_bytes_per_s",
    "net_recv": "net_recv_bytes_per_s",
    "disk_read": "disk_read_bytes_per_s",
    "disk_write": "disk_write_bytes_per_s",
}


def io_rates(before: IoCounters, after: IoCounters) -> dict[str, float]:
    """Bytes per second of each counter between two snapshots.

    A counter missing from either snapshot, or that went backwards (a reset, a NIC that went
    away, a wrap), gives no rate rather than a wrong one; so does a non-positive interval.
    """
    elapsed = after.at - before.at
    if elapsed <= 0:
        return {}
    rates: dict[str, float] = {}
    for field, key in _RATE_KEYS.items():
        old, new = getattr(before, field), getattr(after, field)
        if old is None or new is None or new < old:
            continue
        rates[key] = (new - old) / elapsed
    return rates


def read_io_counters() -> IoCounters:
    """The host's network and disk counters now."""
    at = time.monotonic()
    net = psutil.net_io_counters()
    disk = psutil.disk_io_counters()
    return IoCounters(
        at=at,
        net_sent=net.bytes_sent if net is not None else None,
        net_recv=net.bytes_recv if net is not None else None,
        disk_read=disk.read_bytes if disk is not None else None,
        disk_write=disk.write_bytes if disk is not None else None,
    )


@dataclass(frozen=True)
class TreeUsage:
    """CPU and memory of a set of processes. `cpu_pct` is None on the first measurement."""

    cpu_pct: float | None
    rss_bytes: int
    processes: int


class ProcessTreeUsage:
    """CPU % and RSS of a changing set of pids, from CPU-time deltas between calls.

    A process first seen since the previous call counts with all its CPU time if it started
    after that call (it all happened in the interval); CPU of processes that exited between
    calls is not seen.
    """

    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}
        self._cpu: dict[int, float] = {}
        self._at: float | None = None  # monotonic time of the previous call
        self._wall_at: float | None = None  # wall time of the previous call

    def measure(self, pids: Iterable[int]) -> TreeUsage:
        """Usage of `pids` since the previous call (blocking: reads /proc)."""
        now, wall = time.monotonic(), time.time()
        procs: dict[int, psutil.Process] = {}
        cpu: dict[int, float] = {}
        busy = 0.0
        rss = 0
        for pid in set(pids):
            proc = self._procs.get(pid)
            try:
                if proc is None:
                    proc = psutil.Process(pid)
                with proc.oneshot():
                    times = proc.cpu_times()
                    memory = proc.memory_info()
                    created = proc.create_time()
            except psutil.Error:
                continue
            total = times.user + times.system
            previous = self._cpu.get(pid)
            if previous is not None:
                busy += max(0.0, total - previous)
            elif self._wall_at is not None and created >= self._wall_at:
                busy += total
            procs[pid], cpu[pid] = proc, total
            rss += memory.rss
        elapsed = None if self._at is None else now - self._at
        self._procs, self._cpu, self._at, self._wall_at = procs, cpu, now, wall
        cpu_pct = busy / elapsed * 100.0 if elapsed else None
        return TreeUsage(cpu_pct=cpu_pct, rss_bytes=rss, processes=len(procs))


def _gpu_points(gpu: GpuInfo) -> dict[str, float]:
    prefix = f"gpu.{gpu.index}."
    values: dict[str, float | None] = {
        "utilization_pct": gpu.utilization_pct,
        "memory_used_mib": float(gpu.memory_used_mib),
        "temperature_c": gpu.temperature_c,
        "power_w": gpu.power_w,
    }
    return {prefix + name: value for name, value in values.items() if value is not None}


class SystemMetrics:
    """The system metrics of one job, sample after sample (steps count samples from 0)."""

    def __init__(self, gpus: Sequence[int] = ()) -> None:
        self.gpus = tuple(gpus)
        self._tree = ProcessTreeUsage()
        self._io: IoCounters | None = None
        self._step = 0

    def sample(self, pids: Iterable[int], inventory: Inventory | None = None) -> MetricColumns:
        """One sample as points (blocking: reads /proc). The first sample has no rates yet."""
        values: dict[str, float] = {}
        usage = self._tree.measure(pids)
        if usage.cpu_pct is not None:
            values["cpu_pct"] = usage.cpu_pct
        values["memory_used_mib"] = usage.rss_bytes / MIB
        if inventory is not None:
            for gpu in inventory.gpus:
                if gpu.index in self.gpus:
                    values.update(_gpu_points(gpu))
        counters = read_io_counters()
        if self._io is not None:
            values.update(io_rates(self._io, counters))
        self._io = counters
        step, self._step = self._step, self._step + 1
        now = time.time()
        points = MetricColumns()
        for key, value in values.items():
            points.append(PREFIX + key, step, value, now)
        return points
