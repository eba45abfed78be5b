"""`ciuic` run as a person runs it, and free ports for a local platform of its own."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

from ciuic_common.components import SERVICES
from ciuic_common.servers import port_is_free

#: Ports for the services, and for the agents a stack may run beside them (`CIUIC_AGENTS`).
SERVICE_PORTS = len(SERVICES) + 3

CIUIC = str(Path(sys.executable).parent / "ciuic")


def free_block(size: int, taken: set[int]) -> int:
    """The first of `size` consecutive free ports below the ephemeral range, none in `taken`
    (ports already chosen for this stack but not bound yet); they are added to `taken`."""
    for _ in range(200):
        base = random.randrange(33000 - 5000, 33000 - size)
        block = range(base, base + size)
        if not taken.intersection(block) and all(port_is_free(p) for p in block):
            taken.update(block)
            return base
    raise RuntimeError("no free block of ports")


def ciuic(
    env: dict[str, str], *args: str, check: bool = True, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([CIUIC, *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"ciuic {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc
