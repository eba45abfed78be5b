"""deploy/compose.yml and `ciuic up` run the same platform: the same services, commands, ports
and CIUIC_* settings. (No Docker engine runs here, so this is what can be checked.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from ciuic_cli.stack import Stack, StackSettings
from ciuic_common.components import INFRASTRUCTURE, SERVICES, ServiceInfo

ROOT = Path(__file__).resolve().parents[2]


def default_stack() -> Stack:
    """The launcher's layout by default: one agent, whatever a local `ciuic demo` left."""
    return Stack(StackSettings(agents=1, sim_gpus=None))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "deploy" / "compose.yml").read_text())  # type: ignore[no-any-return]


def test_compose_names_the_same_components_as_the_local_launcher(compose: dict[str, Any]) -> None:
    launcher = {c.name for c in default_stack().components}
    assert set(compose["services"]) == launcher
    assert launcher == {i.name for i in INFRASTRUCTURE} | {s.name for s in SERVICES}


@pytest.mark.parametrize("info", SERVICES, ids=lambda s: s.name)
def test_each_service_runs_the_same_command_with_the_same_settings(
    compose: dict[str, Any], info: ServiceInfo
) -> None:
    entry = compose["services"][info.name]
    assert entry["command"] == [info.script]
    env = {k: str(v) for k, v in entry["environment"].items()}
    local = default_stack().service_environment(info)
    assert set(env) == set(local), "the same CIUIC_* settings in both"
    assert env["CIUIC_GRPC_PORT"] == local["CIUIC_GRPC_PORT"] == str(info.grpc_port)
    assert env["CIUIC_METRICS_PORT"] == local["CIUIC_METRICS_PORT"] == str(info.metrics_port)


def test_the_agent_reserves_nvidia_gpus(compose: dict[str, Any]) -> None:
    devices = compose["services"]["gpu_agent"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)


def test_nats_runs_jetstream_on_a_volume(compose: dict[str, Any]) -> None:
    nats = compose["services"]["nats"]
    assert "--jetstream" in nats["command"]
    store = nats["command"][nats["command"].index("--store_dir") + 1]
    assert any(v.endswith(f":{store}") for v in nats["volumes"])


def test_the_image_installs_every_package() -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    for path in ["libs/common", "libs/sdk", "cli", *(f"services/{s.name}" for s in SERVICES)]:
        assert f"./{path}" in dockerfile, path
