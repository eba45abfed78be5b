"""`ciuic runs logs RUN [--follow] [--job J]`: a run's log lines, with their job and node.

The lines come from the bus's LOGS stream (`ciuic.logs.<run_id>`, where agents publish them in
batches) through an ordered, ephemeral JetStream consumer: nothing is left behind on the server,
and the lines come in the order the agents sent them. Without `--follow` the command prints
what is stored and exits; with it, it goes on printing new lines until interrupted. The stream
keeps a bounded window (DESIGN.md); a job's complete log is in S3 at
`runs/<run_id>/<job_id>/logs/node-<rank>.log`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Callable
from typing import Annotated

import nats
import nats.errors
import nats.js.errors
import typer
from nats.js.api import DeliverPolicy
from rich.markup import escape

from ciuic_cli.clients import ApiError, call
from ciuic_cli.console import err, fail, out
from ciuic_cli.scheduler_cmds import runs_app
from ciuic_cli.stack import StackSettings
from ciuic_common.events import STREAMS, LogsBatch
from ciuic_common.proto import scheduler_pb2, scheduler_pb2_grpc

__all__ = ["nats_url", "runs_logs", "tail_logs"]

Emit = Callable[[LogsBatch], None]


def nats_url() -> str:
    """`CIUIC_NATS_URL`, else where `ciuic up` runs NATS."""
    if url := os.environ.get("CIUIC_NATS_URL"):
        return url
    settings = StackSettings()
    return f"nats://{settings.host}:{settings.nats_port}"


async def tail_logs(url: str, run_id: str, emit: Emit, *, follow: bool, wait: float = 10.0) -> int:
    """Hand every stored LogsBatch of `run_id` to `emit` (then new ones, with `follow`);
    how many batches were read. `wait` bounds each wait for a stored batch."""
    nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=-1 if follow else 0)
    try:
        js = nc.jetstream()
        subject = LogsBatch.wildcard_subject(run_id=run_id)
        stream = STREAMS["LOGS"].name
        try:
            info = await js.stream_info(stream, subjects_filter=subject)
            stored = (info.state.subjects or {}).get(subject, 0)
        except nats.js.errors.NotFoundError:
            stored = 0
        if not stored and not follow:
            return 0
        sub = await js.subscribe(
            subject, stream=stream, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
        )
        read = 0
        while True:
            try:
                msg = await sub.next_msg(timeout=None if follow else wait)
            except TimeoutError:
                return read  # the stored window moved on meanwhile
            read += 1
            emit(LogsBatch.from_bytes(msg.data))
            if not follow and msg.metadata.num_pending == 0:
                return read
    finally:
        await nc.close()


@runs_app.command("logs")
def runs_logs(
    run: Annotated[str, typer.Argument(help="run id, or a unique prefix of it")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing new lines")] = False,
    job: Annotated[
        str, typer.Option("--job", "-j", help="only this job (its id, or its name: trial-3)")
    ] = "",
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object a line")] = False,
) -> None:
    """Show a run's log lines with their job and node (live with --follow)."""

    # The stream is keyed by the full run id; people type a prefix (the scheduler knows the
    # rest; without it, the id is taken as given) and a job's name.
    with contextlib.suppress(ApiError):
        run = call(
            "scheduler",
            scheduler_pb2_grpc.SchedulerServiceStub,
            "GetRun",
            scheduler_pb2.GetRunRequest(run_id=run),
            timeout=5.0,
        ).id

    def emit(batch: LogsBatch) -> None:
        if job and job not in (batch.job_id, batch.job_id.partition("-")[2]):
            return
        for line in batch.lines:
            if as_json:
                record = {"job_id": batch.job_id, "node": batch.node}
                record.update(line.model_dump(mode="json"))
                print(json.dumps(record), flush=True)
                continue
            style = "red" if line.stream == "stderr" else "dim"
            out.print(
                f"[{style}]{line.timestamp:%H:%M:%S}[/] [cyan]{escape(batch.job_id)}[/] "
                f"[magenta]{escape(batch.node)}[/] {escape(line.text)}",
                highlight=False,
                soft_wrap=True,
            )

    url = nats_url()
    try:
        read = asyncio.run(tail_logs(url, run, emit, follow=follow))
    except KeyboardInterrupt:
        return
    except (OSError, nats.errors.Error) as exc:
        raise fail(
            f"cannot read logs from NATS at {url} ({exc!r})",
            "is the platform up? `ciuic status` tells; CIUIC_NATS_URL points elsewhere",
        ) from None
    if not read:
        err.print(f"no log lines stored for run {escape(run)}", highlight=False)
