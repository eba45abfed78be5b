"""`ciuic-gpu-agent`: run the gpu agent service.

Flags override the `CIUIC_*` settings: `--sim-gpus N` (`CIUIC_SIM_GPUS`) describes N simulated
GPUs (tests, demos; always shown as simulated), `--agent-id ID` (`CIUIC_AGENT_ID`) names it.
"""

from __future__ import annotations

import argparse
from typing import Any

from ciuic_common.service import run_service
from ciuic_gpu_agent.service import GpuAgentSettings, build


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ciuic-gpu-agent", description=__doc__.splitlines()[0])
    parser.add_argument("--sim-gpus", type=int, metavar="N", help="simulate N GPUs")
    parser.add_argument("--agent-id", metavar="ID", help="this agent's id (default: hostname)")
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {}
    if args.sim_gpus is not None:
        if args.sim_gpus < 0:
            parser.error("--sim-gpus takes 0 or more")
        overrides["sim_gpus"] = args.sim_gpus
    if args.agent_id is not None:
        overrides["agent_id"] = args.agent_id
    run_service(build(GpuAgentSettings(**overrides)))


if __name__ == "__main__":
    main()
