"""The SDK writes JSON lines to the agent's Unix socket and does nothing outside a job."""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import ciuic


class AgentEnd:
    """A real Unix socket server standing in for the agent's end: reads every connection."""

    def __init__(self, directory: str) -> None:
        self.path = str(Path(directory) / "metrics.sock")
        self.received: list[dict[str, float]] = []
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(self.path)
        self._server.listen()
        self._server.settimeout(0.1)
        self._stop = threading.Event()
        self._readers: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            reader = threading.Thread(target=self._read, args=(conn,), daemon=True)
            reader.start()
            self._readers.append(reader)

    def _read(self, conn: socket.socket) -> None:
        with conn, conn.makefile("r") as lines:
            for line in lines:
                self.received.append(json.loads(line))

    def wait_for(self, count: int, timeout: float = 5.0) -> list[dict[str, float]]:
        """What arrived once `count` points did (or the deadline passed)."""
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.005)
        return self.received

    def finish(self) -> list[dict[str, float]]:
        """Close the SDK's channel and wait until every connection has been read to its end."""
        ciuic.close()
        self._stop.set()
        self._acceptor.join(timeout=5)
        for reader in self._readers:
            reader.join(timeout=5)
        self._server.close()
        return self.received


@contextlib.contextmanager
def agent_end() -> Iterator[AgentEnd]:
    """An AgentEnd in a short temporary directory, named in CIUIC_METRICS_SOCKET."""
    old = os.environ.get(ciuic._channel.ENV_SOCKET)
    with tempfile.TemporaryDirectory(prefix="ciuic-") as tmp:
        end = AgentEnd(tmp)
        os.environ[ciuic._channel.ENV_SOCKET] = end.path
        try:
            yield end
        finally:
            end.finish()
            if old is None:
                os.environ.pop(ciuic._channel.ENV_SOCKET, None)
            else:
                os.environ[ciuic._channel.ENV_SOCKET] = old


@pytest.fixture
def agent() -> Iterator[AgentEnd]:
    with agent_end() as end:
        yield end


def run_python(script: str, socket_path: str) -> None:
    """Run `script` in a fresh interpreter inside a 'job' whose socket is `socket_path`."""
    env = {**os.environ, ciuic._channel.ENV_SOCKET: socket_path}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=30)


def test_log_sends_each_metric_with_its_step(agent: AgentEnd) -> None:
    ciuic.log({"training_loss": 2.5, "accuracy": 0.5}, step=10)
    ciuic.log({"training_loss": float("nan")})  # next step of this key: 11
    received = agent.finish()
    keys = [(p["key"], p["step"]) for p in received]
    assert keys == [("training_loss", 10), ("accuracy", 10), ("training_loss", 11)]
    assert math.isnan(received[2]["value"])


def test_log_outside_a_job_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CIUIC_METRICS_SOCKET", raising=False)
    ciuic.log({"loss": 1.0}, step=0)  # no socket, no error


@pytest.mark.parametrize(
    ("metrics", "step", "error"),
    [({"loss": "high"}, 0, TypeError), ({"": 1.0}, 0, TypeError), ({"loss": 1.0}, -1, ValueError)],
)
def test_bad_values_are_refused_with_the_metric_named(
    metrics: dict[str, object], step: int, error: type[Exception]
) -> None:
    with pytest.raises(error):
        ciuic.log(metrics, step=step)  # type: ignore[arg-type]


def test_an_occasional_point_is_sent_at_once_without_waiting_for_close(agent: AgentEnd) -> None:
    time.sleep(ciuic._channel.FLUSH_INTERVAL)  # nothing written lately
    ciuic.log({"epoch_accuracy": 0.75}, step=1)
    received = agent.wait_for(1)  # the job keeps running: no close()
    assert [(p["key"], p["step"], p["value"]) for p in received] == [("epoch_accuracy", 1, 0.75)]
    assert received[0]["ts"] == pytest.approx(time.time(), abs=5)


def test_points_of_a_fast_loop_arrive_within_the_flush_interval(agent: AgentEnd) -> None:
    for step in range(100):
        ciuic.log({"training_loss": 1.0}, step=step)
    time.sleep(ciuic._channel.FLUSH_INTERVAL)
    ciuic.log({"training_loss": 1.0}, step=100)  # the next call finds the buffer due
    assert len(agent.wait_for(101)) == 101


def test_a_fast_loop_delivers_every_point_in_order_by_close(agent: AgentEnd) -> None:
    for step in range(20_000):
        ciuic.log({"training_loss": 1.0 / (step + 1)}, step=step)
    received = agent.finish()
    assert [p["step"] for p in received] == list(range(20_000))
    assert received[-1]["value"] == 1.0 / 20_000


@given(
    st.dictionaries(
        st.text(min_size=1, max_size=20),
        st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(2**70), 2**70),
        min_size=1,
        max_size=4,
    ),
    st.integers(0, 2**62),
)
def test_every_key_and_value_arrives_as_json_the_agent_can_read(
    metrics: dict[str, float], step: int
) -> None:
    with agent_end() as end:
        ciuic.log(metrics, step=step)
        points = end.finish()
    assert [p["key"] for p in points] == list(metrics)
    for point in points:
        sent = float(metrics[point["key"]])
        assert point["step"] == step
        assert point["value"] == sent or (math.isnan(sent) and math.isnan(point["value"]))


def test_points_still_waiting_at_exit_are_sent_without_close(agent: AgentEnd) -> None:
    run_python(
        "import ciuic\nfor s in range(1000):\n    ciuic.log({'loss': float(s)}, step=s)\n",
        agent.path,
    )
    assert [p["step"] for p in agent.finish()] == list(range(1000))


def test_a_forked_child_does_not_resend_the_parents_waiting_points(agent: AgentEnd) -> None:
    run_python(
        "import os, ciuic\n"
        "ciuic.log({'parent': 0.0}, step=0)\n"  # sent at once: opens the connection
        "ciuic.log({'parent': 1.0}, step=1)\n"  # waits in the buffer
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    ciuic.log({'child': 2.0}, step=0)\n"
        "    ciuic.close()\n"
        "    os._exit(0)\n"
        "os.waitpid(pid, 0)\n",
        agent.path,
    )
    received = agent.finish()
    assert sorted((p["key"], p["step"]) for p in received) == [
        ("child", 0),
        ("parent", 0),
        ("parent", 1),
    ]


def test_a_job_whose_agent_is_gone_says_so_at_exit(tmp_path: Path) -> None:
    env = {**os.environ, ciuic._channel.ENV_SOCKET: str(tmp_path / "nobody.sock")}
    script = (
        "import ciuic\n"
        "try:\n"
        "    ciuic.log({'loss': 1.0}, step=0)\n"
        "except OSError:\n"
        "    pass\n"
        "ciuic.log({'loss': 1.0}, step=1)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=30
    )
    # The first call writes at once and raises; the second waits in the buffer, and at exit
    # its loss is reported on stderr (the job's log) instead of a traceback.
    assert done.returncode == 0
    assert "ciuic: could not send the last metrics to the agent" in done.stderr
