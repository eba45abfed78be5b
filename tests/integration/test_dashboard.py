"""The live dashboard in a real headless Chromium (Debian's `chromium`, installed by
tools/ensure_chromium.py when missing), against in-process gRPC servers that stand in for the
scheduler and the metrics collector: the run page draws the curves, a point pushed through
StreamMetrics appears on the chart, NaN shows as a gap with a marker, and screenshots are saved
(to $CIUIC_TEST_ARTIFACTS, or the test's tmp_path; the path is printed).

The stand-ins implement our own services' APIs, so this tests the dashboard's half of them;
test_dashboard_stack.py runs the page against the real metrics collector and scheduler."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from ciuic_common.proto import (
    metrics_collector_pb2 as mpb,
)
from ciuic_common.proto import (
    metrics_collector_pb2_grpc,
    scheduler_pb2_grpc,
)
from ciuic_common.proto import (
    scheduler_pb2 as spb,
)
from ciuic_metrics_collector import dashboard
from ciuic_metrics_collector.dashboard import RunningDashboard, serve_dashboard

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
RUN = "7c41d09e-5b1f-4c1e-9d7a-1a2b3c4d5e6f"
OTHER = "a8f3e210-0000-4000-8000-000000000002"
WAIT = 10.0  # seconds any one wait of these tests may take
T0 = 1_767_225_600  # 2026-01-01T00:00:00Z, so system samples have wall times


# --- the stand-in services ------------------------------------------------------------------


def ts(seconds: float) -> Timestamp:
    out = Timestamp()
    out.FromMilliseconds(int(seconds * 1000))
    return out


def series(
    run_id: str, job_id: str, key: str, values: list[float], first_step: int = 0
) -> mpb.Series:
    points = [
        mpb.Point(step=first_step + i, value=v, time=ts(T0 + first_step + i))
        for i, v in enumerate(values)
    ]
    source = "system" if key.startswith("system/") else "training"
    return mpb.Series(
        run_id=run_id, job_id=job_id, key=key, source=source, points=points,
        total_points=len(points),
    )  # fmt: skip


def make_run(run_id: str, *, state: str = "running", trials: int = 2) -> spb.Run:
    stages = [
        spb.Stage(name="setup", kind="job", state="succeeded"),
        spb.Stage(name="data", kind="data", state="succeeded", needs=["setup"]),
        spb.Stage(name="train", kind="training", state=state, needs=["data"]),
        spb.Stage(name="validate", kind="validation", state="pending", needs=["train"]),
    ]
    jobs = [
        spb.Job(id=f"{run_id[:4]}-job-{i}", run_id=run_id, stage="train", kind="trial",
                name=f"trial-{i}", state=state, trial=i, attempt=1)
        for i in range(trials)
    ]  # fmt: skip
    return spb.Run(
        id=run_id, repository="git@example.com:ml/tiny.git", commit="0123456789abcdef",
        ref="refs/heads/main", pipeline="tiny-deepseek", state=state, stages=stages,
        jobs=jobs, best_trial=-1, pusher="ada", created_at=ts(T0),
    )  # fmt: skip


class FakeScheduler(scheduler_pb2_grpc.SchedulerServiceServicer):
    def __init__(self, runs: list[spb.Run]) -> None:
        self.runs = {run.id: run for run in runs}

    async def ListRuns(self, request: spb.ListRunsRequest, context: Any) -> spb.ListRunsResponse:
        runs = []
        for run in self.runs.values():
            if request.state and run.state != request.state:
                continue
            listed = spb.Run()
            listed.CopyFrom(run)
            del listed.jobs[:]  # GetRun only
            runs.append(listed)
        return spb.ListRunsResponse(runs=runs)

    async def GetRun(self, request: spb.GetRunRequest, context: Any) -> spb.Run:
        found = [run for rid, run in self.runs.items() if rid.startswith(request.run_id)]
        if len(found) != 1:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no run {request.run_id}")
        return found[0]

    async def ListTrials(
        self, request: spb.ListTrialsRequest, context: Any
    ) -> spb.ListTrialsResponse:
        run = self.runs[request.run_id]
        trials = [
            spb.Trial(index=job.trial, job_id=job.id, state=job.state,
                      hparams_json=json.dumps({"learning_rate": 10 ** -(3 + job.trial)}))
            for job in run.jobs
        ]  # fmt: skip
        return spb.ListTrialsResponse(trials=trials, objective="validation_loss (min, last)")


class FakeMetrics(metrics_collector_pb2_grpc.MetricsServiceServicer):
    """Curves from a dict; StreamMetrics yields exactly what the test pushes."""

    def __init__(self, curves: dict[str, list[mpb.Series]]) -> None:
        self.curves = curves
        # Per open stream: its run and what to send next (None: fail the stream).
        self.streams: list[tuple[str, asyncio.Queue[mpb.MetricsUpdate | None]]] = []
        self.changed = asyncio.Condition()

    async def GetCurves(self, request: mpb.GetCurvesRequest, context: Any) -> mpb.GetCurvesResponse:
        found = [
            s for s in self.curves.get(request.run_id, [])
            if not request.job_ids or s.job_id in request.job_ids
        ]  # fmt: skip
        return mpb.GetCurvesResponse(series=found)

    async def GetSummaries(
        self, request: mpb.GetSummariesRequest, context: Any
    ) -> mpb.GetSummariesResponse:
        out = []
        for run_id in request.run_ids:
            for s in self.curves.get(run_id, []):
                values = [p.value for p in s.points]
                finite = [v for v in values if math.isfinite(v)]
                out.append(
                    mpb.Summary(
                        run_id=run_id, job_id=s.job_id, key=s.key, source=s.source,
                        last=values[-1], min=min(finite), max=max(finite), count=len(values),
                        nan_count=sum(math.isnan(v) for v in values),
                        first_step=s.points[0].step, last_step=s.points[-1].step,
                    )
                )  # fmt: skip
        return mpb.GetSummariesResponse(summaries=out)

    async def StreamMetrics(
        self, request: mpb.StreamMetricsRequest, context: Any
    ) -> AsyncIterator[mpb.MetricsUpdate]:
        entry = (request.run_id, asyncio.Queue[mpb.MetricsUpdate | None]())
        # As the real one does once its starting points are fixed: the dashboard waits for it.
        await context.send_initial_metadata(())
        async with self.changed:
            self.streams.append(entry)
            self.changed.notify_all()
        try:
            while (update := await entry[1].get()) is not None:
                yield update
            await context.abort(grpc.StatusCode.UNAVAILABLE, "metrics store restarting")
        finally:
            self.streams.remove(entry)
            async with self.changed:
                self.changed.notify_all()

    def push(self, run_id: str, *updates: mpb.Series) -> None:
        for rid, queue in self.streams:
            if rid == run_id:
                queue.put_nowait(mpb.MetricsUpdate(series=updates))

    def fail(self, run_id: str) -> None:
        """End the run's open streams with UNAVAILABLE, as a restarting service would."""
        for rid, queue in self.streams:
            if rid == run_id:
                queue.put_nowait(None)

    async def subscribed(self, run_id: str) -> None:
        """Until the dashboard has a stream of `run_id` open (callers bound the wait)."""
        async with self.changed:
            await self.changed.wait_for(lambda: any(rid == run_id for rid, _ in self.streams))


@dataclass
class Stack:
    url: str
    target: str  # where the stand-in gRPC services listen
    metrics: FakeMetrics
    scheduler: FakeScheduler
    stop: RunningDashboard


def seeded_curves() -> dict[str, list[mpb.Series]]:
    nan = float("nan")
    job0, job1 = f"{RUN[:4]}-job-0", f"{RUN[:4]}-job-1"
    other = f"{OTHER[:4]}-job-0"
    return {
        RUN: [
            series(RUN, job0, "training_loss", [2.3, 1.9, 1.6, nan, 1.2, 1.1]),
            series(RUN, job1, "training_loss", [2.4, 2.1, 1.95, 1.8, 1.7, 1.65]),
            series(RUN, job0, "accuracy", [0.1, 0.3, 0.45, 0.5, 0.58, 0.61]),
            series(RUN, job1, "accuracy", [0.1, 0.2, 0.3, 0.37, 0.41, 0.44]),
            series(RUN, job0, "system/gpu.0.utilization_pct", [91, 94, 97, 95, 96, 93]),
            series(RUN, job0, "system/gpu.1.utilization_pct", [88, 90, 85, 92, 94, 90]),
            series(RUN, job0, "system/gpu.0.memory_used_mib", [30500, 31000, 31020, 31100]),
            series(RUN, job0, "system/cpu_pct", [35, 42, 51, 48, 40, 44]),
            series(RUN, job0, "system/memory_used_mib", [8100, 8300, 8350, 8360]),
            series(RUN, job0, "system/net_sent_bytes_per_s", [1e5, 3e5, 2e5, 4e5]),
            series(RUN, job0, "system/net_recv_bytes_per_s", [5e5, 6e5, 7e5, 5e5]),
            series(RUN, job0, "system/disk_read_bytes_per_s", [2e6, 1e6, 5e5, 2e5]),
            series(RUN, job0, "system/disk_write_bytes_per_s", [1e5, 1e5, 8e6, 1e5]),
        ],
        OTHER: [
            series(OTHER, other, "training_loss", [2.5, 2.2, 2.0, 1.9, 1.85, 1.8]),
            series(OTHER, other, "accuracy", [0.1, 0.2, 0.28, 0.33, 0.36, 0.38]),
        ],
    }


@pytest.fixture(scope="module")
async def stack() -> AsyncIterator[Stack]:
    # Only the methods the dashboard calls; the rest answer UNIMPLEMENTED.
    metrics = FakeMetrics(seeded_curves())  # type: ignore[abstract]
    runs = [make_run(RUN), make_run(OTHER, state="succeeded", trials=1)]
    scheduler = FakeScheduler(runs)  # type: ignore[abstract]
    server = grpc.aio.server()
    metrics_collector_pb2_grpc.add_MetricsServiceServicer_to_server(metrics, server)
    scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(scheduler, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    target = f"127.0.0.1:{port}"
    stop = await serve_dashboard("127.0.0.1", 0, metrics_target=target, scheduler_target=target)
    try:
        yield Stack(stop.url, target, metrics, scheduler, stop)
    finally:
        await stop()
        await server.stop(grace=None)


# --- the HTTP API, no browser needed --------------------------------------------------------


async def test_curves_carry_nan_as_a_string_json_can_hold(stack: Stack) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{stack.url}/api/runs/{RUN}/curves?max_points=100") as answer,
    ):
        assert answer.status == 200
        body = await answer.json()
    loss = next(
        s for s in body["series"] if s["key"] == "training_loss" and s["job_id"].endswith("0")
    )
    assert loss["steps"] == [0, 1, 2, 3, 4, 5]
    assert loss["values"][3] == "NaN"
    assert loss["times"][0] == T0 * 1000


async def test_errors_have_one_json_shape(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{stack.url}/api/runs/nope") as answer:
            assert answer.status == 404
            assert (await answer.json())["error"]["code"] == "not_found"
        async with http.get(f"{stack.url}/api/runs/{RUN}/curves?max_points=lots") as answer:
            assert answer.status == 400
            assert "max_points" in (await answer.json())["error"]["message"]
        async with http.get(f"{stack.url}/api/nothing-here") as answer:
            assert answer.status == 404
            assert "error" in await answer.json()


async def test_stream_relays_only_points_stored_after_it_began(stack: Stack) -> None:
    job = f"{OTHER[:4]}-job-0"
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{stack.url}/api/runs/{OTHER}/stream") as answer,
    ):
        assert answer.headers["Content-Type"].startswith("text/event-stream")
        await read_event(answer.content, "subscribed")
        async with asyncio.timeout(WAIT):
            await stack.metrics.subscribed(OTHER)
        # StreamMetrics may replay what was stored (steps 0-5 here): only step 6 is new. A
        # series that appears later (a new trial) comes whole, step 0 included.
        stack.metrics.push(
            OTHER,
            series(OTHER, job, "accuracy", [0.33, 0.36, 0.38, math.inf], first_step=3),
            series(OTHER, "new-trial", "accuracy", [0.05, 0.1]),
        )
        event = await read_event(answer.content, "metrics")
    old, new = event["series"]
    assert (old["job_id"], old["steps"], old["values"]) == (job, [6], ["Infinity"])
    assert (new["job_id"], new["steps"]) == ("new-trial", [0, 1])


async def test_stopping_ends_open_streams_at_once(stack: Stack) -> None:
    stop = await serve_dashboard(
        "127.0.0.1", 0, metrics_target=stack.target, scheduler_target=stack.target
    )
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{stop.url}/api/runs/{RUN}/stream") as answer,
    ):
        await read_event(answer.content, "subscribed")
        started = time.monotonic()
        await asyncio.wait_for(stop(), timeout=WAIT)
        # An event stream never ends by itself: without ending it, stop would wait for it.
        assert time.monotonic() - started < 3


async def test_a_browser_that_leaves_closes_its_metrics_stream(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The relay notices a gone browser when its next heartbeat cannot be written.
    monkeypatch.setattr(dashboard, "HEARTBEAT_S", 0.1)
    leaving = "run-whose-page-closes"  # its own run: other tests' streams stay open a while
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{stack.url}/api/runs/{leaving}/stream") as answer,
    ):
        await read_event(answer.content, "subscribed")
        async with asyncio.timeout(WAIT):
            await stack.metrics.subscribed(leaving)
    async with asyncio.timeout(WAIT), stack.metrics.changed:
        await stack.metrics.changed.wait_for(
            lambda: not any(rid == leaving for rid, _ in stack.metrics.streams)
        )


async def test_a_taken_port_fails_the_start(stack: Stack) -> None:
    port = int(stack.url.rsplit(":", 1)[1])
    with pytest.raises(OSError, match="address already in use"):
        await serve_dashboard(
            "127.0.0.1", port, metrics_target=stack.target, scheduler_target=stack.target
        )


async def read_event(content: aiohttp.StreamReader, name: str) -> Any:
    """The data of the next server-sent event called `name` (within WAIT seconds)."""
    event = ""
    async with asyncio.timeout(WAIT):
        while True:
            line = (await content.readline()).decode()
            if not line:
                raise AssertionError(f"the stream ended before a {name!r} event")
            if line.startswith("event: "):
                event = line[7:].strip()
            elif line.startswith("data: ") and event == name:
                return json.loads(line[6:])


# --- in the browser -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's Chromium, installed first when missing; skips (with the reason) when it cannot."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "ensure_chromium.py")],
        capture_output=True,
        text=True,
        timeout=960,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(done.stderr.strip() or "chromium is not available")
    if "installed" in done.stderr:
        print(f"chromium installed in {time.monotonic() - started:.1f} s", file=sys.stderr)
    return done.stdout.strip()


@pytest.fixture
def artifacts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Iterator[Path]:
    """Where screenshots go: $CIUIC_TEST_ARTIFACTS, else the test's tmp_path (printed)."""
    base = os.environ.get("CIUIC_TEST_ARTIFACTS")
    where = Path(base) if base else tmp_path
    where.mkdir(parents=True, exist_ok=True)
    started = time.time()
    yield where
    with capsys.disabled():
        for shot in sorted(where.glob("dashboard-*.png")):
            if shot.stat().st_mtime >= started:
                print(f"\n  screenshot: {shot}")


@pytest.fixture
async def page(chromium: str) -> AsyncIterator[Any]:
    playwright = pytest.importorskip("playwright.async_api")
    async with playwright.async_playwright() as pw:
        # Never Playwright's downloaded browsers: the one apt installed.
        browser = await pw.chromium.launch(
            executable_path=chromium, args=["--disable-dev-shm-usage", "--disable-gpu"]
        )
        try:
            tab = await browser.new_page(viewport={"width": 1400, "height": 1000})
            tab.set_default_timeout(15_000)
            errors: list[str] = []
            tab.on("pageerror", lambda exc: errors.append(str(exc)))
            yield tab
            assert not errors, f"JavaScript errors on the page: {errors}"
        finally:
            await browser.close()


# The chart's data as plotly holds it in the page (dates as epoch ms).
CHART_DATA = """(id) => {
  const div = document.querySelector(`[data-chart="${id}"]`);
  if (!div || !div.data) return null;
  return div.data.map((t) => ({
    name: t.name, meta: t.meta || {}, text: t.text || null,
    x: Array.from(t.x, (v) => (v instanceof Date ? v.getTime() : v)), y: Array.from(t.y),
  }));
}"""


async def chart(page: Any, chart_id: str) -> list[dict[str, Any]]:
    data = await page.evaluate(CHART_DATA, chart_id)
    assert data is not None, f"no chart {chart_id}"
    return list(data)


def line(traces: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(t for t in traces if t["name"] == name)


def nonfinite_marks(traces: list[dict[str, Any]]) -> dict[str, Any]:
    return next(t for t in traces if t["meta"].get("nonfinite"))


async def test_run_page_draws_live_points_and_nan_gaps(
    stack: Stack, page: Any, artifacts: Path
) -> None:
    await page.goto(f"{stack.url}/runs/{RUN[:8]}")
    await page.wait_for_function("() => ciuic.page && ciuic.page.live && ciuic.page.curvesLoaded")
    await page.wait_for_selector('[data-chart="train:training_loss"] .main-svg')

    # Stages with their states, jobs named in the legends, one line per trial.
    assert await page.get_attribute('[data-stage="train"]', "data-state") == "running"
    loss = await chart(page, "train:training_loss")
    assert {t["name"] for t in loss} == {"trial-0", "trial-1", "NaN / ±inf"}
    trial0 = line(loss, "trial-0")
    assert trial0["x"] == [0, 1, 2, 3, 4, 5]
    assert trial0["y"][3] is None  # the gap
    marks = nonfinite_marks(loss)
    assert marks["x"] == [3]
    assert marks["y"] == [1.6]  # where the line broke off
    assert "NaN at step 3" in marks["text"][0]
    # Loss first, then accuracy; system charts grouped, GPUs as lines of one chart, by time.
    order = await page.eval_on_selector_all(
        "#training [data-chart]", "(divs) => divs.map((d) => d.dataset.chart)"
    )
    assert order == ["train:training_loss", "train:accuracy"]
    systems = await page.eval_on_selector_all(
        "#system [data-chart]", "(divs) => divs.map((d) => d.dataset.chart)"
    )
    assert systems == ["sys:gpu_util", "sys:gpu_mem", "sys:cpu", "sys:mem", "sys:net", "sys:disk"]
    gpus = await chart(page, "sys:gpu_util")
    assert {t["name"] for t in gpus} == {"trial-0 · GPU 0", "trial-0 · GPU 1"}
    assert line(gpus, "trial-0 · GPU 0")["x"][0] == T0 * 1000

    # A point pushed through StreamMetrics reaches the chart.
    async with asyncio.timeout(WAIT):
        await stack.metrics.subscribed(RUN)
    job0 = f"{RUN[:4]}-job-0"
    stack.metrics.push(RUN, series(RUN, job0, "training_loss", [0.95], first_step=6))
    await page.wait_for_function(
        """([id, name, step]) => {
          const div = document.querySelector(`[data-chart="${id}"]`);
          const t = div && div.data.find((t) => t.name === name);
          return t && Array.from(t.x).includes(step);
        }""",
        arg=["train:training_loss", "trial-0", 6],
    )
    trial0 = line(await chart(page, "train:training_loss"), "trial-0")
    assert trial0["x"][-1] == 6
    assert trial0["y"][-1] == pytest.approx(0.95)

    # A live NaN: a gap in the line and a marker, not a vanished point.
    stack.metrics.push(RUN, series(RUN, job0, "training_loss", [math.nan], first_step=7))
    await page.wait_for_function(
        """(id) => {
          const div = document.querySelector(`[data-chart="${id}"]`);
          const m = div && div.data.find((t) => t.meta && t.meta.nonfinite);
          return m && Array.from(m.x).includes(7);
        }""",
        arg="train:training_loss",
    )
    loss = await chart(page, "train:training_loss")
    assert line(loss, "trial-0")["y"][-1] is None
    assert nonfinite_marks(loss)["x"] == [3, 7]
    assert nonfinite_marks(loss)["y"] == [1.6, 0.95]
    title = await page.text_content('[data-chart="train:training_loss"] .gtitle')
    assert title is not None
    assert "2 NaN/inf" in title

    # The metrics collector drops the stream: the page reconnects, re-reads the curves and
    # goes on drawing new points.
    stack.metrics.fail(RUN)
    await page.wait_for_function("() => ciuic.page.opens >= 2 && ciuic.page.live", timeout=10_000)
    async with asyncio.timeout(WAIT):
        await stack.metrics.subscribed(RUN)
    stack.metrics.push(RUN, series(RUN, job0, "training_loss", [0.9], first_step=8))
    await page.wait_for_function(
        """() => {
          const div = document.querySelector('[data-chart="train:training_loss"]');
          const t = div.data.find((t) => t.name === "trial-0");
          return Array.from(t.x).includes(8);
        }"""
    )

    shot = artifacts / "dashboard-run.png"
    await page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


async def test_runs_list_and_comparison(stack: Stack, page: Any, artifacts: Path) -> None:
    await page.goto(stack.url)
    await page.wait_for_selector(f'tr[data-run="{RUN}"]')
    states = await page.eval_on_selector_all(
        "#runs tbody tr", "(rows) => rows.map((r) => [r.dataset.run, r.dataset.state])"
    )
    assert sorted(states) == sorted([[RUN, "running"], [OTHER, "succeeded"]])
    await page.screenshot(path=str(artifacts / "dashboard-runs.png"), full_page=True)

    # Select both runs and compare them.
    await page.check(f'tr[data-run="{RUN}"] input[type=checkbox]')
    await page.check(f'tr[data-run="{OTHER}"] input[type=checkbox]')
    await page.click("#compare")
    await page.wait_for_url("**/compare?runs=*")
    await page.wait_for_function("() => ciuic.page && ciuic.page.loaded")
    await page.wait_for_selector('[data-chart="train:accuracy"] .main-svg')
    accuracy = await chart(page, "train:accuracy")
    runs = {t["meta"]["run_id"] for t in accuracy if "run_id" in t["meta"]}
    assert runs == {RUN, OTHER}
    assert len([t for t in accuracy if "run_id" in t["meta"]]) == 3  # two trials + one job
    rows = await page.eval_on_selector_all("#summaries tbody tr", "(rows) => rows.length")
    assert rows == 6  # training_loss and accuracy of three jobs
    await page.screenshot(path=str(artifacts / "dashboard-compare.png"), full_page=True)
