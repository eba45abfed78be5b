"""How the CLI reaches the services: their gRPC addresses and one call helper that turns gRPC
failures into messages a person can act on."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from ciuic_cli.stack import Stack, StackSettings
from ciuic_common.components import service as component
from ciuic_common.errors import CiuicError
from ciuic_common.rpc import channel

R = TypeVar("R")


class ApiError(CiuicError):
    """A service refused or could not answer a request."""


def address(service: str) -> str:
    """`CIUIC_<SERVICE>_ADDR`, else where `ciuic up` runs it."""
    info = component(service)
    if override := os.environ.get(f"{info.env_prefix}ADDR"):
        return override
    settings = StackSettings()
    grpc_port, _ = Stack(settings).service_ports(info)
    return f"{settings.host}:{grpc_port}"


def call(
    service: str,
    stub_type: Callable[[grpc.aio.Channel], Any],
    method: str,
    request: Any,
    *,
    timeout: float = 30.0,
) -> Any:
    """Call `method` on `service` and return the response; raise ApiError on failure."""
    target = address(service)

    async def run() -> Any:
        async with channel(target, timeout=timeout) as ch:
            return await getattr(stub_type(ch), method)(request, timeout=timeout)

    try:
        return asyncio.run(run())
    except grpc.aio.AioRpcError as exc:
        if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise ApiError(
                f"cannot reach the {service} at {target} ({exc.code().name.lower()}); is the "
                f"platform up? `ciuic status` tells, `ciuic up` starts it"
            ) from None
        raise ApiError(f"{service}: {exc.details()}") from None
