"""The event registry: every event has one subject in one stream, round-trips through JSON (NaN
included), and docs/events.md is generated from it."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from ciuic_common.events import (
    EVENTS,
    STREAMS,
    Event,
    JobAssigned,
    JobWork,
    MetricPoint,
    MetricsBatch,
    event_for_subject,
    registry_markdown,
)

ROOT = Path(__file__).resolve().parents[2]

# The contract other services build on; a change here is a change of the bus contract.
EXPECTED = {
    "agent.lost": ("ciuic.agent.lost", "JOBS"),
    "agent.registered": ("ciuic.agent.registered", "JOBS"),
    "alert.changed": ("ciuic.alert.changed", "ALERTS"),
    "data.version.ready": ("ciuic.data.version.ready", "DATA"),
    "deploy.rollout.changed": ("ciuic.deploy.rollout.changed", "DEPLOY"),
    "heartbeat.agent": ("ciuic.heartbeat.agent.{agent_id}", None),
    "job.accepted": ("ciuic.job.accepted", "JOBS"),
    "job.assigned": ("ciuic.job.assigned.{agent_id}", "JOBS"),
    "job.changed": ("ciuic.job.changed", "JOBS"),
    "job.finished": ("ciuic.job.finished", "JOBS"),
    "job.started": ("ciuic.job.started", "JOBS"),
    "job.stop": ("ciuic.job.stop.{job_id}", "JOBS"),
    "logs": ("ciuic.logs.{run_id}", "LOGS"),
    "metrics": ("ciuic.metrics.{run_id}", "METRICS"),
    "model.registered": ("ciuic.model.registered", "MODELS"),
    "pipeline.rejected": ("ciuic.pipeline.rejected", "PIPELINES"),
    "pipeline.requested": ("ciuic.pipeline.requested", "PIPELINES"),
    "run.baseline.resolved": ("ciuic.run.baseline.resolved", "PIPELINES"),
    "run.created": ("ciuic.run.created", "PIPELINES"),
    "run.finished": ("ciuic.run.finished", "PIPELINES"),
    "run.stage.changed": ("ciuic.run.stage.changed", "PIPELINES"),
}


WORK = JobWork(kind="job", name="setup", repository="r", commit="c" * 40)


def test_every_event_type_with_its_subject_and_stream() -> None:
    actual = {
        name: (cls.subject, cls.stream.name if cls.stream else None) for name, cls in EVENTS.items()
    }
    assert actual == EXPECTED


def test_every_stored_subject_belongs_to_exactly_one_stream() -> None:
    for cls in EVENTS.values():
        owners = [s.name for s in STREAMS.values() if s.covers(cls.wildcard_subject())]
        assert owners == ([cls.stream.name] if cls.stream else []), cls.name


def test_domain_streams_keep_events_and_batch_streams_are_bounded() -> None:
    for name in ("PIPELINES", "JOBS", "DATA", "MODELS", "DEPLOY", "ALERTS"):
        assert STREAMS[name].max_bytes == -1
    for name in ("METRICS", "LOGS"):
        assert STREAMS[name].max_bytes > 0
        assert STREAMS[name].max_age > 0


def test_key_segments_are_filled_from_the_event() -> None:
    event = JobAssigned(agent_id="gpu-host-3", run_id="r1", job_id="j1", work=WORK)
    assert event.subject_for() == "ciuic.job.assigned.gpu-host-3"
    assert JobAssigned.wildcard_subject() == "ciuic.job.assigned.*"
    assert JobAssigned.wildcard_subject(agent_id="a1") == "ciuic.job.assigned.a1"
    assert event_for_subject("ciuic.job.assigned.gpu-host-3") is JobAssigned
    assert event_for_subject("ciuic.nothing.here") is None


def test_a_key_that_would_break_the_subject_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot be a subject segment"):
        JobAssigned(agent_id="a.b", run_id="r", job_id="j", work=WORK).subject_for()


def test_a_second_declaration_of_an_event_name_is_an_error() -> None:
    with pytest.raises(TypeError, match="declared twice"):

        class Again(Event):
            subject = "ciuic.run.finished"
            stream = STREAMS["PIPELINES"]


def test_an_event_outside_its_stream_is_an_error() -> None:
    with pytest.raises(TypeError, match="not in stream"):

        class Astray(Event):
            subject = "ciuic.elsewhere.happened"
            stream = STREAMS["PIPELINES"]


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_metric_values_round_trip_including_nan_and_inf(value: float) -> None:
    at = datetime.now(UTC)
    batch = MetricsBatch.of(
        run_id="r",
        job_id="j",
        points=[
            MetricPoint(key="acc", step=0, value=0.5, timestamp=at),
            MetricPoint(key="loss", step=1, value=value, timestamp=at),
        ],
    )
    wire = batch.to_bytes()
    assert b'"values":[0.5,' in wire  # columns on the wire, not an object per point
    back = MetricsBatch.from_bytes(wire)
    assert back.schema_version == 2
    (_, point) = back.points
    assert (point.key, point.step, point.timestamp) == ("loss", 1, at)
    assert (math.isnan(point.value) and math.isnan(value)) or point.value == value


def test_metric_batch_columns_of_different_lengths_are_refused() -> None:
    with pytest.raises(ValidationError, match="keys 2, steps 1, values 2, times 2"):
        MetricsBatch(
            run_id="r", job_id="j", keys=["a", "b"], steps=[1], values=[1.0, 2.0], times=[0, 0]
        )


def test_every_event_carries_id_time_and_schema_version() -> None:
    a, b = (JobAssigned(agent_id="a", run_id="r", job_id="j", work=WORK) for _ in range(2))
    assert a.event_id != b.event_id
    assert a.occurred_at.tzinfo is not None
    assert a.schema_version == 1


def test_docs_events_md_is_generated_from_the_registry() -> None:
    committed = (ROOT / "docs" / "events.md").read_text()
    assert committed == registry_markdown(), "run `make docs` to regenerate docs/events.md"
