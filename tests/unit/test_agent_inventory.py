"""The host inventory: NVML parsing (through a stand-in for the hardware library), the real
no-NVML path of this machine, the simulation, topology and host facts."""

from __future__ import annotations

import asyncio
import importlib
import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ciuic_gpu_agent.inventory import (
    SIMULATED_MEMORY_MIB,
    SIMULATED_MODEL,
    GpuProbe,
    cgroup_cpu_millicores,
    cgroup_memory_bytes,
    find_capabilities,
    find_python_versions,
    interconnect_groups,
    read_inventory,
    simulated_inventory,
)

MIB = 1024 * 1024


class NVMLError(Exception):
    pass


class NVMLErrorNotSupported(NVMLError):
    pass


@dataclass
class FakeGpu:
    uuid: str
    name: str | bytes
    total: int
    used: int
    util: int = 0
    temperature: int = 40
    milliwatts: int | None = 100_000
    compute: list[tuple[int, int | None]] = field(default_factory=list)
    graphics: list[tuple[int, int | None]] = field(default_factory=list)
    bus_id: str = ""
    links: list[str] = field(default_factory=list)  # remote bus ids, one per active link


class FakeNvml:
    """A stand-in for the `pynvml` module: the functions and constants GpuProbe uses."""

    NVMLError = NVMLError
    NVML_TEMPERATURE_GPU = 0
    NVML_P2P_CAPS_INDEX_NVLINK = 3
    NVML_P2P_STATUS_OK = 0
    NVML_P2P_STATUS_NOT_SUPPORTED = 5
    NVML_FEATURE_ENABLED = 1
    NVML_NVLINK_MAX_LINKS = 4

    def __init__(
        self,
        gpus: list[FakeGpu],
        nvlinked: set[tuple[int, int]] | None = None,
        *,
        init_error: str | None = None,
        p2p_supported: bool = True,
    ) -> None:
        self.gpus = gpus
        self.nvlinked = nvlinked or set()
        self.init_error = init_error
        self.p2p_supported = p2p_supported
        self.inits = 0
        self.shutdowns = 0

    def nvmlInit(self) -> None:
        if self.init_error:
            raise NVMLError(self.init_error)
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return self.gpus[h].uuid

    def nvmlDeviceGetName(self, h: int) -> str | bytes:
        return self.gpus[h].name

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        g = self.gpus[h]
        return SimpleNamespace(total=g.total, used=g.used, free=g.total - g.used)

    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any:
        return SimpleNamespace(gpu=self.gpus[h].util, memory=0)

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        assert sensor == self.NVML_TEMPERATURE_GPU
        return self.gpus[h].temperature

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        milliwatts = self.gpus[h].milliwatts
        if milliwatts is None:
            raise NVMLErrorNotSupported("Not Supported")
        return milliwatts

    def nvmlDeviceGetComputeRunningProcesses(self, h: int) -> list[Any]:
        return [SimpleNamespace(pid=p, usedGpuMemory=m) for p, m in self.gpus[h].compute]

    def nvmlDeviceGetGraphicsRunningProcesses(self, h: int) -> list[Any]:
        return [SimpleNamespace(pid=p, usedGpuMemory=m) for p, m in self.gpus[h].graphics]

    def nvmlDeviceGetP2PStatus(self, a: int, b: int, index: int) -> int:
        if not self.p2p_supported:
            raise NVMLErrorNotSupported("Not Supported")
        assert index == self.NVML_P2P_CAPS_INDEX_NVLINK
        linked = (a, b) in self.nvlinked or (b, a) in self.nvlinked
        return self.NVML_P2P_STATUS_OK if linked else self.NVML_P2P_STATUS_NOT_SUPPORTED

    def nvmlDeviceGetPciInfo(self, h: int) -> Any:
        return SimpleNamespace(busId=self.gpus[h].bus_id)

    def nvmlDeviceGetNvLinkState(self, h: int, link: int) -> int:
        if link >= len(self.gpus[h].links):
            raise NVMLErrorNotSupported("Not Supported")
        return self.NVML_FEATURE_ENABLED

    def nvmlDeviceGetNvLinkRemotePciInfo(self, h: int, link: int) -> Any:
        return SimpleNamespace(busId=self.gpus[h].links[link])


def h100(index: int, **kw: Any) -> FakeGpu:
    return FakeGpu(
        uuid=f"GPU-{index:08d}",
        name="NVIDIA H100 80GB HBM3",
        total=81559 * MIB,
        used=kw.pop("used", 0),
        **kw,
    )


def test_nvml_figures_become_the_inventory_with_jobs_told_from_foreign_processes() -> None:
    nvml = FakeNvml(
        [
            h100(
                0,
                used=1024 * MIB,
                util=87,
                temperature=61,
                milliwatts=312_500,
                compute=[(100, 900 * MIB), (200, None)],
                graphics=[(100, 900 * MIB)],
            ),
            FakeGpu(
                uuid="GPU-b",
                name=b"Tesla T4",
                total=15360 * MIB,
                used=5 * MIB,
                milliwatts=None,
                compute=[(300, 2**64 - 1)],
            ),
        ]
    )
    with GpuProbe(hostname="gpu-host", nvml=nvml) as probe:
        inventory = probe.inventory({100: "job-1", 200: "job-1"})
    assert probe.reason is None
    assert inventory.simulated is False
    assert inventory.hostname == "gpu-host"
    first, second = inventory.gpus
    assert (first.index, first.uuid, first.model) == (0, "GPU-00000000", "NVIDIA H100 80GB HBM3")
    assert (first.memory_total_mib, first.memory_used_mib) == (81559, 1024)
    assert (first.utilization_pct, first.temperature_c, first.power_w) == (87.0, 61.0, 312.5)
    assert [(p.pid, p.used_memory_mib, p.job_id) for p in first.processes] == [
        (100, 900, "job-1"),  # in both lists: one process
        (200, 0, "job-1"),  # NVML could not say how much
    ]
    assert not first.busy_foreign
    assert second.model == "Tesla T4"
    assert second.power_w is None  # not supported by this GPU: unknown, not zero
    assert [(p.pid, p.used_memory_mib, p.job_id) for p in second.processes] == [(300, 0, None)]
    assert second.busy_foreign
    assert inventory.millicores > 0
    assert inventory.memory_mib > 0


def test_nvml_is_initialised_once_and_shut_down_once() -> None:
    nvml = FakeNvml([h100(0)])
    probe = GpuProbe(nvml=nvml)
    for _ in range(5):
        probe.inventory()
    probe.close()
    probe.close()
    assert (nvml.inits, nvml.shutdowns) == (1, 1)
    assert probe.inventory().gpus == []  # after close: nothing claimed


def test_gpus_linked_by_nvlink_form_interconnect_groups() -> None:
    nvml = FakeNvml([h100(i) for i in range(6)], nvlinked={(0, 1), (1, 2), (3, 4)})
    with GpuProbe(nvml=nvml) as probe:
        assert probe.inventory().interconnect_groups == [[0, 1, 2], [3, 4]]


def test_without_p2p_status_the_links_remote_ends_give_the_topology() -> None:
    gpus = [h100(i, bus_id=f"00000000:{0x10 * (i + 1):02X}:00.0") for i in range(3)]
    gpus[0].links = ["0000:20:00.0", "0000:ff:00.0"]  # to GPU 1, and to an NVSwitch-like end
    gpus[1].links = ["0000:10:00.0"]
    nvml = FakeNvml(gpus, p2p_supported=False)
    with GpuProbe(nvml=nvml) as probe:
        assert probe.inventory().interconnect_groups == [[0, 1]]


def test_without_topology_from_nvml_there_are_no_groups() -> None:
    nvml = FakeNvml([h100(0), h100(1)], p2p_supported=False)
    with GpuProbe(nvml=nvml) as probe:
        assert probe.inventory().interconnect_groups == []


def test_a_host_whose_nvml_sees_no_gpu_offers_cpu_slots_and_says_why() -> None:
    nvml = FakeNvml([])
    probe = GpuProbe(nvml=nvml)
    inventory = probe.inventory()
    assert inventory.gpus == []
    assert inventory.millicores > 0
    assert probe.reason is not None
    assert "no GPU" in probe.reason
    assert nvml.shutdowns == 1


def test_a_host_without_the_nvidia_driver_offers_cpu_slots_and_says_why() -> None:
    probe = GpuProbe(nvml=FakeNvml([], init_error="NVML Shared Library Not Found"))
    assert probe.inventory().gpus == []
    assert probe.reason is not None
    assert "NVML Shared Library Not Found" in probe.reason
    assert "CPU slots" in probe.reason


def test_this_machines_real_nvml_path() -> None:
    """The real pynvml: on a host without a driver, CPU slots and a reason; on a GPU host,
    every GPU NVML counts."""
    pynvml: Any = importlib.import_module("pynvml")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        count = 0
    else:
        count = pynvml.nvmlDeviceGetCount()
        pynvml.nvmlShutdown()
    inventory = read_inventory({os.getpid(): "me"})
    assert len(inventory.gpus) == count
    assert inventory.simulated is False
    assert inventory.millicores >= 1000
    assert inventory.memory_mib > 0
    assert inventory.cpu_pct is not None
    if count == 0:
        probe = GpuProbe()
        assert probe.reason is not None
        assert "CPU slots" in probe.reason


def test_simulated_gpus_are_stable_marked_and_grouped_in_two_halves() -> None:
    four = simulated_inventory(4, "host-a")
    again = simulated_inventory(4, "host-a")
    other = simulated_inventory(4, "host-b")
    assert four.simulated is True
    assert [g.uuid for g in four.gpus] == [g.uuid for g in again.gpus]
    assert len({g.uuid for g in four.gpus} | {g.uuid for g in other.gpus}) == 8
    assert {(g.model, g.memory_total_mib) for g in four.gpus} == {
        (SIMULATED_MODEL, SIMULATED_MEMORY_MIB)
    }
    assert four.interconnect_groups == [[0, 1], [2, 3]]
    assert simulated_inventory(3, "h").interconnect_groups == []
    assert simulated_inventory(1, "h").interconnect_groups == []
    assert all(g.utilization_pct == 0.0 and not g.processes for g in four.gpus)


async def test_simulated_gpus_of_a_running_job_show_its_real_cpu_and_memory() -> None:
    burn = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import time\nend = time.time() + 20\nwhile time.time() < end: pass"
    )
    try:
        probe = GpuProbe(simulated_gpus=4, hostname="sim")
        assert probe.simulated is True
        job_pids = {burn.pid: "job-1"}
        gpu_jobs = {0: "job-1", 1: "job-1"}
        probe.inventory(job_pids, gpu_jobs)  # the first look has no interval to measure
        await asyncio.sleep(0.3)
        inventory = await asyncio.to_thread(probe.inventory, job_pids, gpu_jobs)
    finally:
        burn.kill()
        await burn.wait()
    busy, also_busy, idle, _ = inventory.gpus
    assert busy.utilization_pct is not None
    assert busy.utilization_pct > 5
    assert busy.memory_used_mib > 0
    assert also_busy.utilization_pct == busy.utilization_pct
    assert [(p.pid, p.job_id) for p in busy.processes] == [(burn.pid, "job-1")]
    assert not busy.busy_foreign
    assert (idle.utilization_pct, idle.memory_used_mib, idle.processes) == (0.0, 0, [])


@given(st.integers(0, 12), st.lists(st.tuples(st.integers(0, 11), st.integers(0, 11))))
def test_interconnect_groups_are_disjoint_and_keep_linked_gpus_together(
    count: int, links: list[tuple[int, int]]
) -> None:
    groups = interconnect_groups(count, links)
    members = [gpu for group in groups for gpu in group]
    assert len(members) == len(set(members))
    assert all(len(group) >= 2 and group == sorted(group) for group in groups)
    group_of = {gpu: i for i, group in enumerate(groups) for gpu in group}
    for a, b in links:
        if a < count and b < count and a != b:
            assert group_of[a] == group_of[b]


@pytest.mark.parametrize(
    ("text", "millicores"),
    [("max 100000", None), ("200000 100000", 2000), ("50000 100000", 500), ("150000", 1500)],
)
def test_a_cgroup_cpu_limit_caps_the_offered_cpu(text: str, millicores: int | None) -> None:
    assert cgroup_cpu_millicores(text) == millicores


def test_a_cgroup_memory_limit_is_read() -> None:
    assert cgroup_memory_bytes("max\n") is None
    assert cgroup_memory_bytes("8589934592\n") == 8 * 1024**3


def executable(path: Path) -> None:
    path.write_text("#!/bin/sh\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_python_versions_are_the_python3_x_executables_on_path(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    executable(a / "python3.12")
    executable(b / "python3.9")
    executable(b / "python3.12")
    executable(b / "python3")  # no minor version: not counted
    (b / "python3.13").write_text("not executable")
    path = os.pathsep.join([str(a), str(b), str(tmp_path / "missing")])
    assert find_python_versions(path) == ["3.9", "3.12"]


def test_horovod_is_a_capability_when_horovodrun_is_on_path(tmp_path: Path) -> None:
    assert "horovod" not in find_capabilities(str(tmp_path))
    executable(tmp_path / "horovodrun")
    assert "horovod" in find_capabilities(str(tmp_path))
