"""`ciuic repos`, `ciuic run`, `ciuic deliveries`: what reaches the trigger and what it became."""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated, Any

import typer
from google.protobuf.json_format import MessageToDict
from rich.markup import escape
from rich.table import Table

from ciuic_cli.clients import ApiError, call
from ciuic_cli.console import app, fail, out
from ciuic_cli.stack import StackSettings
from ciuic_common.proto import common_pb2, trigger_pb2, trigger_pb2_grpc

repos_app = typer.Typer(help="Repositories whose pushes start pipelines.", no_args_is_help=True)
deliveries_app = typer.Typer(help="Webhook deliveries and what they became.", no_args_is_help=True)
app.add_typer(repos_app, name="repos")
app.add_typer(deliveries_app, name="deliveries")

JsonOption = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]
STATUS_STYLE = {
    "requested": "green",
    "skipped": "dim",
    "rejected": "red",
    "failed": "red",
    "received": "yellow",
}


def _trigger(method: str, request: Any, *, timeout: float = 30.0) -> Any:
    try:
        return call(
            "trigger", trigger_pb2_grpc.TriggerServiceStub, method, request, timeout=timeout
        )
    except ApiError as exc:
        raise fail(str(exc)) from None


def _dump(message: Any) -> None:
    sys.stdout.write(
        json.dumps(MessageToDict(message, preserving_proto_field_name=True), indent=2) + "\n"
    )


def _when(ts: Any) -> str:
    return ts.ToDatetime().strftime("%Y-%m-%d %H:%M:%S") if ts.seconds else "-"


@repos_app.command("add")
def repos_add(
    url: Annotated[str, typer.Argument(help="clone URL (https, ssh, file://) or local path")],
    secret_env: Annotated[
        str, typer.Option("--secret-env", help="environment variable holding the webhook secret")
    ],
    replace: Annotated[bool, typer.Option(help="change the secret of a registered repo")] = False,
    as_json: JsonOption = False,
) -> None:
    """Register a repository; its pushes, signed with the secret, start pipelines."""
    secret = os.environ.get(secret_env)
    if not secret:
        raise fail(
            f"the environment variable {secret_env} is not set or empty",
            f"export {secret_env}=<the secret your git host signs webhooks with>",
        )
    repo = _trigger(
        "AddRepository", trigger_pb2.AddRepositoryRequest(url=url, secret=secret, replace=replace)
    )
    if as_json:
        _dump(repo)
        return
    out.print(f"registered [bold]{repo.url}[/] (matches webhooks for {repo.key})")
    port = StackSettings().webhook_port
    hooks = f"http://<this host>:{port}/webhooks/{{github,gitlab,gitea}}"
    out.print(f"[dim]point its webhook at {hooks}[/]")


@repos_app.command("ls")
def repos_ls(as_json: JsonOption = False) -> None:
    """List the registered repositories."""
    response = _trigger("ListRepositories", trigger_pb2.ListRepositoriesRequest())
    if as_json:
        _dump(response)
        return
    table = Table(title="repositories", title_justify="left")
    for column in ("url", "key", "deliveries", "last delivery", "registered"):
        table.add_column(column)
    for r in response.repositories:
        table.add_row(
            r.url, r.key, str(r.deliveries), _when(r.last_delivery_at), _when(r.created_at)
        )
    out.print(table)


@repos_app.command("rm")
def repos_rm(
    url: Annotated[str, typer.Argument(help="the URL or path it was registered with")],
) -> None:
    """Unregister a repository: its pushes start nothing from now on."""
    _trigger("RemoveRepository", trigger_pb2.RemoveRepositoryRequest(url=url))
    out.print(f"unregistered {url}")


def _print_errors(d: Any) -> None:
    for e in d.errors:
        location = f".ciuicci.yaml:{e.line or '?'}:{e.column or '?'}"
        out.print(f"  {location}: {escape(e.field_path)}: {escape(e.message)}", highlight=False)


def _print_delivery(d: Any) -> None:
    style = STATUS_STYLE.get(d.status, "")
    out.print(f"[bold]{d.id}[/]  [{style}]{d.status}[/]  {escape(d.reason)}", highlight=False)
    table = Table.grid(padding=(0, 2))
    rows = [
        ("repository", d.repository),
        ("provider", f"{d.provider} ({d.event}), delivery {d.delivery_id}"),
        ("ref", d.ref or "-"),
        ("commit", d.commit or "-"),
        ("pusher", d.pusher or "-"),
        ("received", _when(d.received_at)),
        ("finished", _when(d.finished_at)),
        ("pipeline event", d.pipeline_event_id or "-"),
        (
            "changed files",
            ", ".join(d.changed_files[:20]) + (" …" if len(d.changed_files) > 20 else "") or "-",
        ),
    ]
    for key, value in rows:
        table.add_row(f"[dim]{key}[/]", escape(value))
    out.print(table)
    _print_errors(d)


@app.command("run")
def run(
    repo: Annotated[str, typer.Option("--repo", help="registered repository URL or local path")],
    ref: Annotated[str, typer.Option("--ref", help="branch, tag or commit (default: HEAD)")] = "",
    as_json: JsonOption = False,
) -> None:
    """Start a pipeline run by hand (branch and path filters do not apply)."""
    with out.status(f"reading the pipeline file of {repo} at {ref or 'HEAD'}…"):
        delivery = _trigger(
            "TriggerRun",
            trigger_pb2.TriggerRunRequest(
                repository=repo, ref=ref, requested_by=os.environ.get("USER", "")
            ),
            timeout=180,
        )
    if as_json:
        _dump(delivery)
    else:
        _print_delivery(delivery)
    if delivery.status != "requested":
        raise typer.Exit(1)


@deliveries_app.command("ls")
def deliveries_ls(
    repo: Annotated[str, typer.Option("--repo", help="only this repository")] = "",
    status: Annotated[
        str, typer.Option(help="requested, skipped, rejected, failed, received")
    ] = "",
    limit: Annotated[int, typer.Option(help="how many, newest first")] = 20,
    as_json: JsonOption = False,
) -> None:
    """List deliveries, newest first."""
    response = _trigger(
        "ListDeliveries",
        trigger_pb2.ListDeliveriesRequest(
            page=common_pb2.PageRequest(page_size=limit), repository=repo, status=status
        ),
    )
    if as_json:
        _dump(response)
        return
    table = Table(title="deliveries", title_justify="left")
    for column in ("id", "received", "provider", "ref", "commit", "status", "reason"):
        table.add_column(column, overflow="fold")
    for d in response.deliveries:
        style = STATUS_STYLE.get(d.status, "")
        table.add_row(
            d.id[:8], _when(d.received_at), d.provider, d.ref.removeprefix("refs/heads/"),
            d.commit[:10], f"[{style}]{d.status}[/]", escape(d.reason),
        )  # fmt: skip
    out.print(table)


@deliveries_app.command("show")
def deliveries_show(
    delivery: Annotated[str, typer.Argument(help="delivery id, or a unique prefix of it")],
    as_json: JsonOption = False,
) -> None:
    """Show one delivery: what arrived, what it became, and why."""
    d = _trigger("GetDelivery", trigger_pb2.GetDeliveryRequest(id=delivery))
    if as_json:
        _dump(d)
    else:
        _print_delivery(d)
