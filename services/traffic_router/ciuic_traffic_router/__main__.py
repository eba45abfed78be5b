"""`ciuic-traffic-router`: run the traffic router service."""

from __future__ import annotations

from ciuic_common.service import run_service
from ciuic_traffic_router.service import build


def main() -> None:
    run_service(build())


if __name__ == "__main__":
    main()
