"""The committed gRPC code in ciuic_common.proto matches proto/ (regenerate with `make proto`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_matches_the_protos() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_proto.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_generated_code_imports_cleanly() -> None:
    from ciuic_common.proto import common_pb2, trigger_pb2, trigger_pb2_grpc

    page = common_pb2.PageRequest(page_size=10, page_token="abc")
    assert common_pb2.PageRequest.FromString(page.SerializeToString()) == page
    assert trigger_pb2.DESCRIPTOR.services_by_name["TriggerService"].full_name == (
        "ciuic.v1.TriggerService"
    )
    assert callable(trigger_pb2_grpc.add_TriggerServiceServicer_to_server)
