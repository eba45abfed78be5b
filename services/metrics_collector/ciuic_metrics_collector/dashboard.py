"""The live web dashboard (default port 8050): runs, a run's live curves, several runs overlaid.

It is a gRPC client of the scheduler (runs, stages, jobs, trials) and of the metrics collector
(curves, summaries, the live stream), so it could run anywhere; the metrics collector serves it.

    stop = await serve_dashboard("0.0.0.0", 8050, metrics_target="127.0.0.1:50055",
                                 scheduler_target="127.0.0.1:50052")
    ...
    await stop()

Pages (static files in `dashboard_static/`, charts drawn by plotly.js, served from the installed
`plotly` wheel so nothing is fetched from a CDN):
    /                        runs with their state and stages (auto-refresh)
    /runs/<run_id>           a run: stages, jobs, trials, live training and system curves
    /compare?runs=a,b,c      several runs' curves overlaid, with their summaries
JSON, used by the pages (errors: `{"error": {"code": ..., "message": ...}}`):
    /api/runs                            ?state=&repository=&page_size=&page_token=
    /api/runs/<id>                       a run with its stages, jobs and trials
    /api/runs/<id>/curves                ?max_points=&keys=a,b&jobs=a,b
    /api/runs/<id>/stream                server-sent events: the points stored from now on
                                         (StreamMetrics with `FROM_NOW`: a new trial whole)
    /api/summaries                       ?runs=a,b&keys=a,b
Values that JSON cannot carry (NaN, ±inf) travel as the strings "NaN", "Infinity", "-Infinity";
the pages draw them as gaps with a marker, never drop them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any, Final

import grpc
from aiohttp import web
from google.protobuf.json_format import MessageToDict
from google.protobuf.timestamp_pb2 import Timestamp

from ciuic_common.errors import ConfigError
from ciuic_common.logging import get_logger
from ciuic_common.proto import (
    common_pb2,
    metrics_collector_pb2,
    metrics_collector_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)
from ciuic_common.rpc import channel
from ciuic_metrics_collector.streams import FROM_NOW

__all__ = ["DEFAULT_PORT", "RunningDashboard", "build_app", "series_json", "serve_dashboard"]

log = get_logger(__name__)

DEFAULT_PORT: Final = 8050
STATIC_DIR: Final = Path(__file__).resolve().parent / "dashboard_static"
PAGES: Final = {"index": "index.html", "run": "run.html", "compare": "compare.html"}

#: Points per curve when the page does not say; the most it may ask for.
DEFAULT_MAX_POINTS: Final = 1000
MAX_MAX_POINTS: Final = 10_000
#: Runs on one comparison page; each is one GetCurves call.
MAX_COMPARED_RUNS: Final = 12
#: A comment line on an idle event stream: proxies keep it open and a gone browser is noticed.
HEARTBEAT_S: Final = 15.0
#: How long the browser waits before reconnecting a dropped event stream.
RECONNECT_MS: Final = 3000
#: Deadline of each unary call to the services (the stream has none: it lives as long as the page).
CALL_TIMEOUT_S: Final = 10.0


_HTTP_STATUS: Final = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


# --- JSON shapes (pure) ---------------------------------------------------------------------


def json_number(value: float) -> float | str:
    """`value`, or "NaN"/"Infinity"/"-Infinity" for what JSON cannot carry (the page turns them
    back with `Number(...)`)."""
    if math.isfinite(value):
        return value
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def timestamp_ms(ts: Timestamp) -> int | None:
    """Milliseconds since the epoch, or None for an unset timestamp."""
    if ts.seconds == 0 and ts.nanos == 0:
        return None
    return ts.seconds * 1000 + ts.nanos // 1_000_000


def series_json(
    series: metrics_collector_pb2.Series, after_step: int | None = None
) -> dict[str, Any]:
    """One series as the pages read it: parallel arrays of steps, values and times (ms); only
    the points after `after_step` when it is given."""
    points = list(series.points)
    if after_step is not None:
        points = [p for p in points if p.step > after_step]
    return {
        "run_id": series.run_id,
        "job_id": series.job_id,
        "key": series.key,
        "source": series.source,
        "total_points": series.total_points,
        "downsampled": series.downsampled,
        "steps": [p.step for p in points],
        "values": [json_number(p.value) for p in points],
        "times": [timestamp_ms(p.time) for p in points],
    }


def summary_json(summary: metrics_collector_pb2.Summary) -> dict[str, Any]:
    """One series' summary (last, min, max, counts)."""
    return {
        "run_id": summary.run_id,
        "job_id": summary.job_id,
        "key": summary.key,
        "source": summary.source,
        "last": json_number(summary.last),
        "min": json_number(summary.min),
        "max": json_number(summary.max),
        "count": summary.count,
        "nan_count": summary.nan_count,
        "first_step": summary.first_step,
        "last_step": summary.last_step,
    }


def message_json(message: Any) -> dict[str, Any]:
    """A scheduler message (run, trial) as JSON with the proto's field names."""
    result: dict[str, Any] = MessageToDict(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
    )
    return result


def sse_event(event: str, data: Any, event_id: str | None = None) -> bytes:
    """One server-sent event; `data` is JSON on a single line."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    body = json.dumps(data, separators=(",", ":"), allow_nan=False)
    return f"{head}event: {event}\ndata: {body}\n\n".encode()


def split_list(raw: str | None) -> list[str]:
    """`a,b,,c ` -> ["a", "b", "c"]."""
    return [part.strip() for part in (raw or "").split(",") if part.strip()]


# --- HTTP edge ------------------------------------------------------------------------------


class BadRequest(Exception):
    """A query parameter is malformed; answered 400 with the message."""


def error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def grpc_error(exc: grpc.aio.AioRpcError, service: str) -> web.Response:
    """The HTTP answer for a failed call to `service`: its status mapped, its message kept."""
    code = exc.code()
    status = _HTTP_STATUS.get(code, 502)
    if status >= 500:
        log.warning(
            "dashboard_upstream_failed", service=service, code=code.name, error=exc.details()
        )
    return error(status, code.name.lower(), f"{service}: {exc.details() or code.name}")


def int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be an integer, not {raw!r}") from None
    if not low <= value <= high:
        raise BadRequest(f"{name} must be between {low} and {high}, not {value}")
    return value


@web.middleware
async def errors_as_json(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every failure answers with the one JSON error shape (pages get HTML as usual)."""
    try:
        return await handler(request)
    except BadRequest as exc:
        return error(400, "invalid_argument", str(exc))
    except web.HTTPException as exc:
        if exc.status >= 400 and request.path.startswith("/api/"):
            return error(exc.status, exc.reason.lower().replace(" ", "_"), exc.text or exc.reason)
        raise


class Clients:
    """The dashboard's gRPC stubs. Streams get a channel without a default deadline (a deadline
    in the service config caps every call on the channel, and a stream lives with its page)."""

    def __init__(self, metrics_target: str, scheduler_target: str) -> None:
        self._channels = [
            channel(metrics_target, timeout=CALL_TIMEOUT_S),
            channel(metrics_target, timeout=None),
            channel(scheduler_target, timeout=CALL_TIMEOUT_S),
        ]
        unary, streams, scheduler = self._channels
        self.metrics = metrics_collector_pb2_grpc.MetricsServiceStub(unary)
        self.metrics_streams = metrics_collector_pb2_grpc.MetricsServiceStub(streams)
        self.scheduler = scheduler_pb2_grpc.SchedulerServiceStub(scheduler)

    async def close(self) -> None:
        for chan in self._channels:
            await chan.close()


def plotly_js() -> Path:
    """plotly.min.js from the installed `plotly` wheel (the platform runs offline: no CDN)."""
    path = Path(str(resources.files("plotly") / "package_data" / "plotly.min.js"))
    if not path.is_file():
        raise ConfigError(f"plotly.min.js is missing from the plotly package (looked at {path})")
    return path


def build_app(clients: Clients) -> web.Application:
    """The aiohttp application: pages, static files and the JSON/SSE API over `clients`."""
    plotly_path = plotly_js()
    open_streams: set[asyncio.Task[Any]] = set()

    def page(name: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        path = STATIC_DIR / PAGES[name]

        async def handler(request: web.Request) -> web.StreamResponse:
            return web.FileResponse(path)

        return handler

    async def plotly(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(plotly_path)

    async def revalidate(request: web.Request, response: web.StreamResponse) -> None:
        # Pages and scripts are revalidated (Last-Modified/ETag, answered 304 when unchanged),
        # so an upgraded dashboard reaches open browsers at once; API answers are never cached.
        response.headers.setdefault("Cache-Control", "no-cache")

    async def list_runs(request: web.Request) -> web.StreamResponse:
        call = scheduler_pb2.ListRunsRequest(
            page=common_pb2.PageRequest(
                page_size=int_param(request, "page_size", 50, 1, 500),
                page_token=request.query.get("page_token", ""),
            ),
            repository=request.query.get("repository", ""),
            state=request.query.get("state", ""),
        )
        try:
            answer = await clients.scheduler.ListRuns(call)
        except grpc.aio.AioRpcError as exc:
            return grpc_error(exc, "scheduler")
        return web.json_response(
            {
                "runs": [message_json(run) for run in answer.runs],
                "next_page_token": answer.page.next_page_token,
            }
        )

    async def get_run(request: web.Request) -> web.StreamResponse:
        run_id = request.match_info["run_id"]
        try:
            run = await clients.scheduler.GetRun(scheduler_pb2.GetRunRequest(run_id=run_id))
            trials = await clients.scheduler.ListTrials(
                scheduler_pb2.ListTrialsRequest(run_id=run.id)
            )
        except grpc.aio.AioRpcError as exc:
            return grpc_error(exc, "scheduler")
        body = message_json(run)
        body["trials"] = [message_json(trial) for trial in trials.trials]
        body["objective"] = trials.objective
        return web.json_response(body)

    async def curves(request: web.Request) -> web.StreamResponse:
        call = metrics_collector_pb2.GetCurvesRequest(
            run_id=request.match_info["run_id"],
            keys=split_list(request.query.get("keys")),
            job_ids=split_list(request.query.get("jobs")),
            max_points=int_param(request, "max_points", DEFAULT_MAX_POINTS, 2, MAX_MAX_POINTS),
        )
        try:
            answer = await clients.metrics.GetCurves(call)
        except grpc.aio.AioRpcError as exc:
            return grpc_error(exc, "metrics_collector")
        return web.json_response({"series": [series_json(s) for s in answer.series]})

    async def summaries(request: web.Request) -> web.StreamResponse:
        run_ids = split_list(request.query.get("runs"))
        if not run_ids or len(run_ids) > MAX_COMPARED_RUNS:
            raise BadRequest(f"runs must name 1 to {MAX_COMPARED_RUNS} runs, comma-separated")
        call = metrics_collector_pb2.GetSummariesRequest(
            run_ids=run_ids, keys=split_list(request.query.get("keys"))
        )
        try:
            answer = await clients.metrics.GetSummaries(call)
        except grpc.aio.AioRpcError as exc:
            return grpc_error(exc, "metrics_collector")
        return web.json_response({"summaries": [summary_json(s) for s in answer.summaries]})

    async def stream(request: web.Request) -> web.StreamResponse:
        run_id = request.match_info["run_id"]
        # From now: each series after its last stored step, a new trial from its first point.
        call = metrics_collector_pb2.StreamMetricsRequest(
            run_id=run_id, keys=split_list(request.query.get("keys")), after_step=FROM_NOW
        )
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                # nginx and friends would otherwise hold events back in their buffers.
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        task = asyncio.current_task()
        assert task is not None  # a request handler always runs in a task
        open_streams.add(task)
        try:
            await relay(clients, call, response)
        except ConnectionResetError:
            log.debug("dashboard_stream_closed_by_browser", run_id=run_id)
        finally:
            open_streams.discard(task)
        return response

    async def stop_streams(app: web.Application) -> None:
        # Event streams never end on their own; end them so shutdown does not wait for them.
        for task in list(open_streams):
            task.cancel()

    app = web.Application(middlewares=[errors_as_json], client_max_size=64 * 1024)
    app.on_shutdown.append(stop_streams)
    app.on_response_prepare.append(revalidate)
    app.router.add_get("/", page("index"))
    app.router.add_get("/runs/{run_id}", page("run"))
    app.router.add_get("/compare", page("compare"))
    app.router.add_get("/static/vendor/plotly.min.js", plotly)
    app.router.add_static("/static/", STATIC_DIR, append_version=False)
    app.router.add_get("/api/runs", list_runs)
    app.router.add_get("/api/runs/{run_id}", get_run)
    app.router.add_get("/api/runs/{run_id}/curves", curves)
    app.router.add_get("/api/runs/{run_id}/stream", stream)
    app.router.add_get("/api/summaries", summaries)
    app.router.add_get("/healthz", healthz)
    return app


async def healthz(request: web.Request) -> web.StreamResponse:
    return web.json_response({"status": "ok"})


#: What the stream reader hands the writer: an update, the error that ended the stream, or None
#: when the stream ended normally.
_StreamItem = metrics_collector_pb2.MetricsUpdate | Exception | None


async def relay(
    clients: Clients,
    call: metrics_collector_pb2.StreamMetricsRequest,
    response: web.StreamResponse,
) -> None:
    """Relay the points stored from now on to the browser as `metrics` events, with heartbeats
    while idle; updates that queued up while the browser was slow go out as one event.

    The call asks StreamMetrics for points from now (`FROM_NOW`: each series after its last
    stored step, a series that appears later, a new trial, from its first point). `subscribed`
    is sent once the stream has fixed those starting points (its initial metadata): the page
    reads the curves after it, so between the curves and the events no point is missing (the
    page drops repeats). As a safeguard against a stream that replays stored points anyway,
    points at or before the last step a series had before we subscribed are dropped here. A
    failed call ends with an `upstream_error` event (as does a draining metrics collector, with
    UNAVAILABLE), and the browser reconnects after RECONNECT_MS."""
    await response.write(f"retry: {RECONNECT_MS}\n\n".encode())
    try:
        stored = await clients.metrics.GetSummaries(
            metrics_collector_pb2.GetSummariesRequest(run_ids=[call.run_id], keys=call.keys)
        )
    except grpc.aio.AioRpcError as exc:
        await response.write(_upstream_error(call.run_id, exc))
        return
    seen = {(s.job_id, s.key): s.last_step for s in stored.summaries if s.count}
    # Bounded: a browser that reads slowly slows the gRPC stream (flow control), not our memory.
    queue: asyncio.Queue[_StreamItem] = asyncio.Queue(maxsize=64)
    stream_call = clients.metrics_streams.StreamMetrics(call)

    async def read() -> None:
        try:
            async for update in stream_call:
                await queue.put(update)
        except Exception as exc:  # handed to the writer, which reports it
            await queue.put(exc)
        else:
            await queue.put(None)

    reader = asyncio.create_task(read())
    try:
        try:
            # Sent once the stream's starting points are fixed; a call that fails first ends,
            # and the reader hands its error on.
            await asyncio.wait_for(stream_call.initial_metadata(), CALL_TIMEOUT_S)
        except TimeoutError:
            log.warning("dashboard_stream_not_started", run_id=call.run_id)
            detail = {
                "code": "deadline_exceeded",
                "message": f"metrics_collector: the stream did not start in {CALL_TIMEOUT_S:g}s",
            }
            await response.write(sse_event("upstream_error", detail))
            return
        await response.write(sse_event("subscribed", {"run_id": call.run_id}))
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), HEARTBEAT_S)
            except TimeoutError:
                await response.write(b": keepalive\n\n")
                continue
            # The reader puts an end (None or an exception) last, after every update.
            items = [item, *_drain(queue)]
            series = [
                series_json(s, after_step=seen.get((s.job_id, s.key)))
                for update in items
                if isinstance(update, metrics_collector_pb2.MetricsUpdate)
                for s in update.series
            ]
            series = [s for s in series if s["steps"]]
            if series:
                await response.write(sse_event("metrics", {"series": series}))
            end = items[-1]
            if end is None:
                await response.write(sse_event("end", {"run_id": call.run_id}))
                return
            if isinstance(end, grpc.aio.AioRpcError):
                await response.write(_upstream_error(call.run_id, end))
                return
            if isinstance(end, Exception):
                raise end
    finally:
        stream_call.cancel()
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


def _upstream_error(run_id: str, exc: grpc.aio.AioRpcError) -> bytes:
    code, details = exc.code(), exc.details()
    log.warning("dashboard_stream_failed", run_id=run_id, code=code.name, error=details)
    detail = {"code": code.name.lower(), "message": f"metrics_collector: {details}"}
    return sse_event("upstream_error", detail)


def _drain(queue: asyncio.Queue[_StreamItem]) -> list[_StreamItem]:
    items: list[_StreamItem] = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


class RunningDashboard:
    """A started dashboard: call it (`await stop()`) to stop; `port` is the bound port."""

    def __init__(self, runner: web.AppRunner, clients: Clients, host: str, port: int) -> None:
        self._runner = runner
        self._clients = clients
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        return f"http://{host}:{self.port}"

    async def __call__(self) -> None:
        """Stop serving: end the event streams, close the listener and the gRPC channels."""
        await self._runner.cleanup()
        await self._clients.close()
        log.info("dashboard_stopped")


async def serve_dashboard(
    host: str, port: int, *, metrics_target: str, scheduler_target: str
) -> RunningDashboard:
    """Serve the dashboard on host:port (0 picks a free port, see `.port`); returns the stop
    function."""
    clients = Clients(metrics_target, scheduler_target)
    # A short grace: event streams are ended on shutdown, and page loads are quick.
    runner = web.AppRunner(build_app(clients), access_log=None, shutdown_timeout=5.0)
    try:
        await runner.setup()
        await web.TCPSite(runner, host, port, reuse_port=False).start()
    except BaseException:
        await runner.cleanup()
        await clients.close()
        raise
    bound = int(runner.addresses[0][1]) if port == 0 else port
    dashboard = RunningDashboard(runner, clients, host, bound)
    log.info("dashboard_listening", url=dashboard.url)
    return dashboard
