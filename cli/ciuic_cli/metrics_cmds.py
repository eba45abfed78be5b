"""`ciuic metrics RUN` draws a run's curves in the terminal with their summaries (live with
`--follow`); `ciuic compare RUN [RUN ...]` sets runs beside their baselines, metric by metric.

Curves are block charts drawn with rich: each column is a step range; its height is the largest
value there, a NaN anywhere in it shows as a red cross above the chart (a diverged loss is never
hidden) and ±inf as `▲`/`▼`. The server downsamples with min/max buckets, so a one-step spike
still reaches its column.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import grpc
import typer
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from rich.console import Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ciuic_cli.clients import ApiError, address, call
from ciuic_cli.console import app, err, fail, out
from ciuic_common.proto import metrics_collector_pb2 as pb
from ciuic_common.proto import metrics_collector_pb2_grpc
from ciuic_common.rpc import channel

JsonOption = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]
NONE = "—"
BLOCKS = " ▁▂▃▄▅▆▇█"
VERDICT_STYLE = {
    "improved": "bold green",
    "regressed": "bold red",
    "unchanged": "dim",
    "missing": "yellow",
}
#: How often `--follow` redraws at most.
REDRAW_SECONDS = 0.5
#: How long `--follow` waits for the stream to start.
START_SECONDS = 30.0
#: `StreamMetricsRequest.after_step` for "from now" (the metrics collector's `FROM_NOW`): each
#: series after its last stored step, and a series that appears later from its first point.
FROM_NOW = -2


def _metrics(method: str, request: Message, *, timeout: float = 30.0) -> Any:
    try:
        return call(
            "metrics_collector",
            metrics_collector_pb2_grpc.MetricsServiceStub,
            method,
            request,
            timeout=timeout,
        )
    except ApiError as exc:
        raise fail(str(exc)) from None


def _dict(message: Message) -> dict[str, Any]:
    return MessageToDict(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
        unquote_int64_if_possible=True,
    )


def _print_json(data: Any) -> None:
    # NaN and infinities as JSON's common extensions (NaN, Infinity): what Python reads back.
    sys.stdout.write(json.dumps(data, indent=2, allow_nan=True) + "\n")


def _number(value: float) -> str:
    return f"{value:.6g}"  # NaN reads `nan`, infinities `inf`


def _job(job_id: str) -> str:
    """A job's name within its run (`trial-0`): its id is `<run_id>-<name>`."""
    return job_id.partition("-")[2] or job_id


# --- drawing ---------------------------------------------------------------------------------


@dataclass
class Curve:
    """One series as drawn: its points so far (kept to a few per column) and its summary."""

    job_id: str
    key: str
    source: str
    points: list[tuple[int, float]] = field(default_factory=list)
    summary: pb.Summary | None = None

    def extend(self, more: Sequence[tuple[int, float]], cells: int) -> None:
        self.points.extend(more)
        if len(self.points) > 8 * cells:
            self.points = decimate(sorted(self.points), 2 * cells)


def decimate(points: Sequence[tuple[int, float]], buckets: int) -> list[tuple[int, float]]:
    """Points (in step order) kept to each bucket's min, max and first NaN."""
    if len(points) <= 2 * buckets or buckets < 1:
        return list(points)
    lo, hi = points[0][0], points[-1][0]
    width = max(1, math.ceil((hi - lo + 1) / buckets))
    kept: dict[int, dict[str, tuple[int, float]]] = {}
    for step, value in points:
        slot = kept.setdefault((step - lo) // width, {})
        if math.isnan(value):
            slot.setdefault("nan", (step, value))
            continue
        if "min" not in slot or value < slot["min"][1]:
            slot["min"] = (step, value)
        if "max" not in slot or value > slot["max"][1]:
            slot["max"] = (step, value)
    return sorted({p for slot in kept.values() for p in slot.values()})


def chart(points: Sequence[tuple[int, float]], cells: int, height: int) -> Text:
    """A block chart of `cells` columns and `height` rows (plus a marker row for NaN/inf)."""
    cells, height = max(cells, 1), max(height, 1)
    if not points:
        return Text("(no points)", style="dim")
    lo, hi = min(p[0] for p in points), max(p[0] for p in points)
    span = hi - lo + 1
    columns: list[list[float]] = [[] for _ in range(cells)]
    for step, value in points:
        columns[min(cells - 1, (step - lo) * cells // span)].append(value)
    finite = [v for col in columns for v in col if math.isfinite(v)]
    vmin, vmax = (min(finite), max(finite)) if finite else (0.0, 0.0)
    levels = height * 8
    tops: list[int | None] = []
    marks = Text()
    for col in columns:
        if any(math.isnan(v) for v in col):
            marks.append("×", style="bold red")  # noqa: RUF001  (a NaN mark)
        elif any(v == math.inf for v in col):
            marks.append("▲", style="red")
        elif any(v == -math.inf for v in col):
            marks.append("▼", style="red")
        else:
            marks.append(" ")
        values = [v for v in col if math.isfinite(v)]
        if not values:
            tops.append(None)
            continue
        top = max(values)
        share = (top - vmin) / (vmax - vmin) if vmax > vmin else 0.5
        tops.append(max(1, round(share * levels)))
    rows = [marks] if marks.plain.strip() else []
    for r in range(height):
        floor = (height - 1 - r) * 8
        line = "".join(" " if t is None else BLOCKS[min(8, max(0, t - floor))] for t in tops)
        rows.append(Text(line, style="cyan"))
    label = f"{_number(vmax)} … {_number(vmin)}  steps {lo}..{hi}"
    rows.append(Text(label, style="dim"))
    return Text("\n").join(rows)


def _summary_line(c: Curve) -> Text:
    s = c.summary
    if s is None:
        return Text("")
    parts = [
        ("last ", "dim"), (_number(s.last), "bold"), ("  min ", "dim"), (_number(s.min), ""),
        ("  max ", "dim"), (_number(s.max), ""), ("  points ", "dim"), (f"{s.count:,}", ""),
    ]  # fmt: skip
    if s.nan_count:
        parts += [("  NaN ", "dim"), (f"{s.nan_count:,}", "bold red")]
    return Text.assemble(*parts)


def _view(run_id: str, curves: Sequence[Curve], cells: int, height: int) -> RenderableType:
    parts: list[RenderableType] = [Text.assemble(("run ", "dim"), (run_id, "bold"))]
    if not curves:
        parts.append(Text("no metrics logged yet", style="dim"))
    for c in curves:
        head = Text.assemble(
            (c.key, "bold"), ("  ", ""), (_job(c.job_id), "magenta"), (f"  {c.source}", "dim")
        )
        parts += [head, chart(c.points, cells, height), _summary_line(c), Text("")]
    return Group(*parts)


# --- ciuic metrics ---------------------------------------------------------------------------


def _fetch(run: str, keys: list[str], jobs: list[str], cells: int) -> tuple[str, list[Curve]]:
    curves = _metrics(
        "GetCurves",
        pb.GetCurvesRequest(run_id=run, keys=keys, job_ids=jobs, max_points=max(10, 2 * cells)),
    )
    run_id = curves.series[0].run_id if curves.series else run
    summaries = _metrics("GetSummaries", pb.GetSummariesRequest(run_ids=[run_id], keys=keys))
    by_series = {(s.job_id, s.key): s for s in summaries.summaries}
    found = [
        Curve(
            s.job_id,
            s.key,
            s.source,
            [(p.step, p.value) for p in s.points],
            by_series.get((s.job_id, s.key)),
        )
        for s in curves.series
    ]
    return run_id, found


async def _follow(run: str, keys: list[str], jobs: list[str], cells: int, height: int) -> None:
    target = address("metrics_collector")
    async with channel(target, timeout=None) as ch:
        stub = metrics_collector_pb2_grpc.MetricsServiceStub(ch)
        # The stream first, from now: each series after its last stored step, a series that
        # appears later (a new trial) from its first point. The curves are read once it has
        # fixed those starting points, so no point falls between the two (repeats are dropped).
        stream = stub.StreamMetrics(
            pb.StreamMetricsRequest(run_id=run, keys=keys, after_step=FROM_NOW)
        )
        await asyncio.wait_for(stream.initial_metadata(), START_SECONDS)
        run_id, curves = await asyncio.to_thread(_fetch, run, keys, jobs, cells)
        by_series = {(c.job_id, c.key): c for c in curves}
        with Live(_view(run_id, curves, cells, height), console=out, auto_refresh=False) as live:
            drawn = time.monotonic()
            try:
                async for update in stream:
                    for s in update.series:
                        if jobs and s.job_id not in jobs and _job(s.job_id) not in jobs:
                            continue
                        c = by_series.get((s.job_id, s.key))
                        if c is None:
                            c = by_series[(s.job_id, s.key)] = Curve(s.job_id, s.key, s.source)
                            curves.append(c)
                        known = c.summary.last_step if c.summary else -1
                        fresh = [(p.step, p.value) for p in s.points if p.step > known]
                        c.extend(fresh, cells)
                        c.summary = _advance(c.summary, s, fresh)
                    if time.monotonic() - drawn >= REDRAW_SECONDS:
                        live.update(_view(run_id, curves, cells, height), refresh=True)
                        drawn = time.monotonic()
            finally:
                # Points that came within the last redraw interval are drawn too.
                live.update(_view(run_id, curves, cells, height), refresh=True)


def _advance(
    summary: pb.Summary | None, s: pb.Series, fresh: Sequence[tuple[int, float]]
) -> pb.Summary:
    """The summary moved on by new points (as the server would count them)."""
    new = pb.Summary()
    if summary is not None:
        new.CopyFrom(summary)
    else:
        new.run_id, new.job_id, new.key, new.source = s.run_id, s.job_id, s.key, s.source
        new.min, new.max = math.nan, math.nan
    for step, value in fresh:
        new.count += 1
        if math.isnan(value):
            new.nan_count += 1
        else:
            new.min = value if math.isnan(new.min) else min(new.min, value)
            new.max = value if math.isnan(new.max) else max(new.max, value)
        if step >= new.last_step:
            new.last_step, new.last = step, value
    return new


@app.command("metrics")
def metrics(
    run: Annotated[str, typer.Argument(help="run id, or a unique prefix of it")],
    key: Annotated[
        list[str] | None, typer.Option("--key", "-k", help="only this metric (repeatable)")
    ] = None,
    job: Annotated[
        list[str] | None,
        typer.Option("--job", "-j", help="only this job: its id or name, e.g. trial-0"),
    ] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="keep drawing new points as they arrive")
    ] = False,
    height: Annotated[int, typer.Option(min=1, max=40, help="rows per chart")] = 4,
    as_json: JsonOption = False,
) -> None:
    """Draw a run's curves with their summaries (live with --follow)."""
    keys, jobs = key or [], job or []
    cells = max(20, out.width - 2)
    if as_json and follow:
        raise fail("--follow draws for people; scripts read StreamMetrics over gRPC")
    if follow:
        try:
            asyncio.run(_follow(run, keys, jobs, cells, height))
        except KeyboardInterrupt:
            return
        except TimeoutError:
            raise fail(
                f"metrics_collector: the stream did not start in {START_SECONDS:g}s"
            ) from None
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED:
                return
            raise fail(f"metrics_collector: {exc.details()}") from None
        return
    run_id, curves = _fetch(run, keys, jobs, cells)
    if as_json:
        _print_json(
            {
                "run_id": run_id,
                "series": [
                    {
                        "job_id": c.job_id,
                        "key": c.key,
                        "source": c.source,
                        "points": [[s, v] for s, v in c.points],
                        "summary": _dict(c.summary) if c.summary else None,
                    }
                    for c in curves
                ],
            }
        )
        return
    out.print(_view(run_id, curves, cells, height))
    if not curves:
        err.print(
            "[dim]hint: points appear once the job logs them (`ciuic.log(...)`); "
            "`ciuic runs show RUN` tells where the run is[/]",
            highlight=False,
        )


# --- ciuic compare ---------------------------------------------------------------------------


def _comparison_view(c: pb.Comparison) -> RenderableType:
    head = Text.assemble(("run ", "dim"), (c.run_id, "bold"))
    if c.baseline_run_id:
        head.append_text(Text.assemble(("  vs baseline ", "dim"), (c.baseline_run_id, "bold")))
    parts: list[RenderableType] = [head, Text(c.reason, style="dim")]
    if not c.metrics:
        return Group(*parts)
    table = Table(title_justify="left")
    table.add_column("metric", overflow="fold")
    table.add_column("value", justify="right", no_wrap=True)
    table.add_column("baseline", justify="right", no_wrap=True)
    table.add_column("delta", justify="right", no_wrap=True)
    table.add_column("delta %", justify="right", no_wrap=True)
    table.add_column("better", justify="center", no_wrap=True)
    table.add_column("verdict", no_wrap=True)
    for m in c.metrics:
        missing = m.verdict == "missing"
        table.add_row(
            escape(m.key),
            NONE if missing and math.isnan(m.value) else _number(m.value),
            NONE if missing and math.isnan(m.baseline) else _number(m.baseline),
            NONE if math.isnan(m.delta) else f"{m.delta:+.6g}",
            NONE if math.isnan(m.delta_pct) else f"{m.delta_pct:+.2f}%",
            "lower" if m.better == "min" else "higher",
            Text(m.verdict, style=VERDICT_STYLE.get(m.verdict, "")),
        )
    parts.append(table)
    return Group(*parts)


@app.command("compare")
def compare(
    runs: Annotated[list[str], typer.Argument(help="run ids, or unique prefixes")],
    baseline: Annotated[
        str, typer.Option(help="compare with this run instead of each run's own baseline")
    ] = "",
    key: Annotated[
        list[str] | None, typer.Option("--key", "-k", help="only this metric (repeatable)")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Set runs beside their baselines: value, baseline, delta and verdict per metric.

    The default baseline is the best earlier run of the same repository, pipeline and branch on
    the same objective. Lower is better for the objective with mode min and for metrics named
    like losses and errors; higher for the rest.
    """
    found = [
        _metrics(
            "CompareRun",
            pb.CompareRunRequest(run_id=r, baseline_run_id=baseline, keys=key or []),
        )
        for r in runs
    ]
    if as_json:
        _print_json([_dict(c) for c in found])
        return
    for i, c in enumerate(found):
        if i:
            out.print()
        out.print(_comparison_view(c))
    if any(m.verdict == "regressed" for c in found for m in c.metrics):
        err.print("[dim]some metrics regressed against their baseline[/]", highlight=False)
