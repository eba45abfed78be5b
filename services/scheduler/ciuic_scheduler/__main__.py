"""`ciuic-scheduler`: run the scheduler service."""

from __future__ import annotations

from ciuic_common.service import run_service
from ciuic_scheduler.service import build


def main() -> None:
    run_service(build())


if __name__ == "__main__":
    main()
