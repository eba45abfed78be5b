"""`ciuic validate [FILE]`: check a pipeline file locally, without a running platform.

Problems are the command's result, so they go to stdout, one `FILE:LINE:COL: path: message` line
each (the shape compilers and linters use, which editors and CI annotate); a one-line count
follows on stderr and the exit code is 1. A valid file prints a short summary and exits 0.
`--json` prints `{"file", "valid", "errors", "summary"}` on stdout instead.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from ciuic_cli.console import app, err, fail, out
from ciuic_common.pipeline import (
    MAX_FILE_BYTES,
    PipelineSpecError,
    PipelineSummary,
    format_percentage,
    load_pipeline,
    summarize,
)

DEFAULT_FILE = ".ciuicci.yaml"


def _read(file: str) -> bytes:
    """The file's bytes (one past the limit at most: the loader says it is too large)."""
    if file == "-":
        return sys.stdin.buffer.read(MAX_FILE_BYTES + 1)
    try:
        with open(file, "rb") as handle:
            return handle.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        hint = (
            "run it in the repository root, or name the file: ciuic validate PATH"
            if file == DEFAULT_FILE
            else None
        )
        raise fail(f"{file}: no such file", hint) from None
    except IsADirectoryError:
        raise fail(f"{file} is a directory, not a pipeline file") from None
    except OSError as exc:
        raise fail(f"{file}: cannot read it: {exc.strerror or exc}") from None


def _summary_table(summary: PipelineSummary) -> Table:
    table = Table(show_header=False, box=None, padding=(0, 2, 0, 0))
    table.add_column(style="bold")
    table.add_column()

    def row(label: str, text: str | None) -> None:
        if text:
            table.add_row(label, text)

    row("stages", escape(" -> ".join(summary.stages)))
    if summary.gpus_per_trial is not None:
        row(
            "training",
            f"{summary.strategy}, {summary.nodes} node(s) x {summary.gpus_per_node} GPU(s) = "
            f"{summary.gpus_per_trial} GPUs per trial; {summary.trials} trials ({summary.search}); "
            f"best by {escape(summary.objective or '')}",
        )
    row("data", escape(", ".join(summary.datasets)))
    for alert in summary.alerts:
        actions = ", ".join(alert.actions) or "no actions"
        row("alert", escape(f"{alert.name}: {alert.condition} -> {actions}"))
    for stage in summary.validation_stages:
        gates = f"; gates: {', '.join(stage.gates)}" if stage.gates else ""
        row(
            "validation", escape(f"{stage.name} on {stage.dataset}, timeout {stage.timeout}{gates}")
        )
    if summary.deployment_formats:
        row(
            "deployment",
            escape(f"{', '.join(summary.deployment_formats)} -> {summary.destination}"),
        )
    split = ", ".join(
        f"{version} {format_percentage(share)}"
        for version, share in summary.experiment_split.items()
    )
    row("experiment", escape(split))
    row("rollout", escape(summary.rollout or ""))
    return table


@app.command()
def validate(
    file: Annotated[
        str, typer.Argument(help="the pipeline file ('-' reads stdin)", show_default=True)
    ] = DEFAULT_FILE,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON for scripts")] = False,
) -> None:
    """Check a pipeline file: every problem with its line and column, or what it will run."""
    name = "<stdin>" if file == "-" else file
    source = _read(file)
    try:
        pipeline = load_pipeline(source, filename=name)
    except PipelineSpecError as exc:
        if as_json:
            report: dict[str, Any] = {
                "file": name,
                "valid": False,
                "errors": [issue.model_dump(mode="json") for issue in exc.issues],
                "summary": None,
            }
            sys.stdout.write(json.dumps(report, indent=2) + "\n")
        else:
            sys.stdout.write(exc.format() + "\n")
            count = len(exc.issues)
            err.print(
                f"[bold red]invalid:[/] {count} problem{'s' if count != 1 else ''} in "
                f"{escape(name)}",
                highlight=False,
            )
        raise typer.Exit(1) from None
    summary = summarize(pipeline)
    if as_json:
        report = {
            "file": name,
            "valid": True,
            "errors": [],
            "summary": summary.model_dump(mode="json"),
        }
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return
    out.print(f"[green]valid:[/] {escape(name)}", highlight=False)
    out.print(_summary_table(summary), highlight=False)
