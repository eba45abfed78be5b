"""What every real server we run from a PyPI wheel has in common: how it is found, prepared,
started, probed and stopped. Used by the test fixtures and by the `ciuic up` launcher."""

from __future__ import annotations

import abc
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from ciuic_common.errors import CiuicError


class ServerError(CiuicError):
    """A local server could not be prepared, started or stopped; the message names the fix."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on host:port and it can be bound."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def tcp_accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when a TCP connection to host:port succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def venv_binary(name: str) -> Path | None:
    """The executable `name` installed beside this interpreter (a wheel's script), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return beside
    found = shutil.which(name)
    return Path(found) if found else None


def ensure_system_user(name: str) -> pwd.struct_passwd:
    """The system user `name`, created when missing (needs root)."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    try:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        raise ServerError(f"cannot create the system user {name!r}: {detail.strip()}") from exc
    return pwd.getpwnam(name)


def make_traversable(path: Path) -> None:
    """Let other users traverse (not list) every directory above `path`."""
    for parent in path.resolve().parents:
        mode = parent.stat().st_mode
        if mode & 0o001 == 0:
            parent.chmod(mode | 0o001)


@dataclass(frozen=True)
class Port:
    """A port a server binds, named for error messages (`s3`, `master`, ...)."""

    purpose: str
    number: int


@dataclass
class LocalServer(abc.ABC):
    """A real server process from a PyPI wheel, configured to live under `data_dir`."""

    data_dir: Path
    port: int
    host: str = "127.0.0.1"
    extra_env: Mapping[str, str] = field(default_factory=dict)

    #: Component name shown to people: `nats`, `postgres`, `s3`.
    component: str = field(init=False, default="server")
    #: Seconds to wait after SIGTERM before SIGKILL.
    stop_timeout: float = field(init=False, default=20.0)
    #: Seconds a fresh start may take before it counts as failed.
    start_timeout: float = field(init=False, default=60.0)
    #: The signal that asks for a clean, prompt shutdown.
    stop_signal: signal.Signals = field(init=False, default=signal.SIGTERM)

    @abc.abstractmethod
    def binary(self) -> Path:
        """The server executable; raises ServerError naming the package to install."""

    @abc.abstractmethod
    def command(self) -> list[str]:
        """The argv that runs the server in the foreground."""

    @abc.abstractmethod
    def ports(self) -> list[Port]:
        """Every port the server binds (checked before start)."""

    @abc.abstractmethod
    def is_ready(self) -> bool:
        """A quick probe: True once the server serves requests."""

    @property
    @abc.abstractmethod
    def url(self) -> str:
        """The address clients use."""

    def prepare(self) -> None:
        """Create directories and initialise data on first use; idempotent."""
        self.data_dir.mkdir(parents=True, exist_ok=True)

    def env(self) -> dict[str, str]:
        """The environment of the server process."""
        return {**os.environ, **self.extra_env}

    def after_stop(self) -> None:  # noqa: B027 - a hook; most servers leave nothing behind
        """Clean up what the stopped server leaves outside `data_dir`; idempotent."""

    def run_as(self) -> str | None:
        """The system user the process must run as, or None for the current one."""
        return None

    def identity(self) -> dict[str, Any]:
        """Popen keyword arguments that run a child as `run_as()` with only that user's group."""
        user = self.run_as()
        if user is None:
            return {}
        account = pwd.getpwnam(user)
        return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}

    def check_ports(self) -> None:
        """Raise ServerError naming the component, the port and the fix if a port is taken."""
        for port in self.ports():
            if not port_is_free(port.number, self.host):
                raise ServerError(
                    f"{self.component}: port {port.number} ({port.purpose}) on {self.host} is "
                    f"already in use; stop what listens there (`ss -ltnp 'sport = :{port.number}'`)"
                    f" or choose another port with the {self.component} port setting"
                )

    def spawn(self, log_path: Path) -> subprocess.Popen[bytes]:
        """Start the server detached in its own session, logging to `log_path`."""
        self.check_ports()
        self.prepare()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            return subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env(),
                cwd=self.data_dir,
                **self.identity(),
                start_new_session=True,
            )

    def wait_ready(
        self, alive: Callable[[], bool], log_path: Path, timeout: float | None = None
    ) -> None:
        """Poll until ready; raise ServerError with the log's tail if it dies or times out."""
        deadline = time.monotonic() + (timeout or self.start_timeout)
        while time.monotonic() < deadline:
            if self.is_ready():
                return
            if not alive():
                raise ServerError(
                    f"{self.component} exited during start; last log lines:\n{tail(log_path)}"
                )
            time.sleep(0.1)
        raise ServerError(
            f"{self.component} was not ready within {timeout or self.start_timeout:.0f}s;"
            f" last log lines:\n{tail(log_path)}"
        )


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log file, or a note that it is empty."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def terminate(pid: int, timeout: float, sig: signal.Signals = signal.SIGTERM) -> bool:
    """Signal the process group of `pid`, wait up to `timeout`, then SIGKILL.

    Returns True if the process was alive.
    """
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    while pid_alive(pid):
        time.sleep(0.05)
    return True


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


class ServerProcess:
    """A LocalServer run as a child of this process (tests, benchmarks); stopped on exit."""

    def __init__(self, server: LocalServer, log_path: Path) -> None:
        self.server = server
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> ServerProcess:
        self._proc = self.server.spawn(self.log_path)
        proc = self._proc
        try:
            self.server.wait_ready(lambda: proc.poll() is None, self.log_path)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            terminate(self._proc.pid, self.server.stop_timeout, self.server.stop_signal)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=5)
        self._proc = None
        self.server.after_stop()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@contextlib.contextmanager
def running(server: LocalServer, log_path: Path) -> Iterator[ServerProcess]:
    """Run `server` for the duration of the block."""
    with ServerProcess(server, log_path) as proc:
        yield proc
