"""The ciuic SDK: what training code imports. Standard library only.

    import ciuic
    ciuic.log({"training_loss": loss, "accuracy": acc}, step=step)

Inside a ciuic job the agent passes a Unix socket in `CIUIC_METRICS_SOCKET`; each call adds one
JSON line to a buffer the calling thread writes to the socket every 64 KiB or 100 ms (and at
exit), and the agent batches the points onto the bus (training code never touches the bus).
Outside a job the variable is unset and `log` does nothing, so the same script runs on a laptop
unchanged.
"""

from __future__ import annotations

from ciuic._channel import close, log

__all__ = ["close", "log"]
__version__ = "0.1.0"
