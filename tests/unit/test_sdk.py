"""The SDK writes JSON lines to the agent's Unix socket and does nothing outside a job."""

from __future__ import annotations

import json
import math
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import ciuic


@pytest.fixture
def agent_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[], list[dict[str, float]]]]:
    """A real Unix socket server standing in for the agent's end; yields what it received."""
    path = tmp_path / "metrics.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen()
    received: list[dict[str, float]] = []

    def serve() -> None:
        conn, _ = server.accept()
        with conn, conn.makefile("r") as lines:
            for line in lines:
                received.append(json.loads(line))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    monkeypatch.setenv("CIUIC_METRICS_SOCKET", str(path))

    def finish() -> list[dict[str, float]]:
        """Close the channel and wait until the agent's end has read everything."""
        ciuic.close()
        thread.join(timeout=5)
        return received

    yield finish
    ciuic.close()
    server.close()


def test_log_sends_each_metric_with_its_step(
    agent_socket: Callable[[], list[dict[str, float]]],
) -> None:
    ciuic.log({"training_loss": 2.5, "accuracy": 0.5}, step=10)
    ciuic.log({"training_loss": float("nan")})  # next step of this key: 11
    received = agent_socket()
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
