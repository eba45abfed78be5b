"""ciuic_common.rpc against a real in-process grpc.aio server on a free port."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from structlog.typing import EventDict

from ciuic_common import rpc
from ciuic_common.errors import ConfigError, InvalidArgument, NotFound, Unavailable
from ciuic_common.rpc import GrpcServer, channel, health_check, health_check_sync

SERVICE = "ciuic.test.v1.ProbeService"
SECRET = "db password is hunter2"


class Probe:
    """A servicer of raw-bytes methods that fail on demand, one per behaviour under test."""

    def __init__(self) -> None:
        self.flaky_calls = 0

    async def echo(self, request: bytes, context: Any) -> bytes:
        return request

    async def missing(self, request: bytes, context: Any) -> bytes:
        raise NotFound(f"run {request.decode()} does not exist")

    async def crash(self, request: bytes, context: Any) -> bytes:
        raise RuntimeError(SECRET)

    async def flaky(self, request: bytes, context: Any) -> bytes:
        self.flaky_calls += 1
        if self.flaky_calls < 3:
            raise Unavailable("warming up")
        return b"ok"

    async def count(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        for i in range(int(request)):
            yield str(i).encode()
        raise InvalidArgument("counted too far")

    async def write(self, request: bytes, context: Any) -> None:
        await context.write(b"a")
        await context.write(b"b")

    async def total(self, requests: AsyncIterator[bytes], context: Any) -> bytes:
        return str(sum([int(r) async for r in requests])).encode()

    async def shout(self, requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for r in requests:
            if r == b"boom":
                raise RuntimeError(SECRET)
            yield r.upper()


def add_probe(probe: Probe, server: Any) -> None:
    """What a generated add_<Service>Servicer_to_server does, without a .proto."""
    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(probe.echo),
        "Missing": grpc.unary_unary_rpc_method_handler(probe.missing),
        "Crash": grpc.unary_unary_rpc_method_handler(probe.crash),
        "Flaky": grpc.unary_unary_rpc_method_handler(probe.flaky),
        "Count": grpc.unary_stream_rpc_method_handler(probe.count),
        "Write": grpc.unary_stream_rpc_method_handler(probe.write),
        "Total": grpc.stream_unary_rpc_method_handler(probe.total),
        "Shout": grpc.stream_stream_rpc_method_handler(probe.shout),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture
async def server(probe: Probe) -> AsyncIterator[GrpcServer]:
    server = GrpcServer("probe", "127.0.0.1", 0)
    server.add(add_probe, probe, SERVICE)
    await server.start()
    yield server
    await server.stop(grace=None)


@pytest.fixture
async def client(server: GrpcServer) -> AsyncIterator[grpc.aio.Channel]:
    async with channel(server.address, timeout=5, retries=0) as ch:
        yield ch


@pytest.fixture
def logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[EventDict]]:
    with structlog.testing.capture_logs() as captured:
        # A fresh logger: the module's may be cached with processors of an earlier configure().
        monkeypatch.setattr(rpc, "log", structlog.get_logger("test"))
        yield captured


def call(ch: grpc.aio.Channel, method: str) -> Any:
    return ch.unary_unary(f"/{SERVICE}/{method}")


async def collect(stream: Any) -> tuple[list[bytes], grpc.aio.AioRpcError | None]:
    """Every item of a response stream, and the error that ended it (None if it ended well)."""
    received: list[bytes] = []
    try:
        async for item in stream:
            received.append(item)
    except grpc.aio.AioRpcError as exc:
        return received, exc
    return received, None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_start_binds_a_free_port_when_asked_for_port_0(server: GrpcServer) -> None:
    assert server.port > 0
    assert server.address == f"127.0.0.1:{server.port}"


async def test_health_reports_serving_for_the_server_and_each_service(server: GrpcServer) -> None:
    assert await health_check(server.address) == "SERVING"
    assert await health_check(server.address, SERVICE) == "SERVING"
    assert await health_check(server.address, "ciuic.v1.Nothing") == "SERVICE_UNKNOWN"


async def test_sync_health_check_probes_like_the_async_one(server: GrpcServer) -> None:
    # In a thread: the server runs on this event loop, which a blocking call would stall.
    assert await asyncio.to_thread(health_check_sync, server.address, SERVICE) == "SERVING"


async def test_set_serving_flips_health(server: GrpcServer) -> None:
    await server.set_serving(False)
    assert await health_check(server.address, SERVICE) == "NOT_SERVING"
    assert await health_check(server.address) == "NOT_SERVING"
    await server.set_serving(True)
    assert await health_check(server.address, SERVICE) == "SERVING"


async def test_health_goes_not_serving_when_stop_begins(
    server: GrpcServer, client: grpc.aio.Channel
) -> None:
    watch = health_pb2_grpc.HealthStub(client).Watch(
        health_pb2.HealthCheckRequest(service=SERVICE), timeout=5
    )
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING

    stopping = asyncio.create_task(server.stop(grace=5))
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
    watch.cancel()  # the watch is the RPC in flight; once it ends, the server stops at once
    await asyncio.wait_for(stopping, timeout=5)

    assert await health_check(server.address) == "UNREACHABLE"


async def test_reflection_lists_every_service(client: grpc.aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(client)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    responses = [r async for r in stub.ServerReflectionInfo(iter([request]))]

    names = {s.name for s in responses[0].list_services_response.service}
    assert names == {
        SERVICE,
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }


async def test_echo_passes_through_the_interceptors(client: grpc.aio.Channel) -> None:
    assert await call(client, "Echo")(b"hello") == b"hello"


async def test_not_found_becomes_not_found_with_its_message(client: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call(client, "Missing")(b"r-42")
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert raised.value.details() == "run r-42 does not exist"


async def test_unexpected_error_becomes_internal_and_stays_in_the_server_log(
    client: grpc.aio.Channel, logs: list[EventDict]
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call(client, "Crash")(b"")
    assert raised.value.code() == grpc.StatusCode.INTERNAL
    details = raised.value.details() or ""
    assert "Traceback" not in details
    assert "RuntimeError" not in details
    assert SECRET not in details
    assert "hunter2" not in raised.value.debug_error_string()

    failed = [e for e in logs if e["event"] == "rpc_failed"]
    assert len(failed) == 1
    assert failed[0]["method"] == f"/{SERVICE}/Crash"
    assert failed[0]["exc_info"] is True


async def test_every_call_is_logged_with_its_code(
    client: grpc.aio.Channel, logs: list[EventDict]
) -> None:
    await call(client, "Echo")(b"")
    with pytest.raises(grpc.aio.AioRpcError):
        await call(client, "Missing")(b"r-1")
    with pytest.raises(grpc.aio.AioRpcError):
        await call(client, "Crash")(b"")

    rpcs = [
        (e["method"].rsplit("/", 1)[1], e["code"], e["log_level"])
        for e in logs
        if e["event"] == "rpc"
    ]
    assert rpcs == [
        ("Echo", "OK", "info"),
        ("Missing", "NOT_FOUND", "warning"),
        ("Crash", "INTERNAL", "error"),
    ]
    assert all(e["duration_ms"] >= 0 for e in logs if e["event"] == "rpc")


async def test_server_streaming_sends_items_then_maps_the_error(client: grpc.aio.Channel) -> None:
    received, error = await collect(client.unary_stream(f"/{SERVICE}/Count")(b"3"))
    assert received == [b"0", b"1", b"2"]
    assert error is not None
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "counted too far"


async def test_writer_style_streaming_servicers_work_too(client: grpc.aio.Channel) -> None:
    stream = client.unary_stream(f"/{SERVICE}/Write")(b"")
    assert [item async for item in stream] == [b"a", b"b"]


async def test_client_streaming_is_intercepted(client: grpc.aio.Channel) -> None:
    assert await client.stream_unary(f"/{SERVICE}/Total")(iter([b"1", b"2", b"3"])) == b"6"


async def test_bidirectional_streaming_maps_errors(client: grpc.aio.Channel) -> None:
    received, error = await collect(
        client.stream_stream(f"/{SERVICE}/Shout")(iter([b"hi", b"boom"]))
    )
    assert received == [b"HI"]
    assert error is not None
    assert error.code() == grpc.StatusCode.INTERNAL
    assert SECRET not in (error.details() or "")


async def test_client_retries_unavailable(server: GrpcServer, probe: Probe) -> None:
    async with channel(server.address, timeout=5, retries=3) as ch:
        assert await call(ch, "Flaky")(b"") == b"ok"
    assert probe.flaky_calls == 3


async def test_client_without_retries_sees_unavailable(server: GrpcServer, probe: Probe) -> None:
    async with channel(server.address, timeout=5, retries=0) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call(ch, "Flaky")(b"")
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert probe.flaky_calls == 1


async def test_client_default_timeout_becomes_the_deadline(server: GrpcServer) -> None:
    async def slow(request: bytes, context: Any) -> bytes:
        await asyncio.sleep(5)
        return request

    slow_server = GrpcServer("slow")
    slow_server.add(
        lambda _, s: s.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(slow)}
                ),
            )
        ),
        None,
        SERVICE,
    )
    await slow_server.start()
    try:
        async with channel(slow_server.address, timeout=0.2, retries=0) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call(ch, "Echo")(b"")
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        await slow_server.stop(grace=None)


def test_channel_refuses_more_retries_than_grpc_allows() -> None:
    with pytest.raises(ValueError, match="retries"):
        channel("127.0.0.1:1", retries=5)


async def test_health_check_on_a_closed_port_is_unreachable() -> None:
    address = f"127.0.0.1:{free_port()}"
    assert await health_check(address, timeout=2) == "UNREACHABLE"
    assert await asyncio.to_thread(health_check_sync, address, "", 2) == "UNREACHABLE"


async def test_start_on_a_taken_port_is_a_config_error(server: GrpcServer) -> None:
    other = GrpcServer("other", "127.0.0.1", server.port)
    with pytest.raises(ConfigError, match=f"127.0.0.1:{server.port}"):
        await other.start()


def test_a_service_cannot_be_added_twice(probe: Probe) -> None:
    server = GrpcServer("probe")
    server.add(add_probe, probe, SERVICE)
    with pytest.raises(ValueError, match="twice"):
        server.add(add_probe, probe, SERVICE)


def test_domain_errors_map_to_their_status_codes() -> None:
    class SpecError(InvalidArgument):
        pass

    assert rpc.status_code_for(SpecError("bad")) == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc.status_code_for(ConfigError("x")) == grpc.StatusCode.FAILED_PRECONDITION
    assert rpc.status_code_for(Unavailable("x")) == grpc.StatusCode.UNAVAILABLE
