"""Metrics go to the platform through the ciuic SDK, and to stdout for the job's log.

Inside a job the agent puts the SDK on PYTHONPATH; outside one `ciuic.log` does nothing, so a
missing SDK is only an error when a job's metrics socket is there to receive the points.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from types import ModuleType

__all__ = ["report"]

_sdk: ModuleType | None
try:
    import ciuic as _sdk
except ImportError:
    if os.environ.get("CIUIC_METRICS_SOCKET"):
        raise
    _sdk = None
    print("ciuic SDK not installed: metrics are printed only", file=sys.stderr)


def report(metrics: Mapping[str, float], step: int) -> None:
    """Log `metrics` at `step` through the SDK and print them on one line."""
    if _sdk is not None:
        _sdk.log(metrics, step=step)
    shown = "  ".join(f"{key}={value:.6g}" for key, value in metrics.items())
    print(f"step {step:>6}  {shown}", flush=True)
