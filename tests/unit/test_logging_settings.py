"""Settings come from CIUIC_* variables; services log JSON lines with their bound context."""

from __future__ import annotations

import io
import json
import logging

import pytest

from ciuic_common.logging import bind, configure_logging, get_logger, unbind
from ciuic_common.settings import ServiceSettings


def test_settings_read_the_ciuic_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CIUIC_NATS_URL", "nats://bus:4222")
    monkeypatch.setenv("CIUIC_GRPC_PORT", "6000")
    monkeypatch.setenv("NATS_URL", "nats://ignored:1")
    settings = ServiceSettings()
    assert settings.nats_url == "nats://bus:4222"
    assert settings.grpc_port == 6000


def test_a_wrong_setting_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CIUIC_GRPC_PORT", "not-a-port")
    with pytest.raises(ValueError, match="grpc_port"):
        ServiceSettings()


def test_the_s3_secret_never_shows_in_a_repr() -> None:
    assert "ciuic-local-secret" not in repr(ServiceSettings())


def test_services_log_json_lines_with_bound_context() -> None:
    stream = io.StringIO()
    configure_logging("json", "INFO", service="scheduler", stream=stream)
    try:
        bind(run_id="r-42")
        get_logger("test").info("job_placed", job_id="j-1", gpus=[0, 1])
        logging.getLogger("thirdparty").warning("from the standard library")
        unbind("run_id")
        get_logger("test").info("after")
    finally:
        configure_logging("console", "WARNING")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines[0]["event"] == "job_placed"
    assert lines[0]["run_id"] == "r-42"
    assert lines[0]["service"] == "scheduler"
    assert lines[0]["gpus"] == [0, 1]
    assert lines[1]["event"] == "from the standard library"
    assert lines[1]["run_id"] == "r-42", "stdlib loggers get the bound context too"
    assert "run_id" not in lines[2]


def test_console_format_is_readable_not_json() -> None:
    stream = io.StringIO()
    configure_logging("console", "INFO", stream=stream)
    try:
        get_logger("test").info("hello", who="you")
    finally:
        configure_logging("console", "WARNING")
    text = stream.getvalue()
    assert "hello" in text
    assert "who=you" in text
    assert not text.lstrip().startswith("{")
