"""The `ciuic` command. Nouns then verbs; tables for people, `--json` for scripts.

Each group of commands lives in its own module and registers itself on the shared app.
"""

from __future__ import annotations

import ciuic_cli.validate_cmd  # noqa: F401  (registers `ciuic validate`)
from ciuic_cli import (  # noqa: F401  (they register their commands)
    demo_cmd,
    logs_cmds,
    metrics_cmds,
    scheduler_cmds,
    stack_cmds,
    trigger_cmds,
)
from ciuic_cli.console import app, err
from ciuic_common.errors import CiuicError
from ciuic_common.logging import configure_logging


def main() -> None:
    configure_logging("console", "WARNING")
    try:
        app()
    except CiuicError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
