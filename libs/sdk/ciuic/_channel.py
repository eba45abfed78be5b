"""The channel from training code to its agent: JSON lines over a Unix stream socket."""

from __future__ import annotations

import atexit
import json
import numbers
import os
import socket
import threading
import time
from collections.abc import Mapping

ENV_SOCKET = "CIUIC_METRICS_SOCKET"

_lock = threading.Lock()
_sock: socket.socket | None = None
_connected_to: str | None = None
_steps: dict[str, int] = {}


def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    return sock


def log(metrics: Mapping[str, float], step: int | None = None) -> None:
    """Record metric values at `step` (default: one past the last step of each key).

    NaN and infinities are sent as they are: a diverging loss is worth seeing.
    """
    global _sock, _connected_to
    points: list[dict[str, object]] = []
    now = time.time()
    for key, value in metrics.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"metric names are non-empty strings, got {key!r}")
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__}")
        s = step if step is not None else _steps.get(key, -1) + 1
        if not isinstance(s, int) or s < 0:
            raise ValueError(f"step must be a non-negative int, got {s!r}")
        _steps[key] = s
        points.append({"key": key, "step": s, "value": float(value), "ts": now})
    path = os.environ.get(ENV_SOCKET)
    if not path or not points:
        return
    # allow_nan: JSON's NaN/Infinity extensions, which the agent reads back as floats.
    payload = "".join(json.dumps(p, allow_nan=True) + "\n" for p in points).encode()
    with _lock:
        if _sock is None or _connected_to != path:
            _sock, _connected_to = _connect(path), path
        try:
            _sock.sendall(payload)
        except OSError:
            # The agent restarted its end: reconnect once, then let a second failure raise.
            _sock.close()
            _sock = _connect(path)
            _sock.sendall(payload)


def close() -> None:
    """Flush and close the channel (also done at interpreter exit)."""
    global _sock, _connected_to
    with _lock:
        if _sock is not None:
            _sock.close()
        _sock, _connected_to = None, None


atexit.register(close)
