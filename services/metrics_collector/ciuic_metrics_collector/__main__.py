"""`ciuic-metrics-collector`: run the metrics collector service."""

from __future__ import annotations

from ciuic_common.service import run_service
from ciuic_metrics_collector.service import build


def main() -> None:
    run_service(build())


if __name__ == "__main__":
    main()
