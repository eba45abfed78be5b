"""`ciuic demo`: the platform's main job on one machine, from one git push to a report.

It brings the platform up with two agents (simulated GPU inventories, jobs run for real on the
CPU), makes a local git repository of `examples/deepseek-tiny` (a new commit on every demo),
registers it, delivers a signed push webhook exactly as GitHub would, follows the run live
(stages, trials, loss) and ends with a report: the chosen trial and why, validation against the
baseline, time per stage, cache hits, the comparison with the previous run, the dashboard.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import nats.errors
import typer
import yaml
from rich.console import Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from ciuic_cli.clients import ApiError, call
from ciuic_cli.console import app, fail, out
from ciuic_cli.logs_cmds import nats_url, tail_logs
from ciuic_cli.stack import Stack, StackError, StackSettings
from ciuic_common.events import LogsBatch
from ciuic_common.proto import (
    metrics_collector_pb2,
    metrics_collector_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
    trigger_pb2,
    trigger_pb2_grpc,
)

ROOT = Path(__file__).resolve().parents[1].parent
EXAMPLE = ROOT / "examples" / "deepseek-tiny"
TERMINAL = ("succeeded", "failed", "cancelled")
STYLE = {
    "succeeded": "green",
    "failed": "red",
    "cancelled": "dim",
    "running": "yellow",
    "queued": "cyan",
    "assigned": "cyan",
    "waiting": "magenta",
    "pending": "dim",
}


@dataclass
class DemoRepo:
    path: Path
    url: str
    secret: str
    before: str
    after: str
    changed: list[str]


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=ciuic demo", "-c", "user.email=demo@ciuic.local", *args],
        cwd=repo, check=True, capture_output=True, text=True,
    )  # fmt: skip
    return done.stdout.strip()


def shrink(spec_text: str) -> str:
    """The example's pipeline made quick (for tests): two trials of a few steps."""
    spec = yaml.safe_load(spec_text)
    training = spec["training"]
    training["command"] = "python train.py --steps 12 --set eval_every=6 --set checkpoint_every=6"
    for param in training.get("hyperparameters", []):
        if "values" in param:
            param["values"] = (
                param["values"][-2:] if param["name"] == "learning_rate" else param["values"][:1]
            )
    return str(yaml.safe_dump(spec, sort_keys=False))


def prepare_repo(home: Path, example: Path, *, quick: bool) -> DemoRepo:
    """The demo's repository under `home`: created from the example, or given a new commit."""
    repo = home / "demo" / example.name
    secret_file = home / "demo" / "webhook-secret"
    fresh = not (repo / ".git").is_dir()
    if fresh:
        repo.mkdir(parents=True, exist_ok=True)
        _git(repo, "init", "-q", "-b", "main")
        secret_file.write_text(secrets.token_hex(16))
    secret = secret_file.read_text().strip()
    before = "0" * 40 if fresh else _git(repo, "rev-parse", "HEAD")
    for source in example.rglob("*"):
        relative = source.relative_to(example)
        if source.is_dir() or "__pycache__" in relative.parts or relative.parts[0] == "outputs":
            continue
        target = repo / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    if quick:
        spec = repo / ".ciuicci.yaml"
        spec.write_text(shrink(spec.read_text()))
    runs = repo / "demo_runs.py"  # a change inside the trigger's paths: every demo is a push
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    previous = runs.read_text() if runs.exists() else '"""When `ciuic demo` pushed."""\n'
    runs.write_text(previous + f"# demo push at {stamp}\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", f"deepseek-tiny: demo push at {stamp}")
    after = _git(repo, "rev-parse", "HEAD")
    if fresh:
        changed = _git(repo, "ls-files").splitlines()
    else:
        changed = _git(repo, "diff", "--name-only", before, after).splitlines()
    return DemoRepo(repo, repo.as_uri(), secret, before, after, changed)


def push_payload(repo: DemoRepo) -> bytes:
    """The body GitHub sends for a push of `repo.after` to main."""
    return json.dumps(
        {
            "ref": "refs/heads/main",
            "before": repo.before,
            "after": repo.after,
            "created": repo.before == "0" * 40,
            "repository": {"clone_url": repo.url, "full_name": "local/deepseek-tiny"},
            "pusher": {"name": "demo"},
            "head_commit": {"id": repo.after},
            "commits": [{"id": repo.after, "added": [], "modified": repo.changed, "removed": []}],
        }
    ).encode()


def deliver(url: str, secret: str, body: bytes) -> str:
    """POST the push as GitHub would (signed); the trigger's delivery id."""
    request = urllib.request.Request(
        url,
        data=body,
        headers={
            "Content-Type": "application/json",
            "User-Agent": "GitHub-Hookshot/ciuic-demo",
            "X-GitHub-Event": "push",
            "X-GitHub-Delivery": str(uuid.uuid4()),
            "X-Hub-Signature-256": "sha256="
            + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest(),
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return str(json.loads(response.read())["delivery"])
    except urllib.error.HTTPError as exc:
        raise fail(f"the trigger refused the webhook: {exc.code} {exc.read().decode()}") from None
    except OSError as exc:
        raise fail(f"cannot reach the trigger's webhook at {url} ({exc})") from None


def _api(service: str, stub: Any, method: str, request: Any) -> Any:
    try:
        return call(service, stub, method, request, timeout=30.0)
    except ApiError as exc:
        raise fail(str(exc), "`ciuic status` shows what runs") from None


def _scheduler(method: str, request: Any) -> Any:
    return _api("scheduler", scheduler_pb2_grpc.SchedulerServiceStub, method, request)


def _metrics(method: str, request: Any) -> Any | None:
    """The metrics collector's answer, or None while it cannot give one (the demo goes on)."""
    try:
        return call(
            "metrics_collector",
            metrics_collector_pb2_grpc.MetricsServiceStub,
            method,
            request,
            timeout=10.0,
        )
    except ApiError:
        return None


def _duration(stage_or_job: Any) -> str:
    if not stage_or_job.HasField("started_at"):
        return "—"
    start = stage_or_job.started_at.ToDatetime().timestamp()
    end = (
        stage_or_job.finished_at.ToDatetime().timestamp()
        if stage_or_job.HasField("finished_at")
        else time.time()
    )
    seconds = max(0.0, end - start)
    return f"{seconds:.1f}s" if seconds < 60 else f"{int(seconds // 60)}m {int(seconds % 60):02d}s"


def _state(state: str) -> str:
    return f"[{STYLE.get(state, 'white')}]{escape(state)}[/]"


def _view(run: scheduler_pb2.Run, trials: Any, losses: dict[str, float]) -> Group:
    stages = Table(title=f"run {run.id}  {_state(run.state)}", title_justify="left")
    for column in ("stage", "state", "time", "detail"):
        stages.add_column(column)
    for s in run.stages:
        detail = f"waiting for {s.service}" if s.state == "waiting" and s.service else s.reason
        stages.add_row(escape(s.name), _state(s.state), _duration(s), escape(detail or ""))
    parts: list[Any] = [stages]
    if trials is not None and trials.trials:
        table = Table(title=f"trials — objective {escape(trials.objective)}", title_justify="left")
        for column in ("trial", "hyperparameters", "state", "loss now", "objective", ""):
            table.add_column(column)
        for t in trials.trials:
            hp = ", ".join(f"{k}={v}" for k, v in json.loads(t.hparams_json).items())
            loss = losses.get(t.job_id)
            table.add_row(
                str(t.index), escape(hp), _state(t.state),
                f"{loss:.4f}" if loss is not None else "—",
                f"{t.objective:.4f}" if t.has_objective else "—",
                "[bold green]★ best[/]" if t.best else "",
            )  # fmt: skip
        parts.append(table)
    return Group(*parts)


def _losses(run_id: str) -> dict[str, float]:
    """The latest training loss of each job, from the metrics collector."""
    answer = _metrics(
        "GetSummaries",
        metrics_collector_pb2.GetSummariesRequest(run_ids=[run_id], keys=["training_loss"]),
    )
    return {s.job_id: s.last for s in answer.summaries} if answer is not None else {}


def follow(run_id: str, timeout: float) -> scheduler_pb2.Run:
    """Show the run live until it ends; the final view stays on screen."""
    deadline = time.monotonic() + timeout
    with Live(console=out, refresh_per_second=2, transient=False) as live:
        while True:
            run = _scheduler("GetRun", scheduler_pb2.GetRunRequest(run_id=run_id))
            trials = None
            if any(s.kind == "training" for s in run.stages):
                trials = _scheduler("ListTrials", scheduler_pb2.ListTrialsRequest(run_id=run_id))
            live.update(_view(run, trials, _losses(run_id)))
            if run.state in TERMINAL or time.monotonic() > deadline:
                return run  # type: ignore[no-any-return]
            time.sleep(1.0)


def cache_notes(run_id: str) -> list[str]:
    """What the agents said of the environment cache in this run's job logs (hit or miss)."""
    notes: list[str] = []

    def emit(batch: LogsBatch) -> None:
        for line in batch.lines:
            if line.text.startswith("[ciuic] cache ") and ": " in line.text:
                said = line.text.split(": ", 1)[1]  # after "cache <key>"
                job = batch.job_id.partition("-")[2]
                notes.append(f"{job} (node {batch.node}): {said}")

    try:
        asyncio.run(tail_logs(nats_url(), run_id, emit, follow=False, wait=2.0))
    except (OSError, nats.errors.Error):
        return []
    return notes


def report(run: scheduler_pb2.Run, previous: str | None, started: float, dashboard: str) -> None:
    out.rule("[bold]ciuic demo report")
    out.print(f"run {run.id} {_state(run.state)} in {time.monotonic() - started:.0f}s")
    if run.reason:
        out.print(f"  why: {escape(run.reason)}")
    training = next((s for s in run.stages if s.kind == "training"), None)
    if training is not None:
        out.print(f"[bold]chosen trial[/]: {escape(training.reason or '—')}")
        best = [j for j in run.jobs if j.kind == "trial" and j.trial == run.best_trial]
        if best:
            metrics = json.loads(best[0].metrics_json or "{}")
            shown = ", ".join(
                f"{k}={v.get('last'):.4g}" for k, v in sorted(metrics.items())
                if isinstance(v.get("last"), float) and not k.startswith("system/")
            )  # fmt: skip
            out.print(f"  its final metrics: {escape(shown)}")
    table = Table(title="stages", title_justify="left")
    for column in ("stage", "state", "time", "result"):
        table.add_column(column)
    for s in run.stages:
        table.add_row(escape(s.name), _state(s.state), _duration(s), escape(s.reason))
    out.print(table)
    if previous:
        comparison = _metrics(
            "CompareRun",
            metrics_collector_pb2.CompareRunRequest(run_id=run.id, baseline_run_id=previous),
        )
        if comparison is not None and comparison.metrics:
            compared = Table(title=f"against the previous run {previous}", title_justify="left")
            for column in ("metric", "this run", "previous", "delta", "verdict"):
                compared.add_column(column)
            for m in comparison.metrics:
                colour = {"improved": "green", "regressed": "red"}.get(m.verdict, "dim")
                compared.add_row(
                    escape(m.key), f"{m.value:.4g}", f"{m.baseline:.4g}", f"{m.delta:+.4g}",
                    f"[{colour}]{escape(m.verdict)}[/]",
                )  # fmt: skip
            out.print(compared)
    notes = cache_notes(run.id)
    if notes:
        hits = sum(" hit" in n for n in notes)
        out.print(f"[bold]environment cache[/]: {hits} of {len(notes)} jobs found it ready")
        for note in notes:
            out.print(f"  {escape(note)}", highlight=False)
    out.print(f"dashboard: {dashboard}/runs/{run.id}")
    out.print(
        f"more: `ciuic runs show {run.id[:8]}`, `ciuic trials {run.id[:8]}`, "
        f"`ciuic runs logs {run.id[:8]}`, `ciuic agents ls`"
    )


@app.command()
def demo(
    quick: Annotated[
        bool, typer.Option("--quick", help="a short sweep of two trials (what the tests run)")
    ] = False,
    timeout: Annotated[float, typer.Option(help="give up following after this many seconds")] = 900,
    example: Annotated[Path, typer.Option(help="the example to push")] = EXAMPLE,
) -> None:
    """Train the DeepSeek-style example from one git push and report on it."""
    started = time.monotonic()
    settings = StackSettings()
    updates: dict[str, Any] = {}
    if "agents" not in settings.model_fields_set:
        updates["agents"] = 2
    if "sim_gpus" not in settings.model_fields_set:
        updates["sim_gpus"] = 4
    stack = Stack(settings.model_copy(update=updates))
    with out.status("bringing the platform up (two agents, simulated GPUs)…"):
        try:
            stack.up()
        except StackError as exc:
            raise fail(str(exc), "`ciuic status` shows what runs; `ciuic down` stops it") from None
    out.print(f"[green]platform up[/] — state in {stack.home}")

    repo = prepare_repo(stack.home, example.resolve(), quick=quick)
    out.print(f"repository {repo.path} at {repo.after[:10]} ({len(repo.changed)} files changed)")
    _api(
        "trigger",
        trigger_pb2_grpc.TriggerServiceStub,
        "AddRepository",
        trigger_pb2.AddRepositoryRequest(url=str(repo.path), secret=repo.secret, replace=True),
    )
    runs_before = _scheduler("ListRuns", scheduler_pb2.ListRunsRequest(repository=repo.url))
    previous = next((r.id for r in runs_before.runs if r.state == "succeeded"), None)

    hook = f"http://{stack.settings.host}:{stack.settings.webhook_port}/webhooks/github"
    delivery = deliver(hook, repo.secret, push_payload(repo))
    out.print(f"pushed: webhook delivered to {hook} (delivery {delivery[:8]})")
    for _ in range(300):
        shown = _api(
            "trigger",
            trigger_pb2_grpc.TriggerServiceStub,
            "GetDelivery",
            trigger_pb2.GetDeliveryRequest(id=delivery),
        )
        if shown.status != "received":
            break
        time.sleep(0.1)
    if shown.status != "requested":
        details = "; ".join(e.message for e in shown.errors) or shown.reason
        raise fail(f"the push was {shown.status}: {details}")

    run_id = None
    for _ in range(300):
        runs = _scheduler("ListRuns", scheduler_pb2.ListRunsRequest(repository=repo.url))
        run_id = next((r.id for r in runs.runs if r.commit == repo.after), None)
        if run_id:
            break
        time.sleep(0.1)
    if run_id is None:
        raise fail("the scheduler did not create the run", "`ciuic logs scheduler` says why")
    out.print(f"run {run_id} created; following it (Ctrl-C leaves it running)")
    try:
        run = follow(run_id, timeout)
    except KeyboardInterrupt:
        out.print(f"left run {run_id} running: `ciuic runs show {run_id[:8]} --watch`")
        raise typer.Exit(0) from None
    dashboard = f"http://{stack.settings.host}:{stack.settings.dashboard_port}"
    report(run, previous, started, dashboard)
    if run.state != "succeeded":
        raise typer.Exit(1)
