"""What this host has and offers: GPUs from NVML, CPU and memory, capabilities, Pythons.

`GpuProbe` opens NVML once (`nvmlInit` at creation, `nvmlShutdown` at `close()`), reads what does
not change (count, uuids, models, memory sizes, NVLink topology) once, and on each
`inventory(job_pids)` only the live figures: memory used, utilisation, temperature, power and the
processes on each GPU. NVML calls block (a few ms in all): call it from a thread.

Processes are attributed to jobs through `job_pids` (pid -> job_id: every live process of the
process groups the agent started); any other process on a GPU has `job_id` None, which makes
the GPU `busy_foreign` and keeps the scheduler off it. NVML reports pids of the host's pid
namespace: an agent in a container needs the host's (`pid: host`) to recognise its own jobs.

Without the NVML library, or with no GPU, the probe offers CPU slots only (`gpus` empty) and
says why in `reason` (and in the log).

`GpuProbe(simulated_gpus=n)` / `simulated_inventory(n, hostname)` describe n simulated GPUs for
tests and demos, marked `simulated=True`. What is real there: the host's CPU, memory,
capabilities and Pythons, and the jobs' processes. What is not: the GPUs themselves (model
"Simulated GPU", 80 GiB each, uuids derived from hostname and index, two NVLink groups of n/2).
Their live figures follow the job each is assigned to (`gpu_jobs`): utilisation is the CPU the
job's processes really use (100 % per busy core, shared over its GPUs, capped at 100), memory
used is their resident memory shared the same way; temperature and power are not reported.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import re
import shutil
import socket
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psutil

from ciuic_common.events import GpuInfo, GpuProcess, Inventory
from ciuic_common.logging import get_logger
from ciuic_gpu_agent.sysmetrics import ProcessTreeUsage

__all__ = [
    "SIMULATED_MEMORY_MIB",
    "SIMULATED_MODEL",
    "GpuProbe",
    "HostFacts",
    "JobLoad",
    "cgroup_cpu_millicores",
    "cgroup_memory_bytes",
    "find_capabilities",
    "find_python_versions",
    "interconnect_groups",
    "read_host_facts",
    "read_inventory",
    "simulated_inventory",
    "simulated_uuid",
]

log = get_logger(__name__)

MIB = 1024 * 1024
SIMULATED_MODEL = "Simulated GPU"
SIMULATED_MEMORY_MIB = 80 * 1024
_SIM_NAMESPACE = uuid.UUID("6f1b3f0e-2f5d-4c59-9d0e-6c6975696300")
#: NVML's "not available" for a process's memory (NVML_VALUE_NOT_AVAILABLE, unsigned -1).
_NOT_AVAILABLE = 2**64 - 1

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# The host
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HostFacts:
    """What the host offers that does not change while the agent runs."""

    millicores: int
    memory_mib: int
    capabilities: tuple[str, ...]
    python_versions: tuple[str, ...]


def cgroup_cpu_millicores(cpu_max: str) -> int | None:
    """The CPU limit in a cgroup v2 `cpu.max` file ("200000 100000" -> 2000), None if "max"."""
    parts = cpu_max.split()
    if not parts or parts[0] == "max":
        return None
    period = int(parts[1]) if len(parts) > 1 else 100_000
    return max(1, int(parts[0]) * 1000 // period)


def cgroup_memory_bytes(memory_max: str) -> int | None:
    """The memory limit in a cgroup `memory.max` file, None if "max"."""
    text = memory_max.strip()
    return None if not text or text == "max" else int(text)


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def _host_millicores() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    millicores = (cpus or 1) * 1000
    cpu_max = _read("/sys/fs/cgroup/cpu.max")
    limit = cgroup_cpu_millicores(cpu_max) if cpu_max else None
    if limit is None:  # cgroup v1
        quota, period = (
            _read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"),
            _read("/sys/fs/cgroup/cpu/cpu.cfs_period_us"),
        )
        if quota and period and int(quota) > 0:
            limit = cgroup_cpu_millicores(f"{int(quota)} {int(period)}")
    return min(millicores, limit) if limit else millicores


def _host_memory_bytes() -> int:
    total = psutil.virtual_memory().total
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        text = _read(path)
        if text:
            limit = cgroup_memory_bytes(text)
            if limit is not None and limit < total:  # v1 says "no limit" with a huge number
                return limit
    return total


def find_capabilities(path: str | None = None) -> list[str]:
    """`ddp` when torch.distributed is importable (found, never imported), `horovod` when
    `horovodrun` is on PATH."""
    found = []
    spec = importlib.util.find_spec("torch")  # the top-level package only: no import
    locations = spec.submodule_search_locations if spec is not None else None
    if locations and any((Path(p) / "distributed" / "__init__.py").exists() for p in locations):
        found.append("ddp")
    if shutil.which("horovodrun", path=path) is not None:
        found.append("horovod")
    return found


_PYTHON = re.compile(r"^python(3\.\d+)$")


def find_python_versions(path: str | None = None) -> list[str]:
    """The `python3.X` executables on PATH, as versions ("3.11"), oldest first."""
    versions: set[str] = set()
    for directory in (path if path is not None else os.environ.get("PATH", "")).split(os.pathsep):
        try:
            names = os.listdir(directory or ".")
        except OSError:
            continue
        for name in names:
            match = _PYTHON.match(name)
            full = os.path.join(directory, name)
            if match and os.path.isfile(full) and os.access(full, os.X_OK):
                versions.add(match.group(1))
    return sorted(versions, key=lambda v: tuple(int(x) for x in v.split(".")))


def read_host_facts() -> HostFacts:
    """CPU (millicores, within the cgroup's limit), memory, capabilities and Pythons."""
    return HostFacts(
        millicores=_host_millicores(),
        memory_mib=_host_memory_bytes() // MIB,
        capabilities=tuple(find_capabilities()),
        python_versions=tuple(find_python_versions()),
    )


def _host_live() -> tuple[float, int]:
    memory = psutil.virtual_memory()
    return psutil.cpu_percent(interval=None), (memory.total - memory.available) // MIB


# ---------------------------------------------------------------------------------------------
# Topology
# ---------------------------------------------------------------------------------------------
def interconnect_groups(count: int, linked: Iterable[tuple[int, int]]) -> list[list[int]]:
    """GPUs `0..count-1` joined by `linked` pairs, as groups of two or more (connected
    components), each sorted, ordered by their first GPU."""
    parent = list(range(count))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in linked:
        if 0 <= a < count and 0 <= b < count:
            parent[root(a)] = root(b)
    members: dict[int, list[int]] = {}
    for i in range(count):
        members.setdefault(root(i), []).append(i)
    return sorted((g for g in members.values() if len(g) > 1), key=lambda g: g[0])


# ---------------------------------------------------------------------------------------------
# Simulation
# ---------------------------------------------------------------------------------------------
def simulated_uuid(hostname: str, index: int) -> str:
    """A stable uuid for simulated GPU `index` of `hostname`."""
    return f"GPU-{uuid.uuid5(_SIM_NAMESPACE, f'{hostname}/{index}')}"


@dataclass(frozen=True)
class JobLoad:
    """What one job's processes really use, driving its simulated GPUs."""

    pids: tuple[int, ...]
    cpu_pct: float
    rss_mib: int


def simulated_inventory(
    n: int,
    hostname: str,
    *,
    address: str = "127.0.0.1",
    gpu_jobs: Mapping[int, str] | None = None,
    loads: Mapping[str, JobLoad] | None = None,
    host: HostFacts | None = None,
) -> Inventory:
    """An inventory of `n` simulated GPUs (see the module docstring), marked simulated.

    `gpu_jobs` (GPU index -> job_id) and `loads` (job_id -> its measured use) drive the live
    figures; without them every GPU is idle.
    """
    if n < 0:
        raise ValueError(f"a host cannot have {n} GPUs")
    gpu_jobs, loads = gpu_jobs or {}, loads or {}
    host = host or read_host_facts()
    gpus_of: dict[str, int] = {}
    for assigned in gpu_jobs.values():
        gpus_of[assigned] = gpus_of.get(assigned, 0) + 1
    gpus = []
    for index in range(n):
        job_id = gpu_jobs.get(index)
        load = loads.get(job_id) if job_id is not None else None
        utilization, used, processes = 0.0, 0, []
        if job_id is not None and load is not None:
            share = gpus_of[job_id]
            utilization = min(100.0, load.cpu_pct / share)
            used = min(SIMULATED_MEMORY_MIB, load.rss_mib // share)
            if load.pids:
                processes = [GpuProcess(pid=min(load.pids), used_memory_mib=used, job_id=job_id)]
        gpus.append(
            GpuInfo(
                index=index,
                uuid=simulated_uuid(hostname, index),
                model=SIMULATED_MODEL,
                memory_total_mib=SIMULATED_MEMORY_MIB,
                memory_used_mib=used,
                utilization_pct=utilization,
                processes=processes,
            )
        )
    half = n // 2
    groups = [list(range(half)), list(range(half, n))] if n >= 2 and n % 2 == 0 else []
    cpu_pct, memory_used = _host_live()
    return Inventory(
        hostname=hostname,
        address=address,
        simulated=True,
        gpus=gpus,
        interconnect_groups=groups,
        millicores=host.millicores,
        memory_mib=host.memory_mib,
        capabilities=list(host.capabilities),
        python_versions=list(host.python_versions),
        cpu_pct=cpu_pct,
        memory_used_mib=memory_used,
    )


# ---------------------------------------------------------------------------------------------
# The probe
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Gpu:
    index: int
    handle: Any
    uuid: str
    model: str
    memory_total_mib: int


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class GpuProbe:
    """The host's inventory, from NVML or simulated; see the module docstring.

    `nvml` is the `pynvml` module (imported when not given: tests pass a stand-in).
    """

    def __init__(
        self,
        *,
        hostname: str | None = None,
        address: str = "127.0.0.1",
        simulated_gpus: int | None = None,
        nvml: Any = None,
    ) -> None:
        self.hostname = hostname or socket.gethostname()
        self.address = address
        self.simulated = simulated_gpus is not None
        self.simulated_gpus = simulated_gpus or 0
        #: Why this host offers no GPU (shown to people), None when it has GPUs.
        self.reason: str | None = None
        self.host = read_host_facts()
        self._nvml: Any = None
        self._gpus: list[_Gpu] = []
        self._groups: list[list[int]] = []
        self._lock = threading.Lock()
        self._loads: dict[str, ProcessTreeUsage] = {}
        self._failing: set[tuple[int, str]] = set()  # (gpu, query) already logged as failing
        _host_live()  # psutil's first cpu_percent has no interval to measure: prime it
        if self.simulated:
            if self.simulated_gpus == 0:
                self.reason = "simulated with 0 GPUs: offering CPU slots only"
        else:
            self._open_nvml(nvml)
        if self.reason:
            log.warning("gpu_inventory_cpu_only", reason=self.reason)
        elif self.simulated:
            log.info("gpu_inventory_simulated", gpus=self.simulated_gpus, model=SIMULATED_MODEL)
        else:
            log.info(
                "gpu_inventory_opened",
                gpus=len(self._gpus),
                models=sorted({g.model for g in self._gpus}),
                interconnect_groups=self._groups,
            )

    # -- NVML --------------------------------------------------------------------------------
    def _open_nvml(self, nvml: Any) -> None:
        if nvml is None:
            try:
                nvml = importlib.import_module("pynvml")
            except ImportError as error:
                self.reason = f"the NVML bindings (nvidia-ml-py) are not installed: {error}"
                return
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as error:
            self.reason = (
                f"NVML is not available ({_text(error)}): no NVIDIA driver "
                "(libnvidia-ml.so) on this host; offering CPU slots only"
            )
            return
        self._nvml = nvml
        try:
            count = int(nvml.nvmlDeviceGetCount())
            for index in range(count):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                self._gpus.append(
                    _Gpu(
                        index=index,
                        handle=handle,
                        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                        model=_text(nvml.nvmlDeviceGetName(handle)),
                        memory_total_mib=int(memory.total) // MIB,
                    )
                )
        except nvml.NVMLError as error:
            self.close()
            self._gpus = []
            self.reason = f"NVML could not list the GPUs ({_text(error)}); offering CPU slots only"
            return
        if not self._gpus:
            self.close()
            self.reason = "NVML found no GPU on this host; offering CPU slots only"
            return
        self._groups = self._nvlink_groups()

    def _nvlink_groups(self) -> list[list[int]]:
        """GPUs linked by NVLink, from NVML's P2P status, else from each link's remote end."""
        nvml, gpus = self._nvml, self._gpus
        linked: list[tuple[int, int]] = []
        answered = False
        nvlink = getattr(nvml, "NVML_P2P_CAPS_INDEX_NVLINK", None)
        if nvlink is not None and hasattr(nvml, "nvmlDeviceGetP2PStatus"):
            for i, a in enumerate(gpus):
                for b in gpus[i + 1 :]:
                    try:
                        status = nvml.nvmlDeviceGetP2PStatus(a.handle, b.handle, nvlink)
                    except nvml.NVMLError:
                        continue
                    answered = True
                    if status == nvml.NVML_P2P_STATUS_OK:
                        linked.append((a.index, b.index))
        if not answered:
            linked = self._links_by_remote_pci()
        return interconnect_groups(len(gpus), linked)

    def _links_by_remote_pci(self) -> list[tuple[int, int]]:
        nvml = self._nvml
        by_bus: dict[str, int] = {}
        for gpu in self._gpus:
            try:
                by_bus[_bus_id(nvml.nvmlDeviceGetPciInfo(gpu.handle).busId)] = gpu.index
            except nvml.NVMLError:
                return []
        links = []
        for gpu in self._gpus:
            for link in range(int(getattr(nvml, "NVML_NVLINK_MAX_LINKS", 18))):
                try:
                    if nvml.nvmlDeviceGetNvLinkState(gpu.handle, link) != nvml.NVML_FEATURE_ENABLED:
                        continue
                    remote = _bus_id(nvml.nvmlDeviceGetNvLinkRemotePciInfo(gpu.handle, link).busId)
                except nvml.NVMLError:
                    continue
                if remote in by_bus:
                    links.append((gpu.index, by_bus[remote]))
        return links

    def _query(self, gpu: _Gpu, what: str, call: Callable[[], T]) -> T | None:
        try:
            return call()
        except self._nvml.NVMLError as error:
            if (gpu.index, what) not in self._failing:  # once per GPU and query, not every beat
                self._failing.add((gpu.index, what))
                log.warning("nvml_query_failed", gpu=gpu.index, query=what, error=_text(error))
            return None

    def _processes(self, gpu: _Gpu, job_pids: Mapping[int, str]) -> list[GpuProcess]:
        nvml = self._nvml
        used: dict[int, int] = {}
        for what in (
            "nvmlDeviceGetComputeRunningProcesses",
            "nvmlDeviceGetGraphicsRunningProcesses",
        ):
            function = getattr(nvml, what, None)
            if function is None:
                continue
            for proc in self._query(gpu, what, functools.partial(function, gpu.handle)) or []:
                memory = getattr(proc, "usedGpuMemory", None)
                mib = 0 if memory is None or memory >= _NOT_AVAILABLE else int(memory) // MIB
                pid = int(proc.pid)
                used[pid] = max(used.get(pid, 0), mib)  # a process in both lists: one context
        return [
            GpuProcess(pid=pid, used_memory_mib=mib, job_id=job_pids.get(pid))
            for pid, mib in sorted(used.items())
        ]

    def _read_gpu(self, gpu: _Gpu, job_pids: Mapping[int, str]) -> GpuInfo:
        nvml, h = self._nvml, gpu.handle
        memory = self._query(gpu, "memory", lambda: nvml.nvmlDeviceGetMemoryInfo(h))
        rates = self._query(gpu, "utilization", lambda: nvml.nvmlDeviceGetUtilizationRates(h))
        temperature = self._query(
            gpu, "temperature", lambda: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU)
        )
        milliwatts = self._query(gpu, "power", lambda: nvml.nvmlDeviceGetPowerUsage(h))
        return GpuInfo(
            index=gpu.index,
            uuid=gpu.uuid,
            model=gpu.model,
            memory_total_mib=gpu.memory_total_mib,
            memory_used_mib=int(memory.used) // MIB if memory is not None else 0,
            utilization_pct=float(rates.gpu) if rates is not None else None,
            temperature_c=float(temperature) if temperature is not None else None,
            power_w=float(milliwatts) / 1000.0 if milliwatts is not None else None,
            processes=self._processes(gpu, job_pids),
        )

    # -- public ------------------------------------------------------------------------------
    def inventory(
        self,
        job_pids: Mapping[int, str] | None = None,
        gpu_jobs: Mapping[int, str] | None = None,
    ) -> Inventory:
        """The inventory now. `job_pids`: pid -> job_id of every process the agent started;
        `gpu_jobs`: GPU index -> job_id (drives simulated GPUs; NVML sees real processes)."""
        job_pids = job_pids or {}
        with self._lock:
            if self.simulated:
                return simulated_inventory(
                    self.simulated_gpus,
                    self.hostname,
                    address=self.address,
                    gpu_jobs=gpu_jobs,
                    loads=self._measure_jobs(job_pids),
                    host=self.host,
                )
            gpus = [self._read_gpu(gpu, job_pids) for gpu in self._gpus] if self._nvml else []
        cpu_pct, memory_used = _host_live()
        return Inventory(
            hostname=self.hostname,
            address=self.address,
            simulated=False,
            gpus=gpus,
            interconnect_groups=self._groups,
            millicores=self.host.millicores,
            memory_mib=self.host.memory_mib,
            capabilities=list(self.host.capabilities),
            python_versions=list(self.host.python_versions),
            cpu_pct=cpu_pct,
            memory_used_mib=memory_used,
        )

    def _measure_jobs(self, job_pids: Mapping[int, str]) -> dict[str, JobLoad]:
        pids_of: dict[str, list[int]] = {}
        for pid, job_id in job_pids.items():
            pids_of.setdefault(job_id, []).append(pid)
        self._loads = {job: self._loads.get(job) or ProcessTreeUsage() for job in pids_of}
        loads = {}
        for job_id, pids in pids_of.items():
            usage = self._loads[job_id].measure(pids)
            loads[job_id] = JobLoad(
                pids=tuple(sorted(pids)),
                cpu_pct=usage.cpu_pct or 0.0,
                rss_mib=usage.rss_bytes // MIB,
            )
        return loads

    def close(self) -> None:
        """Release NVML (once; later inventories have no GPUs)."""
        with self._lock:
            nvml, self._nvml = self._nvml, None
            if nvml is not None:
                try:
                    nvml.nvmlShutdown()
                except nvml.NVMLError as error:
                    log.warning("nvml_shutdown_failed", error=_text(error))

    def __enter__(self) -> GpuProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _bus_id(value: Any) -> str:
    """A PCI bus id in one spelling ("00000000:3B:00.0" and "0000:3b:00.0" are the same)."""
    text = _text(value).strip().lower()
    head, _, function = text.rpartition(".")
    parts = head.split(":")
    try:
        domain, bus, device = parts if len(parts) == 3 else ["0", *parts[-2:]]
        return f"{int(domain, 16):x}:{int(bus, 16):02x}:{int(device, 16):02x}.{function}"
    except ValueError:
        return text


def read_inventory(
    job_pids: Mapping[int, str] | None = None,
    *,
    hostname: str | None = None,
    address: str = "127.0.0.1",
    nvml: Any = None,
) -> Inventory:
    """The host's inventory once (NVML opened and closed); CPU slots only, logged, without it."""
    with GpuProbe(hostname=hostname, address=address, nvml=nvml) as probe:
        return probe.inventory(job_pids)
