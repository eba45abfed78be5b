"""`ciuic runs`, `ciuic jobs`, `ciuic trials`, `ciuic agents`: what the scheduler runs, where,
and how it went."""

from __future__ import annotations

import getpass
import json
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import typer
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ciuic_cli.clients import ApiError, call
from ciuic_cli.console import app, err, fail, out
from ciuic_common.proto import common_pb2, scheduler_pb2, scheduler_pb2_grpc

runs_app = typer.Typer(help="Pipeline runs: their stages, jobs and state.", no_args_is_help=True)
jobs_app = typer.Typer(help="Jobs the scheduler placed on agents.", no_args_is_help=True)
agents_app = typer.Typer(help="GPU agents and their GPUs.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")
app.add_typer(jobs_app, name="jobs")
app.add_typer(agents_app, name="agents")

JsonOption = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]
LimitOption = Annotated[int, typer.Option(min=1, help="how many at most, newest first")]

STATE_STYLE = {
    "succeeded": "green",
    "alive": "green",
    "running": "cyan",
    "accepted": "cyan",
    "pending": "dim",
    "queued": "yellow",
    "assigned": "yellow",
    "waiting": "yellow",
    "failed": "red",
    "timed_out": "red",
    "lost": "red",
    "stopped": "magenta",
    "cancelled": "magenta",
}
RUN_ENDED = frozenset({"succeeded", "failed", "cancelled"})
NONE = "—"
BY = "×"  # noqa: RUF001  (the multiplication sign, as GPU shapes are written)
#: The most items one list request asks for; longer lists follow next_page_token.
PAGE_MAX = 500
#: How often `runs show --watch` asks again.
WATCH_SECONDS = 1.0

M = TypeVar("M", bound=Message)


def scheduler_call(method: str, request: Message, *, timeout: float = 30.0) -> Any:
    try:
        return call(
            "scheduler", scheduler_pb2_grpc.SchedulerServiceStub, method, request, timeout=timeout
        )
    except ApiError as exc:
        raise fail(str(exc)) from None


def _dump(message: Message) -> None:
    # Every field, defaults included: a script should find `best_trial: 0` or `objective: 0.0`
    # rather than a missing key, and int64 sizes as numbers rather than strings.
    data = MessageToDict(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
        unquote_int64_if_possible=True,
    )
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def _list(
    method: str,
    request: Callable[[common_pb2.PageRequest], Message],
    items: Callable[[Any], Sequence[M]],
    limit: int,
) -> tuple[list[M], str]:
    """Up to `limit` items of a paged list, following next_page_token; and the token after them."""
    found: list[M] = []
    token = ""
    while len(found) < limit:
        page = common_pb2.PageRequest(page_size=min(limit - len(found), PAGE_MAX), page_token=token)
        response = scheduler_call(method, request(page))
        found.extend(items(response))
        if response.page.next_page_token == token:
            if token:  # the same page again: following it would never end
                raise fail(f"the scheduler's {method} answered the same page token twice")
            break
        token = response.page.next_page_token
        if not token:
            break
    if len(found) > limit:  # the server ignored page_size; its token points past what we drop
        return found[:limit], ""
    return found, token


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        raise fail(
            "cannot tell who you are, and the scheduler records who asked",
            "set USER to your name",
        ) from None


# --- how values read ---------------------------------------------------------------------------


def _is_set(ts: Timestamp) -> bool:
    return bool(ts.seconds or ts.nanos)


def _now() -> datetime:
    return datetime.now(UTC)


def _when(ts: Timestamp) -> str:
    return ts.ToDatetime().strftime("%Y-%m-%d %H:%M:%S") if _is_set(ts) else NONE


def _duration(seconds: float) -> str:
    """`850 ms`, `42s`, `1m 05s`, `2h 03m`, `3d 04h`."""
    if seconds < 1:
        return f"{int(max(seconds, 0) * 1000)} ms"
    minutes, secs = divmod(int(seconds), 60)
    if not minutes:
        return f"{secs}s"
    hours, minutes = divmod(minutes, 60)
    if not hours:
        return f"{minutes}m {secs:02d}s"
    days, hours = divmod(hours, 24)
    return f"{hours}h {minutes:02d}m" if not days else f"{days}d {hours:02d}h"


def _elapsed(start: Timestamp, end: Timestamp) -> str:
    """From start to end; to now while it has started and not ended."""
    if not _is_set(start):
        return NONE
    stop = end.ToDatetime(tzinfo=UTC) if _is_set(end) else _now()
    return _duration((stop - start.ToDatetime(tzinfo=UTC)).total_seconds())


def _ago(ts: Timestamp) -> str:
    if not _is_set(ts):
        return NONE
    return f"{_duration((_now() - ts.ToDatetime(tzinfo=UTC)).total_seconds())} ago"


def _state(state: str, service: str = "") -> Text:
    label = f"waiting for {service}" if state == "waiting" and service else state
    return Text(label or NONE, style=STATE_STYLE.get(state, ""))


def _repo(url: str) -> str:
    """`ml/model` for `https://git.example.com/ml/model.git`, to keep tables narrow; `runs show`
    and `--json` say it in full."""
    path = url.split("://", 1)[-1].removesuffix(".git").removesuffix("/").replace(":", "/")
    return "/".join(path.split("/")[-2:])


def _short(identifier: str) -> str:
    return identifier[:8] or NONE


def _job(job_id: str) -> str:
    """A job's name within its run: its id is `<run_id>-<name>` (run ids have no dash), so the
    name alone tells the jobs of one run apart where an id prefix would not."""
    return job_id.partition("-")[2] or job_id or NONE


def _number(value: Any) -> str:
    if value is None:
        return NONE
    if isinstance(value, float):
        return f"{value:.6g}"  # NaN reads `nan`, infinities `inf`
    if isinstance(value, str):
        return escape(value)
    return escape(json.dumps(value))


def _mib(mib: int) -> str:
    return f"{mib / 1024:.1f} GiB" if mib >= 1024 else f"{mib} MiB"


def _memory(used: int, total: int) -> str:
    if total >= 1024:
        return f"{used / 1024:.1f} / {total / 1024:.1f} GiB"
    return f"{used} / {total} MiB"


def _bar(pct: float, cells: int = 5) -> str:
    filled = round(min(max(pct, 0.0), 100.0) / 100 * cells)
    return "█" * filled + "░" * (cells - filled) + f" {pct:3.0f}%"


def _grid(rows: Sequence[tuple[str, str | Text]]) -> Table:
    grid = Table.grid(padding=(0, 2))
    for key, value in rows:
        grid.add_row(f"[dim]{key}[/]", value)
    return grid


# --- runs --------------------------------------------------------------------------------------


def _run_ended(run: scheduler_pb2.Run) -> bool:
    return run.state in RUN_ENDED or _is_set(run.finished_at)


def _progress(run: scheduler_pb2.Run) -> str:
    done = sum(1 for s in run.stages if s.state == "succeeded")
    return f"{done}/{len(run.stages)}"


def _jobs_table(jobs: Sequence[scheduler_pb2.Job], title: str, *, with_run: bool) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("job", no_wrap=True)
    if with_run:
        table.add_column("run", no_wrap=True)
    table.add_column("stage", overflow="fold")
    table.add_column("kind", no_wrap=True)
    table.add_column("name", overflow="fold")
    table.add_column("trial", justify="right", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("try", justify="right", no_wrap=True)  # attempt / max_retries + 1
    table.add_column("GPUs", justify="right", no_wrap=True)  # nodes by GPUs per node
    table.add_column("agents", overflow="fold")
    table.add_column("duration", justify="right", no_wrap=True)
    table.add_column("reason", overflow="fold")
    for j in jobs:
        # One a line: a gang job spans many agents, and the table stays narrow.
        agents = "\n".join(dict.fromkeys(n.agent_id for n in j.placement if n.agent_id))
        cells: list[str | Text] = [escape(_job(j.id))]
        if with_run:
            cells.append(_short(j.run_id))
        cells += [
            escape(j.stage), escape(j.kind), escape(j.name),
            str(j.trial) if j.kind == "trial" else NONE,
            _state(j.state),
            f"{j.attempt}/{j.max_retries + 1}",
            f"{j.nodes}{BY}{j.gpus_per_node}",
            escape(agents) or NONE,
            _elapsed(j.started_at, j.finished_at),
            escape(j.reason),
        ]  # fmt: skip
        table.add_row(*cells)
    return table


def _run_view(run: scheduler_pb2.Run) -> Group:
    head = Text.assemble(("run ", "dim"), (run.id, "bold"), "  ", _state(run.state))
    rows: list[tuple[str, str | Text]] = [
        ("repository", escape(f"{run.repository}@{run.ref} {run.commit[:10]}")),
        ("pipeline", escape(run.pipeline) or NONE),
        ("pusher", escape(run.pusher) or NONE),
        ("created", _when(run.created_at)),
        ("finished", _when(run.finished_at)),
        ("duration", _elapsed(run.created_at, run.finished_at)),
    ]
    if run.reason:
        rows.append(("reason", escape(run.reason)))
    if run.best_trial >= 0:
        rows.append(("best trial", Text(str(run.best_trial), style="bold green")))
    parts: list[RenderableType] = [head, _grid(rows)]

    stages = Table(title="stages", title_justify="left")
    stages.add_column("stage", no_wrap=True)
    stages.add_column("kind", no_wrap=True)
    stages.add_column("state", no_wrap=True)
    stages.add_column("needs", overflow="fold")
    stages.add_column("duration", justify="right", no_wrap=True)
    stages.add_column("reason", overflow="fold")
    for s in run.stages:
        stages.add_row(
            escape(s.name), escape(s.kind), _state(s.state, s.service),
            escape(", ".join(s.needs)) or NONE, _elapsed(s.started_at, s.finished_at),
            escape(s.reason),
        )  # fmt: skip
    parts.append(stages)
    if run.jobs:
        parts.append(_jobs_table(run.jobs, "jobs", with_run=False))
    return Group(*parts)


def _watch(run: scheduler_pb2.Run, *, live: bool) -> tuple[scheduler_pb2.Run, bool]:
    """Ask again every WATCH_SECONDS until the run ends, redrawing it meanwhile when `live`; the
    last answer, and whether the person stopped watching (Ctrl-C) before the end."""

    def again(run: scheduler_pb2.Run) -> scheduler_pb2.Run:
        time.sleep(WATCH_SECONDS)
        # The full id from now on: the prefix given may stop being unique while we watch.
        found: scheduler_pb2.Run = scheduler_call(
            "GetRun", scheduler_pb2.GetRunRequest(run_id=run.id), timeout=10
        )
        return found

    try:
        if not live:
            while not _run_ended(run):
                run = again(run)
            return run, False
        # Transient: the last frame is erased and the final view printed once, as `runs show`
        # prints it, so a terminal and a log file end up with the same text.
        with Live(_run_view(run), console=out, auto_refresh=False, transient=True) as display:
            while not _run_ended(run):
                run = again(run)
                display.update(_run_view(run), refresh=True)
    except KeyboardInterrupt:
        return run, True
    return run, False


@runs_app.command("ls")
def runs_ls(
    repository: Annotated[str, typer.Option(help="only this repository")] = "",
    state: Annotated[str, typer.Option(help="running, succeeded, failed, cancelled")] = "",
    limit: LimitOption = 20,
    as_json: JsonOption = False,
) -> None:
    """List runs, newest first."""
    runs, token = _list(
        "ListRuns",
        lambda page: scheduler_pb2.ListRunsRequest(page=page, repository=repository, state=state),
        lambda response: response.runs,
        limit,
    )
    if as_json:
        page = common_pb2.PageResponse(next_page_token=token)
        _dump(scheduler_pb2.ListRunsResponse(runs=runs, page=page))
        return
    table = Table(title="runs", title_justify="left")
    table.add_column("run", no_wrap=True)
    table.add_column("repository", overflow="fold")
    table.add_column("ref", overflow="fold")
    table.add_column("commit", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("stages", justify="right", no_wrap=True)
    table.add_column("started", no_wrap=True)
    table.add_column("duration", justify="right", no_wrap=True)
    table.add_column("reason", overflow="fold")
    for r in runs:
        table.add_row(
            _short(r.id), escape(_repo(r.repository)), escape(r.ref.removeprefix("refs/heads/")),
            escape(r.commit[:10]), _state(r.state), _progress(r), _when(r.created_at),
            _elapsed(r.created_at, r.finished_at), escape(r.reason),
        )  # fmt: skip
    out.print(table)


@runs_app.command("show")
def runs_show(
    run: Annotated[str, typer.Argument(help="run id, or a unique prefix of it")],
    watch: Annotated[bool, typer.Option("--watch", help="follow the run until it ends")] = False,
    as_json: JsonOption = False,
) -> None:
    """Show a run: its stages and jobs, and why it is where it is."""
    found = scheduler_call("GetRun", scheduler_pb2.GetRunRequest(run_id=run))
    stopped = False
    if watch:
        found, stopped = _watch(found, live=not as_json)
    if as_json:
        _dump(found)
    else:
        out.print(_run_view(found))
    if stopped:
        err.print(
            f"stopped watching before the run ended; it goes on (`ciuic runs cancel "
            f"{escape(found.id[:8])}` stops it)",
            highlight=False,
        )
        raise typer.Exit(1)


@runs_app.command("cancel")
def runs_cancel(
    run: Annotated[str, typer.Argument(help="run id, or a unique prefix of it")],
    reason: Annotated[str, typer.Option(help="why, for the record")] = "",
) -> None:
    """Cancel a run: every queued and running job stops, and the run ends `cancelled`."""
    found = scheduler_call(
        "CancelRun",
        scheduler_pb2.CancelRunRequest(run_id=run, reason=reason, requested_by=_user()),
    )
    line = Text.assemble("run ", (found.id, "bold"), " is ", _state(found.state))
    out.print(line)
    if not _run_ended(found):
        out.print(
            f"[dim]its jobs are being stopped; `ciuic runs show {escape(found.id[:8])} --watch` "
            "follows it[/]",
            highlight=False,
        )


# --- jobs --------------------------------------------------------------------------------------


def _metrics(metrics_json: str) -> RenderableType | None:
    if not metrics_json:
        return None
    try:
        metrics = json.loads(metrics_json)
    except ValueError as exc:
        metrics, problem = None, str(exc)
    else:
        problem = "not a JSON object"
    if not isinstance(metrics, dict):
        return Text(f"metrics: the scheduler sent unreadable metrics ({problem})", style="red")
    table = Table(title="metrics (rank 0)", title_justify="left")
    table.add_column("metric", overflow="fold")
    for column in ("last", "min", "max", "count"):
        table.add_column(column, justify="right")
    for name, summary in metrics.items():
        values = summary if isinstance(summary, dict) else {"last": summary}
        table.add_row(
            escape(name), *(_number(values.get(key)) for key in ("last", "min", "max", "count"))
        )
    return table


def _job_view(job: scheduler_pb2.Job) -> Group:
    head = Text.assemble(("job ", "dim"), (job.id, "bold"), "  ", _state(job.state))
    rows: list[tuple[str, str | Text]] = [
        ("run", escape(job.run_id)),
        ("stage", escape(f"{job.stage} ({job.kind})")),
        ("name", escape(job.name) or NONE),
    ]
    if job.kind == "trial":
        rows.append(("trial", str(job.trial)))
    rows += [
        ("attempt", f"{job.attempt} of at most {job.max_retries + 1}"),
        ("resources", f"{job.nodes} node(s) {BY} {job.gpus_per_node} GPU(s)"),
        ("queued", _when(job.queued_at)),
        ("started", _when(job.started_at)),
        ("finished", _when(job.finished_at)),
        ("duration", _elapsed(job.started_at, job.finished_at)),
        ("exit code", str(job.exit_code) if job.has_exit_code else NONE),
    ]
    if job.reason:
        rows.append(("reason", escape(job.reason)))
    if job.stopped_by:
        rows.append(("stopped by", escape(job.stopped_by)))
    if job.excluded_agents:
        rows.append(("excluded agents", escape(", ".join(job.excluded_agents))))
    if job.artifacts:
        rows.append(("artifacts", escape("\n".join(job.artifacts))))
    parts: list[RenderableType] = [head, _grid(rows)]
    if job.placement:
        placement = Table(title="placement", title_justify="left")
        for column in ("rank", "agent", "GPUs", "state"):
            placement.add_column(column)
        for n in job.placement:
            gpus = ", ".join(str(g) for g in n.gpus) or NONE
            placement.add_row(str(n.rank), escape(n.agent_id), gpus, _state(n.state))
        parts.append(placement)
    if (metrics := _metrics(job.metrics_json)) is not None:
        parts.append(metrics)
    return Group(*parts)


@jobs_app.command("ls")
def jobs_ls(
    run: Annotated[str, typer.Option("--run", help="only this run's jobs")] = "",
    state: Annotated[str, typer.Option(help="queued, running, succeeded, failed, ...")] = "",
    agent: Annotated[str, typer.Option("--agent", help="only jobs placed on this agent")] = "",
    limit: LimitOption = 20,
    as_json: JsonOption = False,
) -> None:
    """List jobs, newest first."""
    jobs, token = _list(
        "ListJobs",
        lambda page: scheduler_pb2.ListJobsRequest(
            page=page, run_id=run, state=state, agent_id=agent
        ),
        lambda response: response.jobs,
        limit,
    )
    if as_json:
        page = common_pb2.PageResponse(next_page_token=token)
        _dump(scheduler_pb2.ListJobsResponse(jobs=jobs, page=page))
        return
    out.print(_jobs_table(jobs, "jobs", with_run=True))


@jobs_app.command("show")
def jobs_show(
    job: Annotated[str, typer.Argument(help="job id")],
    as_json: JsonOption = False,
) -> None:
    """Show a job: where it runs, how it went, and its metrics."""
    found = scheduler_call("GetJob", scheduler_pb2.GetJobRequest(job_id=job))
    if as_json:
        _dump(found)
    else:
        out.print(_job_view(found))


@jobs_app.command("stop")
def jobs_stop(
    job: Annotated[str, typer.Argument(help="job id")],
    reason: Annotated[str, typer.Option(help="why, for the record")] = "",
) -> None:
    """Stop a job: its agents send SIGTERM, then SIGKILL after the grace period."""
    found = scheduler_call(
        "StopJob", scheduler_pb2.StopJobRequest(job_id=job, reason=reason, requested_by=_user())
    )
    out.print(Text.assemble("job ", (found.id, "bold"), " is ", _state(found.state)))
    if found.state in ("queued", "assigned", "running", "pending"):
        out.print(
            f"[dim]its agents are stopping it; `ciuic jobs show {escape(found.id)}` shows when "
            "it has ended[/]",
            highlight=False,
        )


# --- trials ------------------------------------------------------------------------------------


def _hparams(trial: scheduler_pb2.Trial) -> dict[str, Any] | None:
    try:
        values = json.loads(trial.hparams_json or "{}")
    except ValueError:
        return None
    return values if isinstance(values, dict) else None


@app.command("trials")
def trials(
    run: Annotated[str, typer.Argument(help="run id, or a unique prefix of it")],
    as_json: JsonOption = False,
) -> None:
    """List the trials of a run's sweep: hyperparameters, objective, and the best one."""
    response = scheduler_call("ListTrials", scheduler_pb2.ListTrialsRequest(run_id=run))
    if as_json:
        _dump(response)
        return
    hparams = [_hparams(t) for t in response.trials]
    keys = list(dict.fromkeys(key for h in hparams if h for key in h))
    caption = f"objective: {escape(response.objective)}" if response.objective else None
    table = Table(
        title=f"trials of run {escape(run)}", title_justify="left", caption=caption,
        caption_justify="left",
    )  # fmt: skip
    table.add_column("trial", justify="right")
    for key in keys:
        table.add_column(escape(key), justify="right", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("objective", justify="right")
    table.add_column("best", no_wrap=True)
    table.add_column("job", no_wrap=True)
    table.add_column("reason", overflow="fold")
    unreadable = []
    for t, values in zip(response.trials, hparams, strict=True):
        if values is None:
            unreadable.append(t.index)
        cells = [_number(values.get(key)) if values is not None else "?" for key in keys]
        objective = _number(t.objective) if t.has_objective else NONE
        table.add_row(
            str(t.index), *cells, _state(t.state), objective,
            Text("★ best", style="bold green") if t.best else "",
            escape(_job(t.job_id)), escape(t.reason),
            style="bold" if t.best else None,
        )  # fmt: skip
    out.print(table)
    if unreadable:
        shown = ", ".join(str(i) for i in unreadable)
        err.print(
            f"[yellow]warning:[/] the hyperparameters of trial(s) {shown} are not a JSON object"
        )


# --- agents ------------------------------------------------------------------------------------


def _agent_name(agent: scheduler_pb2.Agent) -> Text:
    name = Text(agent.id, style="bold")
    if agent.simulated:
        name.append(" simulated", style="magenta")
    return name


def _cores(millicores: int) -> str:
    return f"{millicores / 1000:g} cores"


@agents_app.command("ls")
def agents_ls(
    include_lost: Annotated[bool, typer.Option("--all", help="include agents marked lost")] = False,
    as_json: JsonOption = False,
) -> None:
    """List the agents and how busy their GPUs are."""
    response = scheduler_call(
        "ListAgents", scheduler_pb2.ListAgentsRequest(include_lost=include_lost)
    )
    if as_json:
        _dump(response)
        return
    table = Table(title="agents", title_justify="left")
    table.add_column("agent", no_wrap=True)
    table.add_column("hostname", overflow="fold")
    table.add_column("state", no_wrap=True)
    for column in ("GPUs", "busy", "util", "CPU", "memory"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("last seen", justify="right", no_wrap=True)
    table.add_column("jobs", justify="right")
    for a in response.agents:
        busy = sum(1 for g in a.gpus if g.job_id)
        util = f"{sum(g.utilization_pct for g in a.gpus) / len(a.gpus):.0f}%" if a.gpus else NONE
        table.add_row(
            _agent_name(a), escape(a.hostname), _state(a.state), str(len(a.gpus)), str(busy),
            util, _cores(a.millicores), _mib(a.memory_mib), _ago(a.last_seen_at), str(len(a.jobs)),
        )  # fmt: skip
    out.print(table)
    if not response.agents:
        out.print(
            "[dim]no agent has registered yet: run `ciuic-gpu-agent` on each GPU host "
            "(`--sim-gpus N` for a simulated inventory)[/dim]"
        )


def _agent_view(agent: scheduler_pb2.Agent) -> Group:
    head = Text.assemble(("agent ", "dim"), _agent_name(agent), "  ", _state(agent.state))
    rows: list[tuple[str, str | Text]] = [
        ("hostname", escape(agent.hostname)),
        ("address", escape(agent.address) or NONE),
        ("capabilities", escape(", ".join(agent.capabilities)) or NONE),
        ("CPU", f"{_cores(agent.millicores)} offered, {agent.cpu_pct:.0f}% busy"),
        ("memory", f"{_mib(agent.memory_mib)} offered"),
        ("registered", _when(agent.registered_at)),
        ("last seen", _ago(agent.last_seen_at)),
        ("jobs", escape(", ".join(agent.jobs)) or NONE),
    ]
    title = f"GPUs of {escape(agent.id)}" + (" (simulated inventory)" if agent.simulated else "")
    gpus = Table(title=title, title_justify="left")
    gpus.add_column("GPU", justify="right")
    gpus.add_column("model", overflow="fold")
    gpus.add_column("uuid", no_wrap=True)
    gpus.add_column("utilisation", no_wrap=True)
    gpus.add_column("memory", justify="right", no_wrap=True)
    gpus.add_column("temp", justify="right")
    gpus.add_column("power", justify="right")
    gpus.add_column("job", no_wrap=True)
    gpus.add_column("note")
    for g in agent.gpus:
        gpus.add_row(
            str(g.index), escape(g.model.removeprefix("NVIDIA ")), escape(g.uuid[:12]),
            _bar(g.utilization_pct),
            _memory(g.memory_used_mib, g.memory_total_mib), f"{g.temperature_c:.0f} °C",
            f"{g.power_w:.0f} W", _short(g.job_id) if g.job_id else "",
            Text("foreign process", style="red") if g.busy_foreign else "",
        )  # fmt: skip
    return Group(head, _grid(rows), gpus)


@agents_app.command("show")
def agents_show(
    agent: Annotated[str, typer.Argument(help="agent id")],
    as_json: JsonOption = False,
) -> None:
    """Show an agent and each of its GPUs: load, memory, temperature, and what holds it."""
    found = scheduler_call("GetAgent", scheduler_pb2.GetAgentRequest(agent_id=agent))
    if as_json:
        _dump(found)
    else:
        out.print(_agent_view(found))
