"""The local platform: NATS, PostgreSQL, S3 and the eight services as processes on this machine.

State lives under `CIUIC_HOME` (default `./.ciuic`):

    data/{nats,postgres,s3}/   the servers' data (kept by `down`, reused by the next `up`)
    logs/<component>.log       each component's output
    run/<component>.pid        pid and start time of each running component

Processes are started detached, each in its own session, so `ciuic up` returns while they run and
`ciuic down` can stop each whole process group.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import Field

from ciuic_common.components import INFRASTRUCTURE, SERVICES, ServiceInfo
from ciuic_common.components import service as component
from ciuic_common.db import ensure_database
from ciuic_common.errors import CiuicError
from ciuic_common.rpc import health_check_sync
from ciuic_common.servers import (
    LocalServer,
    NatsServer,
    PostgresServer,
    ServerError,
    pid_alive,
    port_is_free,
    tail,
    terminate,
)
from ciuic_common.servers.seaweedfs import S3Server
from ciuic_common.settings import LOCAL_S3_ACCESS_KEY, LOCAL_S3_SECRET_KEY, CiuicSettings

__all__ = ["Component", "ComponentStatus", "Stack", "StackError", "StackSettings"]

State = Literal["healthy", "starting", "unhealthy", "stopped"]


class StackError(CiuicError):
    """The local platform cannot be started or stopped as asked; the message names the fix."""


class StackSettings(CiuicSettings):
    """Where the local platform keeps its state and which ports it takes."""

    home: Path = Path(".ciuic")
    nats_port: int = 4222
    nats_monitor_port: int = 8222
    postgres_port: int = 5432
    s3_port: int = 8333
    #: The services' gRPC ports are consecutive from here, in DESIGN.md's order (50051 upward).
    grpc_port_base: int = SERVICES[0].grpc_port
    #: Their Prometheus metrics ports likewise.
    metrics_port_base: int = SERVICES[0].metrics_port
    #: Where git hosts deliver webhooks (the trigger's HTTP port).
    webhook_port: int = 8080
    #: The metrics collector's web dashboard.
    dashboard_port: int = 8050
    database: str = Field(default="ciuic", pattern=r"^[a-z_][a-z0-9_]*$")
    host: str = "127.0.0.1"
    #: Seconds a service may take to drain after SIGTERM before it is killed.
    shutdown_grace: float = 10.0
    #: GPU agents to run on this machine (the demo runs two, for a 2-node job).
    agents: int = Field(default=1, ge=0, le=16)
    #: Give each local agent this many simulated GPUs (shown as simulated everywhere); unset,
    #: agents report what NVML finds, or CPU slots.
    sim_gpus: int | None = Field(default=None, ge=0)


@dataclass
class ComponentStatus:
    name: str
    kind: Literal["server", "service"]
    state: State
    address: str
    pid: int | None
    uptime_s: float | None
    log: str
    detail: str = ""

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


@dataclass
class Component:
    """One process of the local platform."""

    name: str
    kind: Literal["server", "service"]
    address: str
    ports: list[int]
    stop_timeout: float
    server: LocalServer | None = None
    info: ServiceInfo | None = None
    env: dict[str, str] = field(default_factory=dict)


class Stack:
    """The local platform under one `CIUIC_HOME`."""

    def __init__(self, settings: StackSettings | None = None) -> None:
        settings = settings or StackSettings()
        self.home = settings.home.resolve()
        # The agents the platform was last brought up with, unless this command says otherwise:
        # `ciuic down` after `ciuic demo` stops the demo's second agent too.
        layout = self._layout_path()
        unset = {"agents", "sim_gpus"} - settings.model_fields_set
        if unset and layout.is_file():
            with contextlib.suppress(OSError, ValueError):
                saved = json.loads(layout.read_text())
                settings = settings.model_copy(update={k: saved[k] for k in unset if k in saved})
        self.settings = settings
        self.components = self._components()

    def _layout_path(self) -> Path:
        return self.home / "run" / "layout.json"

    # -- layout ------------------------------------------------------------------------------
    def _components(self) -> list[Component]:
        s = self.settings
        data = self.home / "data"
        servers: list[LocalServer] = [
            NatsServer(data_dir=data / "nats", port=s.nats_port, host=s.host,
                       monitor_port=s.nats_monitor_port),
            PostgresServer(data_dir=data / "postgres", port=s.postgres_port, host=s.host),
            S3Server(data_dir=data / "s3", port=s.s3_port, host=s.host),
        ]  # fmt: skip
        assert [x.component for x in servers] == [i.name for i in INFRASTRUCTURE]
        # What clients use: for PostgreSQL, the platform's database rather than the server's.
        addresses = {"postgres": self.platform_environment()["CIUIC_DATABASE_URL"]}
        components = [
            Component(
                x.component,
                "server",
                addresses.get(x.component, x.url),
                [p.number for p in x.ports()],
                x.stop_timeout,
                x,
            )
            for x in servers
        ]
        for info in SERVICES:
            for replica in range(1, (s.agents if info.name == "gpu_agent" else 1) + 1):
                grpc_port, metrics_port = self.service_ports(info, replica)
                components.append(
                    Component(
                        info.name if replica == 1 else f"{info.name}_{replica}",
                        "service",
                        f"{s.host}:{grpc_port}",
                        [grpc_port, metrics_port, *self._extra_ports(info)],
                        s.shutdown_grace + 5,
                        info=info,
                        env=self.service_environment(info, replica),
                    )
                )
        return components

    def platform_environment(self) -> dict[str, str]:
        """The `CIUIC_*` settings every service gets: where NATS, PostgreSQL and S3 are."""
        s = self.settings
        return {
            "CIUIC_HOME": str(self.home),
            "CIUIC_NATS_URL": f"nats://{s.host}:{s.nats_port}",
            "CIUIC_DATABASE_URL": f"postgresql://postgres@{s.host}:{s.postgres_port}/{s.database}",
            "CIUIC_S3_ENDPOINT": f"http://{s.host}:{s.s3_port}",
            "CIUIC_S3_ACCESS_KEY": LOCAL_S3_ACCESS_KEY,
            "CIUIC_S3_SECRET_KEY": LOCAL_S3_SECRET_KEY,
            "CIUIC_LOG_FORMAT": "json",
        }

    def service_ports(self, info: ServiceInfo, replica: int = 1) -> tuple[int, int]:
        """The gRPC and metrics ports of a service under these settings; agents after the first
        take the ports after the last service's."""
        index = SERVICES.index(info) if replica == 1 else len(SERVICES) + replica - 2
        return self.settings.grpc_port_base + index, self.settings.metrics_port_base + index

    def _extra_ports(self, info: ServiceInfo) -> list[int]:
        extra = {
            "trigger": self.settings.webhook_port,
            "metrics_collector": self.settings.dashboard_port,
        }
        return [extra[info.name]] if info.name in extra else []

    def service_environment(self, info: ServiceInfo, replica: int = 1) -> dict[str, str]:
        """The settings of one service process."""
        grpc_port, metrics_port = self.service_ports(info, replica)
        extra = {}
        if info.name == "trigger":
            extra = {
                "CIUIC_WEBHOOK_HOST": self.settings.host,
                "CIUIC_WEBHOOK_PORT": str(self.settings.webhook_port),
            }
        if info.name == "metrics_collector":
            scheduler_port, _ = self.service_ports(component("scheduler"))
            extra = {
                "CIUIC_DASHBOARD_HOST": self.settings.host,
                "CIUIC_DASHBOARD_PORT": str(self.settings.dashboard_port),
                "CIUIC_SCHEDULER_ADDR": f"{self.settings.host}:{scheduler_port}",
            }
        if info.name == "gpu_agent" and (self.settings.agents > 1 or self.settings.sim_gpus):
            # Several agents on one host: each its own name and its own caches and state.
            host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname().split(".")[0])
            agent_id = f"{host}-{replica}"
            extra = {
                "CIUIC_AGENT_ID": agent_id,
                "CIUIC_WORK_DIR": str(self.home / "agents" / agent_id),
            }
            if self.settings.sim_gpus is not None:
                extra["CIUIC_SIM_GPUS"] = str(self.settings.sim_gpus)
        return {
            **extra,
            **self.platform_environment(),
            "CIUIC_GRPC_HOST": self.settings.host,
            "CIUIC_GRPC_PORT": str(grpc_port),
            "CIUIC_METRICS_HOST": self.settings.host,
            "CIUIC_METRICS_PORT": str(metrics_port),
            "CIUIC_SHUTDOWN_GRACE": str(self.settings.shutdown_grace),
        }

    def component(self, name: str) -> Component:
        for c in self.components:
            if c.name == name.replace("-", "_"):
                return c
        names = ", ".join(c.name for c in self.components)
        raise StackError(f"no component {name!r}; the components are {names}")

    def log_path(self, c: Component) -> Path:
        return self.home / "logs" / f"{c.name}.log"

    def _pid_path(self, c: Component) -> Path:
        return self.home / "run" / f"{c.name}.pid"

    # -- process records ---------------------------------------------------------------------
    def pid(self, c: Component) -> int | None:
        """The pid of the running component, or None (stale records are ignored)."""
        try:
            record = json.loads(self._pid_path(c).read_text())
        except (OSError, ValueError):
            return None
        pid = int(record["pid"])
        if not pid_alive(pid) or _start_ticks(pid) != record.get("start_ticks"):
            return None  # the process is gone, or the pid now belongs to another one
        return pid

    def _record(self, c: Component, pid: int) -> None:
        path = self._pid_path(c)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            json.dumps({"pid": pid, "start_ticks": _start_ticks(pid), "started_at": time.time()})
        )

    def _forget(self, c: Component) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._pid_path(c).unlink()

    def _started_at(self, c: Component) -> float | None:
        try:
            return float(json.loads(self._pid_path(c).read_text())["started_at"])
        except (OSError, ValueError, KeyError):
            return None

    # -- health ------------------------------------------------------------------------------
    def healthy(self, c: Component) -> bool:
        if c.server is not None:
            return c.server.is_ready()
        return health_check_sync(c.address, timeout=1.0) == "SERVING"

    def status(self) -> list[ComponentStatus]:
        """Every component's state, address and pid."""

        def one(c: Component) -> ComponentStatus:
            pid = self.pid(c)
            started = self._started_at(c)
            if pid is None:
                state: State = "stopped"
            elif self.healthy(c):
                state = "healthy"
            else:
                state = "unhealthy"
            return ComponentStatus(
                c.name,
                c.kind,
                state,
                c.address,
                pid,
                round(time.time() - started, 1) if pid and started else None,
                str(self.log_path(c)),
            )

        with ThreadPoolExecutor(max_workers=len(self.components)) as pool:
            return list(pool.map(one, self.components))

    # -- up ----------------------------------------------------------------------------------
    def check(self) -> list[Component]:
        """The components to start; raises StackError for a missing binary or a taken port."""
        to_start = [c for c in self.components if self.pid(c) is None]
        problems = []
        for c in to_start:
            try:
                if c.server is not None:
                    c.server.binary()
                elif _script(c) is None:
                    assert c.info is not None
                    script = c.info.script
                    problems.append(f"{c.name}: {script} is not installed; run `make install`")
            except ServerError as exc:
                problems.append(str(exc))
            for port in c.ports:
                if not port_is_free(port, self.settings.host):
                    problems.append(
                        f"{c.name}: port {port} on {self.settings.host} is already in use; stop "
                        f"what listens there (`ss -ltnp 'sport = :{port}'`) or move ciuic with "
                        f"{_port_setting(c, port)}"
                    )
        if problems:
            raise StackError("\n".join(problems))
        return to_start

    def up(self, progress: Callable[[str, str], None] = lambda name, state: None) -> None:
        """Start what is not running and wait until every component is healthy."""
        to_start = self.check()
        servers = [c for c in to_start if c.kind == "server"]
        services = [c for c in to_start if c.kind == "service"]
        started: list[Component] = []
        try:
            self._start_all(servers, started, progress)
            asyncio.run(ensure_database(self.platform_environment()["CIUIC_DATABASE_URL"]))
            self._start_all(services, started, progress)
        except BaseException:
            for c in reversed(started):
                self._stop(c)
            raise
        for c in self.components:
            if c not in to_start:
                progress(c.name, "already running")
        layout = {"agents": self.settings.agents, "sim_gpus": self.settings.sim_gpus}
        self._layout_path().parent.mkdir(parents=True, exist_ok=True)
        self._layout_path().write_text(json.dumps(layout))

    def _start_all(
        self, group: list[Component], started: list[Component], progress: Callable[[str, str], None]
    ) -> None:
        for c in group:
            pid = self._spawn(c)
            started.append(c)
            progress(c.name, f"starting (pid {pid})")
        # Wait for all of them at once: the slowest (S3, ~10 s) sets the pace.
        with ThreadPoolExecutor(max_workers=max(1, len(group))) as pool:
            futures = {c.name: pool.submit(self._wait_healthy, c) for c in group}
            errors = []
            for name, future in futures.items():
                try:
                    future.result()
                    progress(name, "healthy")
                except StackError as exc:
                    progress(name, "failed")
                    errors.append(str(exc))
        if errors:
            raise StackError("\n".join(errors))

    def _spawn(self, c: Component) -> int:
        log_path = self.log_path(c)
        if c.server is not None:
            proc = c.server.spawn(log_path)
        else:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            script = _script(c)
            assert script is not None
            with log_path.open("ab") as log:
                proc = subprocess.Popen(
                    [str(script)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **c.env},
                    cwd=self.home,
                    start_new_session=True,
                )
        self._record(c, proc.pid)
        return proc.pid

    def _wait_healthy(self, c: Component) -> None:
        timeout = c.server.start_timeout if c.server else 60.0
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.pid(c) is None:
                raise StackError(
                    f"{c.name} exited during start; last lines of {self.log_path(c)}:\n"
                    f"{tail(self.log_path(c))}"
                )
            if self.healthy(c):
                return
            time.sleep(0.2)
        raise StackError(
            f"{c.name} was not healthy within {timeout:.0f}s; last lines of {self.log_path(c)}:\n"
            f"{tail(self.log_path(c))}"
        )

    # -- down --------------------------------------------------------------------------------
    def down(self, progress: Callable[[str, str], None] = lambda name, state: None) -> None:
        """Stop every component: services first (they drain), then the servers."""
        for kind in ("service", "server"):
            group = [c for c in self.components if c.kind == kind]
            with ThreadPoolExecutor(max_workers=len(group)) as pool:
                for c, was_running in zip(group, pool.map(self._stop, group), strict=True):
                    progress(c.name, "stopped" if was_running else "not running")

    def _stop(self, c: Component) -> bool:
        pid = self.pid(c)
        if pid is None:
            self._forget(c)
            return False
        if c.server is None:
            terminate(pid, c.stop_timeout)
        else:
            terminate(pid, c.stop_timeout, c.server.stop_signal)
            c.server.after_stop()
        self._forget(c)
        return True

    # -- logs --------------------------------------------------------------------------------
    def tail(self, c: Component, lines: int) -> list[str]:
        """The last `lines` lines of a component's log."""
        path = self.log_path(c)
        if not path.exists():
            raise StackError(f"{c.name} has no log yet at {path}; start it with `ciuic up`")
        return tail(path, lines).splitlines()

    def follow(self, c: Component, lines: int) -> Iterator[str]:
        """The last `lines` lines of a component's log, then new lines as they come."""
        path = self.log_path(c)
        yield from self.tail(c, lines)
        with path.open(errors="replace") as handle:
            handle.seek(0, os.SEEK_END)
            while True:
                line = handle.readline()
                if line:
                    yield line.rstrip("\n")
                else:
                    time.sleep(0.2)


def _script(c: Component) -> Path | None:
    assert c.info is not None
    beside = Path(sys.executable).parent / c.info.script
    return beside if beside.exists() else None


def _port_setting(c: Component, port: int) -> str:
    """The setting that moves `port` elsewhere."""
    if c.kind == "service":
        names = ["CIUIC_GRPC_PORT_BASE", "CIUIC_METRICS_PORT_BASE", "CIUIC_WEBHOOK_PORT"]
        return names[min(c.ports.index(port), 2)]
    if c.name == "nats" and port != c.ports[0]:
        return "CIUIC_NATS_MONITOR_PORT"
    if c.name == "s3" and port != c.ports[0]:
        return "CIUIC_S3_PORT (SeaweedFS's other ports follow it)"
    return f"CIUIC_{c.name.upper()}_PORT"


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot: tells a pid from a reused one."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(") ", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None
