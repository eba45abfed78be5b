"""`ciuic demo --quick` as a new user runs `make demo`, on free ports: the DeepSeek-style example
trains from one signed push through every stage; a second push reuses the environment cache,
gates against the first run and compares with it."""

from __future__ import annotations

import json

import pytest

from tests.e2e.stack import ciuic

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_the_demo_trains_from_one_push_and_a_second_push_reuses_and_compares(
    stack_env: dict[str, str],
) -> None:
    first = ciuic(stack_env, "demo", "--quick", timeout=900)
    assert "ciuic demo report" in first.stdout
    runs = json.loads(ciuic(stack_env, "runs", "ls", "--json").stdout)["runs"]
    (run,) = runs
    shown = json.loads(ciuic(stack_env, "runs", "show", run["id"], "--json").stdout)
    assert shown["state"] == "succeeded"
    assert {s["name"]: s["state"] for s in shown["stages"]} == {
        "setup": "succeeded",
        "training": "succeeded",
        "quick-check": "succeeded",
        "thorough-eval": "succeeded",
    }
    # A 2-node ddp trial: each trial ran on both agents.
    for job in (j for j in shown["jobs"] if j["kind"] == "trial"):
        assert len({n["agent_id"] for n in job["placement"]}) == 2
    trials = json.loads(ciuic(stack_env, "trials", run["id"], "--json").stdout)
    scored = [t for t in trials["trials"] if t.get("has_objective")]
    best = min(scored, key=lambda t: t["objective"])
    assert [t["index"] for t in trials["trials"] if t.get("best")] == [best["index"]]
    agents = json.loads(ciuic(stack_env, "agents", "ls", "--json").stdout)["agents"]
    assert len(agents) == 2
    assert all(a["simulated"] for a in agents)
    assert "dashboard: http://127.0.0.1:" in first.stdout

    second = ciuic(stack_env, "demo", "--quick", timeout=900)
    assert "against the previous run" in second.stdout
    cache = next(line for line in second.stdout.splitlines() if "environment cache:" in line)
    found, _, total = cache.split(":")[1].split(" jobs")[0].strip().partition(" of ")
    assert found == total, cache
    newest = json.loads(ciuic(stack_env, "runs", "ls", "--json").stdout)["runs"][0]
    shown = json.loads(ciuic(stack_env, "runs", "show", newest["id"], "--json").stdout)
    quick_check = next(s for s in shown["stages"] if s["name"] == "quick-check")
    assert "baseline=" in quick_check["reason"], "the second run gates against the first"
