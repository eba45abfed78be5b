"""The channel from training code to its agent: JSON lines over a Unix stream socket.

Each point is one line, `{"key": ..., "step": ..., "value": ..., "ts": ...}`. Lines are kept in
memory and written by the calling thread (there is no background thread): at once when the last
write is more than `FLUSH_INTERVAL` old (so occasional points go out immediately), otherwise when
`FLUSH_BYTES` are waiting or the next call finds `FLUSH_INTERVAL` passed; `close()` and the
interpreter's exit write the rest. A process killed by a signal loses at most the last
`FLUSH_INTERVAL` of points of a fast logging loop. A forked child starts with an empty buffer and
its own connection, so parent and child never interleave half lines.
"""

from __future__ import annotations

import atexit
import json
import numbers
import os
import socket
import sys
import threading
import time
from collections.abc import Mapping

ENV_SOCKET = "CIUIC_METRICS_SOCKET"
#: Write once this many bytes are waiting...
FLUSH_BYTES = 64 * 1024
#: ...or once the oldest waiting line is this old (seconds), checked on each call.
FLUSH_INTERVAL = 0.1

_lock = threading.Lock()
_sock: socket.socket | None = None
_connected_to: str | None = None
_steps: dict[str, int] = {}
_buffer: list[str] = []
_buffered = 0  # characters waiting in _buffer
_buffer_path: str | None = None  # where the waiting lines go
_last_flush = -FLUSH_INTERVAL  # monotonic seconds
#: key -> the start of its line (the key as JSON), so each point only formats numbers.
_line_starts: dict[str, str] = {}


def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    return sock


def _number(value: float) -> str:
    # JSON's NaN/Infinity extensions (what json.dumps(allow_nan=True) writes): a diverging
    # loss is worth seeing, and the agent reads them back as floats.
    text = repr(value)
    if text[-1] == "n" or text[-1] == "f":  # 'nan', 'inf', '-inf'
        return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")
    return text


def _line_start(key: str) -> str:
    start = _line_starts.get(key)
    if start is None:
        if len(_line_starts) > 10_000:  # keys made up on the fly: keep the cache bounded
            _line_starts.clear()
        start = _line_starts[key] = '{"key": ' + json.dumps(key) + ', "step": '
    return start


def log(metrics: Mapping[str, float], step: int | None = None) -> None:
    """Record metric values at `step` (default: one past the last step of each key).

    NaN and infinities are sent as they are: a diverging loss is worth seeing.
    """
    global _buffered, _buffer_path
    path = os.environ.get(ENV_SOCKET)
    ts = repr(time.time()) if path else ""
    lines: list[str] = []
    for key, value in metrics.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"metric names are non-empty strings, got {key!r}")
        kind = type(value)
        if (kind is not float and kind is not int) and (
            isinstance(value, bool) or not isinstance(value, numbers.Real)
        ):
            raise TypeError(f"metric {key!r} must be a number, got {kind.__name__}")
        s = step if step is not None else _steps.get(key, -1) + 1
        if not isinstance(s, int) or s < 0:
            raise ValueError(f"step must be a non-negative int, got {s!r}")
        _steps[key] = s
        if path:
            lines.append(f'{_line_start(key)}{s}, "value": {_number(float(value))}, "ts": {ts}}}\n')
    if not lines:
        return
    with _lock:
        if _buffer and _buffer_path != path:
            _flush_locked()  # lines for a socket we are leaving go there first
        _buffer_path = path
        _buffer.extend(lines)
        _buffered += sum(map(len, lines)) if len(lines) > 1 else len(lines[0])
        if _buffered >= FLUSH_BYTES or time.monotonic() - _last_flush >= FLUSH_INTERVAL:
            _flush_locked()


def _flush_locked() -> None:
    global _sock, _connected_to, _buffered, _last_flush
    _last_flush = time.monotonic()
    path = _buffer_path
    if not _buffer or path is None:
        return
    payload = "".join(_buffer).encode()
    _buffer.clear()
    _buffered = 0
    if _sock is None or _connected_to != path:
        if _sock is not None:
            _sock.close()
        _sock, _connected_to = None, None
        _sock, _connected_to = _connect(path), path
    try:
        _sock.sendall(payload)
    except OSError:
        # The agent restarted its end: reconnect once, then let a second failure raise.
        _sock.close()
        _sock, _connected_to = None, None
        _sock, _connected_to = _connect(path), path
        _sock.sendall(payload)


def close() -> None:
    """Flush and close the channel (also done at interpreter exit)."""
    global _sock, _connected_to
    with _lock:
        try:
            _flush_locked()
        finally:
            if _sock is not None:
                _sock.close()
            _sock, _connected_to = None, None


def _close_at_exit() -> None:
    try:
        close()
    except OSError as error:
        # No traceback at exit, but never a silent loss: the job's log says what happened.
        sys.stderr.write(f"ciuic: could not send the last metrics to the agent: {error}\n")


def _forget_in_child() -> None:
    # The parent owns the waiting lines and its connection; the child starts afresh.
    global _lock, _sock, _connected_to, _buffered, _buffer_path
    _lock = threading.Lock()
    if _sock is not None:
        _sock.close()  # the child's copy of the descriptor; the parent's stays open
    _sock, _connected_to = None, None
    _buffer.clear()
    _buffered, _buffer_path = 0, None


atexit.register(_close_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)
