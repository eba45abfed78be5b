"""What every `ciuic` command shares: the Typer app, the consoles, and how failures print.

Exit codes: 0 ok, 1 the operation failed, 2 the command line was wrong.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

app = typer.Typer(
    name="ciuic",
    help="ciuic: CI/CD for training ML models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Piped output (CI logs, `| less`) gets wide tables rather than rich's default 80 columns.
out = Console(width=None if sys.stdout.isatty() else 120)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 120)


def fail(message: str, hint: str | None = None) -> typer.Exit:
    """Print an error (and a hint) on stderr; return the exit to raise."""
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    if hint:
        err.print(f"[dim]hint: {hint}[/]", highlight=False)
    return typer.Exit(1)
