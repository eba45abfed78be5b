"""`ciuic-data-versioner`: run the data versioner service."""

from __future__ import annotations

from ciuic_common.service import run_service
from ciuic_data_versioner.service import build


def main() -> None:
    run_service(build())


if __name__ == "__main__":
    main()
