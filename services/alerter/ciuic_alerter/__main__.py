"""`ciuic-alerter`: run the alerter service."""

from __future__ import annotations

from ciuic_alerter.service import build
from ciuic_common.service import run_service


def main() -> None:
    run_service(build())


if __name__ == "__main__":
    main()
