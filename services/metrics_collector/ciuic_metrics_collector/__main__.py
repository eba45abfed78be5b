"""`ciuic-metrics-collector`: run the metrics collector service."""

from __future__ import annotations

import gc

from ciuic_common.service import run_service
from ciuic_metrics_collector.service import build

#: Collect the young generation every this many allocations (Python's default is 700).
GC_YOUNG_THRESHOLD = 50_000


def main() -> None:
    # Ingestion keeps ~10^5 decoded points alive at a time; with the default thresholds the
    # cyclic collector walks them over and over and decoding slows 3-4x (measured; see
    # docs/benchmarks.md). Points hold no cycles, so collecting rarely costs little memory.
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 100)
    run_service(build())


if __name__ == "__main__":
    main()
