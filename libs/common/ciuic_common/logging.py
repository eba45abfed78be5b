"""structlog set up once per process: JSON lines in services, readable lines for people.

Context bound with `bind(run_id=...)` travels with the task (contextvars) into every log line,
including those of the standard library loggers that FastStream, asyncpg and grpc use.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal

import structlog
from structlog.typing import Processor

__all__ = ["bind", "configure_logging", "get_logger", "unbind"]

_SHARED: list[Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    structlog.processors.StackInfoRenderer(),
]


def configure_logging(
    fmt: Literal["json", "console"] = "json",
    level: str = "INFO",
    *,
    service: str | None = None,
    stream: Any = None,
) -> None:
    """Route structlog and the standard library's logging through one renderer."""
    renderer: Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
        exc: list[Processor] = [structlog.processors.dict_tracebacks]
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=stream is None and sys.stderr.isatty())
        exc = []

    structlog.configure(
        processors=[
            *_SHARED,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_SHARED,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *exc,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Libraries that are chatty at INFO about their own internals.
    for noisy in ("asyncio", "botocore", "boto3", "s3transfer", "urllib3", "nats", "faststream"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    structlog.contextvars.clear_contextvars()
    if service:
        structlog.contextvars.bind_contextvars(service=service)


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    """A logger; bind context with `.bind(...)` or `bind(...)` for the whole task."""
    return structlog.stdlib.get_logger(name)


def bind(**values: Any) -> None:
    """Bind key-value pairs to every log line of the current task (and tasks it creates)."""
    structlog.contextvars.bind_contextvars(**values)


def unbind(*keys: str) -> None:
    """Remove keys bound with `bind`."""
    structlog.contextvars.unbind_contextvars(*keys)
