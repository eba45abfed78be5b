"""gRPC for ciuic: the server every service runs, the interceptors that carry the cross-cutting
concerns (logging, error mapping), and the client side (channels with retries, health probes).

    server = GrpcServer("scheduler", "127.0.0.1", 50052)
    server.add(add_SchedulerServiceServicer_to_server, api, "ciuic.v1.SchedulerService")
    port = await server.start()
    ...
    await server.stop(grace=10)

Servicers stay thin: they raise the errors of `ciuic_common.errors` and the interceptors turn them
into status codes; they never log or catch for the sake of the wire. Servicer methods are async
(coroutines, or async generators for streamed responses): a plain function would block the loop.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import datetime
from typing import Any, Literal

import grpc
import structlog
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from ciuic_common.errors import (
    AlreadyExists,
    CiuicError,
    ConfigError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)

__all__ = [
    "ErrorInterceptor",
    "GrpcServer",
    "HealthStatus",
    "LoggingInterceptor",
    "channel",
    "health_check",
    "health_check_sync",
    "status_code_for",
    "timestamp",
]

log = structlog.get_logger(__name__)

#: What `health_check` answers: a serving status from the server, or UNREACHABLE.
HealthStatus = Literal["SERVING", "NOT_SERVING", "UNKNOWN", "SERVICE_UNKNOWN", "UNREACHABLE"]

#: A generated `add_<Service>Servicer_to_server(servicer, server)` function.
Register = Callable[[Any, Any], None]

# Clients ping while calls are open, so a long stream to a dead peer (a crashed agent, a dropped
# NAT entry) fails in seconds instead of hanging. A server answers pings more frequent than it
# allows with GOAWAY, so it must allow at least the client's rate: both sides live here.
_KEEPALIVE_TIME_MS = 20_000
_KEEPALIVE_TIMEOUT_MS = 10_000
_CLIENT_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", _KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", _KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.enable_retries", 1),
    # Our service config must win over one a DNS resolver might supply.
    ("grpc.service_config_disable_resolution", 1),
]
_SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", _KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", _KEEPALIVE_TIME_MS // 2),
    # grpc sets SO_REUSEPORT by default on Linux, so a second copy of a service would quietly
    # share the port and take half the calls; we want its start to fail instead.
    ("grpc.so_reuseport", 0),
]

# gRPC caps attempts at 5 whatever the config says; refusing more beats silently ignoring them.
_MAX_RETRIES = 4

_CODES: dict[type[CiuicError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    # A missing or wrong setting on the server: the caller cannot fix it, but the message names
    # the setting, which is what the person reading the error needs.
    ConfigError: grpc.StatusCode.FAILED_PRECONDITION,
}

# Codes that mean the caller asked for something that cannot be done; the rest mean we failed.
_CALLER_CODES = frozenset(
    {
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)

# Probes call these every few seconds; an info line each would drown the service's own logs.
_QUIET_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

_HEALTH_NAMES: dict[int, HealthStatus] = {
    health_pb2.HealthCheckResponse.SERVING: "SERVING",
    health_pb2.HealthCheckResponse.NOT_SERVING: "NOT_SERVING",
    health_pb2.HealthCheckResponse.UNKNOWN: "UNKNOWN",
    health_pb2.HealthCheckResponse.SERVICE_UNKNOWN: "SERVICE_UNKNOWN",
}


def timestamp(value: datetime | None) -> Timestamp | None:
    """A datetime as a protobuf Timestamp for a response message (None stays unset)."""
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def status_code_for(error: CiuicError) -> grpc.StatusCode:
    """The gRPC status code for a domain error (its nearest mapped base class decides)."""
    for cls in type(error).__mro__:
        if cls in _CODES:
            return _CODES[cls]
    return grpc.StatusCode.UNKNOWN


# -- server side ------------------------------------------------------------------------------


class GrpcServer:
    """A grpc.aio server with health checking, reflection and ciuic's interceptors."""

    def __init__(
        self,
        name: str,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    ) -> None:
        self.name = name
        self.host = host
        #: The requested port until `start()`, the bound one after (0 asks for a free port).
        self.port = port
        # Logging outermost, so it records the status the error mapping settled on; `interceptors`
        # (auth, say) run inside both, so their failures are logged and mapped like any other.
        self._interceptors = [LoggingInterceptor(), ErrorInterceptor(), *interceptors]
        self._services: list[tuple[Register, Any, str]] = []
        self._server: grpc.aio.Server | None = None
        self._health: health_aio.HealthServicer | None = None

    @property
    def address(self) -> str:
        """`host:port` for clients; the bound port once started."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def service_names(self) -> list[str]:
        """Full names of the services added with `add`, e.g. `ciuic.v1.SchedulerService`."""
        return [name for _, _, name in self._services]

    def add(self, register: Register, servicer: Any, service_full_name: str) -> None:
        """Serve `servicer`, registered by `register` (a generated `add_XServicer_to_server`)."""
        if self._server is not None:
            raise RuntimeError(f"gRPC server {self.name} is running; add services before start()")
        if service_full_name in self.service_names:
            raise ValueError(f"service {service_full_name} is added twice")
        self._services.append((register, servicer, service_full_name))

    async def start(self) -> int:
        """Bind, start serving, report SERVING; returns the bound port."""
        if self._server is not None:
            raise RuntimeError(f"gRPC server {self.name} is started already")
        server = grpc.aio.server(interceptors=self._interceptors, options=_SERVER_OPTIONS)
        for register, servicer, _ in self._services:
            register(servicer, server)
        health_servicer = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
        )
        requested = self.address
        try:
            port = int(server.add_insecure_port(requested))
        except RuntimeError:  # grpc raises on a failed bind; older releases returned 0
            port = 0
        if port == 0:
            await server.stop(None)  # a server never started still holds resources
            raise ConfigError(
                f"gRPC server {self.name} cannot listen on {requested} (port in use or host not "
                "local?); choose another with CIUIC_GRPC_HOST / CIUIC_GRPC_PORT"
            )
        self.port = port
        self._health = health_servicer
        # A probe that arrives mid-start sees NOT_SERVING, not a half-registered server.
        await self.set_serving(False)
        await server.start()
        self._server = server
        await self.set_serving(True)
        log.info(
            "grpc_started", server=self.name, address=self.address, services=self.service_names
        )
        return port

    async def set_serving(self, serving: bool) -> None:
        """Report SERVING or NOT_SERVING for the server ("") and every added service."""
        if self._health is None:
            raise RuntimeError(f"gRPC server {self.name} is not started")
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self.service_names):
            await self._health.set(name, status)

    async def stop(self, grace: float | None = 5.0) -> None:
        """Report NOT_SERVING for good, refuse new RPCs, and give in-flight ones `grace` seconds."""
        if self._server is None or self._health is None:
            return
        # Permanent: a later set_serving(True) cannot flip a draining server back.
        await self._health.enter_graceful_shutdown()
        log.info("grpc_stopping", server=self.name, grace=grace)
        await self._server.stop(grace)
        self._server = None
        log.info("grpc_stopped", server=self.name)


#: Opens the context one RPC runs in, given its servicer context.
_Around = Callable[[Any], AbstractAsyncContextManager[None]]


class _AroundInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc has no stubs
    """Runs every RPC, of any of the four kinds, inside the context manager `around`."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None:  # unknown method: grpc answers UNIMPLEMENTED itself
            return None
        return _wrap(handler, functools.partial(self.around, details.method))

    def around(self, method: str, context: Any) -> AbstractAsyncContextManager[None]:
        """The context one RPC runs in (the whole stream, for streaming responses)."""
        raise NotImplementedError


class LoggingInterceptor(_AroundInterceptor):
    """One `rpc` log line per call with method, code and duration; failures at warning/error."""

    @asynccontextmanager
    async def around(self, method: str, context: Any) -> AsyncIterator[None]:
        started = time.perf_counter()
        code = grpc.StatusCode.UNKNOWN
        try:
            yield
        except (asyncio.CancelledError, GeneratorExit):  # the client went away or gave up
            code = grpc.StatusCode.CANCELLED
            raise
        except BaseException:
            # An abort (ours or the servicer's) has set the code on the context.
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        else:
            code = context.code() or grpc.StatusCode.OK
        finally:
            duration_ms = round((time.perf_counter() - started) * 1000, 3)
            if code == grpc.StatusCode.OK:
                emit = log.debug if method.startswith(_QUIET_PREFIXES) else log.info
            elif code in _CALLER_CODES:
                emit = log.warning
            else:
                emit = log.error
            emit("rpc", method=method, code=code.name, duration_ms=duration_ms)


class ErrorInterceptor(_AroundInterceptor):
    """Turns domain errors into status codes with their message, anything else into INTERNAL."""

    @asynccontextmanager
    async def around(self, method: str, context: Any) -> AsyncIterator[None]:
        try:
            yield
        except grpc.aio.AbortError:
            raise  # the servicer chose a status itself
        except CiuicError as exc:
            await context.abort(status_code_for(exc), str(exc))
        except NotImplementedError:
            # What generated servicer base classes raise for an RPC nobody implemented yet.
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented")
        except Exception as exc:
            # The traceback stays in our logs; the client learns only that it was our fault.
            log.exception("rpc_failed", method=method, error=repr(exc))
            await context.abort(grpc.StatusCode.INTERNAL, "internal error (see the server log)")


def _wrap(handler: Any, around: _Around) -> Any:
    """A copy of `handler` whose behaviour runs inside `around(context)`."""
    codec = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(_unary(handler.unary_unary, around), **codec)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(_unary(handler.stream_unary, around), **codec)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _streaming(handler.unary_stream, around), **codec
        )
    return grpc.stream_stream_rpc_method_handler(_streaming(handler.stream_stream, around), **codec)


def _unary(behaviour: Callable[[Any, Any], Any], around: _Around) -> Callable[[Any, Any], Any]:
    async def call(request: Any, context: Any) -> Any:
        async with around(context):
            response = behaviour(request, context)
            return await response if inspect.isawaitable(response) else response

    return call


def _streaming(
    behaviour: Callable[[Any, Any], Any], around: _Around
) -> Callable[[Any, Any], AsyncIterator[Any]]:
    async def call(request: Any, context: Any) -> AsyncIterator[Any]:
        async with around(context):
            responses = behaviour(request, context)
            if inspect.isawaitable(responses):
                await responses  # a writer-style servicer: it sends with context.write()
            elif hasattr(responses, "__aiter__"):
                async for response in responses:
                    yield response
            else:
                for response in responses:
                    yield response

    return call


# -- client side ------------------------------------------------------------------------------


def channel(
    target: str,
    *,
    timeout: float | None = 10.0,
    retries: int = 3,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """An insecure grpc.aio channel to `target` ("host:port") with a default per-call deadline
    of `timeout` seconds and up to `retries` retries of UNAVAILABLE, with exponential backoff."""
    if not 0 <= retries <= _MAX_RETRIES:
        raise ValueError(f"retries must be between 0 and {_MAX_RETRIES}, not {retries}")
    if timeout is not None and timeout <= 0:
        raise ValueError(f"timeout must be positive or None, not {timeout}")
    config = [("grpc.service_config", _service_config(timeout, retries))]
    return grpc.aio.insecure_channel(target, options=[*_CLIENT_OPTIONS, *config, *options])


def _service_config(timeout: float | None, retries: int) -> str:
    # `"name": [{}]` matches every method of every service on the channel.
    method: dict[str, Any] = {"name": [{}]}
    if timeout is not None:
        method["timeout"] = f"{timeout:.6f}s"
    if retries:
        method["retryPolicy"] = {
            "maxAttempts": retries + 1,
            "initialBackoff": "0.1s",
            "maxBackoff": "5s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
    return json.dumps({"methodConfig": [method]})


async def health_check(
    target: str,
    service: str = "",
    timeout: float = 2.0,  # noqa: ASYNC109  (the RPC's own deadline, not a wait of ours)
) -> HealthStatus:
    """Ask the server at `target` how `service` ("" for the whole server) is; never raises."""
    request = health_pb2.HealthCheckRequest(service=service)
    # No retries: a probe reports what it finds now, within its timeout.
    async with channel(target, timeout=None, retries=0) as ch:
        try:
            response = await health_pb2_grpc.HealthStub(ch).Check(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            return _health_failure(target, exc.code())
    return _HEALTH_NAMES.get(response.status, "UNKNOWN")


def health_check_sync(target: str, service: str = "", timeout: float = 2.0) -> HealthStatus:
    """`health_check` for code without an event loop (the CLI)."""
    request = health_pb2.HealthCheckRequest(service=service)
    with grpc.insecure_channel(target) as ch:
        try:
            response = health_pb2_grpc.HealthStub(ch).Check(request, timeout=timeout)
        except grpc.RpcError as exc:
            return _health_failure(target, exc.code())
    return _HEALTH_NAMES.get(response.status, "UNKNOWN")


def _health_failure(target: str, code: grpc.StatusCode) -> HealthStatus:
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return "UNREACHABLE"
    if code == grpc.StatusCode.NOT_FOUND:  # the server runs, but not that service
        return "SERVICE_UNKNOWN"
    # Reachable but unable to say (no health service, say): the caller decides what that means.
    log.debug("health_check_failed", target=target, code=code.name)
    return "UNKNOWN"
