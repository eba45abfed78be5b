"""`ciuic up`, `down`, `status`, `logs`: the local platform."""

from __future__ import annotations

import json
import sys
import time
from typing import Annotated

import typer
from rich.live import Live
from rich.table import Table

from ciuic_cli.console import app, fail, out
from ciuic_cli.stack import ComponentStatus, Stack, StackError

STATE_STYLE = {"healthy": "green", "starting": "yellow", "unhealthy": "red", "stopped": "dim"}


def _progress_table(states: dict[str, str], started: float) -> Table:
    table = Table(title=f"ciuic up  ({time.monotonic() - started:.0f}s)", title_justify="left")
    table.add_column("component")
    table.add_column("state")
    for name, state in states.items():
        style = (
            "green"
            if state in ("healthy", "already running")
            else ("red" if state == "failed" else "yellow")
        )
        table.add_row(name, f"[{style}]{state}[/]")
    return table


@app.command()
def up() -> None:
    """Start the whole platform on this machine and wait until every part is healthy."""
    stack = Stack()
    states = {c.name: "waiting" for c in stack.components}
    started = time.monotonic()
    try:
        with Live(_progress_table(states, started), console=out, transient=False) as live:

            def progress(name: str, state: str) -> None:
                states[name] = state
                live.update(_progress_table(states, started))

            stack.up(progress)
        if not out.is_terminal:
            out.print()  # a live display ends mid-line when it is not on a terminal
    except StackError as exc:
        raise fail(str(exc), "`ciuic status` shows what runs; `ciuic down` stops it") from None
    out.print(
        f"[green]ciuic is up[/] in {time.monotonic() - started:.1f}s — state in {stack.home}; "
        "`ciuic status` to check, `ciuic down` to stop"
    )


@app.command()
def down() -> None:
    """Stop every component cleanly (services drain first); the data stays for the next `up`."""
    stack = Stack()
    started = time.monotonic()
    with out.status("stopping ciuic…"):
        stack.down(lambda name, state: out.print(f"  {name:<18} {state}"))
    out.print(f"[green]ciuic is down[/] ({time.monotonic() - started:.1f}s)")


def _status_table(rows: list[ComponentStatus]) -> Table:
    table = Table(title="ciuic status", title_justify="left")
    for column in ("component", "kind", "state", "address", "pid", "uptime"):
        table.add_column(column)
    for r in rows:
        uptime = f"{r.uptime_s:.0f}s" if r.uptime_s is not None else "-"
        table.add_row(
            r.name,
            r.kind,
            f"[{STATE_STYLE[r.state]}]{r.state}[/]",
            r.address,
            str(r.pid or "-"),
            uptime,
        )
    return table


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="print JSON for scripts")] = False,
) -> None:
    """Show every component's state, address and pid. Exits 1 unless all are healthy."""
    rows = Stack().status()
    if as_json:
        sys.stdout.write(json.dumps([r.as_dict() for r in rows], indent=2) + "\n")
    else:
        out.print(_status_table(rows))
    if any(r.state != "healthy" for r in rows):
        raise typer.Exit(1)


@app.command()
def logs(
    component: Annotated[str, typer.Argument(help="nats, postgres, s3 or a service name")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing new lines")] = False,
    lines: Annotated[int, typer.Option("--lines", "-n", help="how many last lines")] = 50,
) -> None:
    """Show a component's log file."""
    stack = Stack()
    try:
        c = stack.component(component)
        lines_out = stack.follow(c, lines) if follow else stack.tail(c, lines)
        for line in lines_out:
            print(line, flush=follow)
    except StackError as exc:
        raise fail(str(exc)) from None
    except KeyboardInterrupt:
        return
