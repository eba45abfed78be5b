"""`ciuic metrics` and `ciuic compare` against an in-process MetricsService with canned data."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from typer.testing import CliRunner, Result

from ciuic_cli import metrics_cmds
from ciuic_cli.console import app
from ciuic_common.proto import metrics_collector_pb2 as pb
from ciuic_common.proto import metrics_collector_pb2_grpc

RUN = "9b2e4f10c3a7"
TRIAL0, TRIAL1 = f"{RUN}-trial-0", f"{RUN}-trial-1"
NAN, INF = math.nan, math.inf
LOSS = [2.3, 1.9, 1.6, 1.4, NAN, 1.2, 1.1, INF, 1.0, 0.9]
ACCURACY = [0.1 * s for s in range(10)]


def series(job_id: str, key: str, values: list[float], first: int = 0) -> pb.Series:
    points = [pb.Point(step=first + i, value=v) for i, v in enumerate(values)]
    return pb.Series(
        run_id=RUN, job_id=job_id, key=key, source="training", points=points,
        total_points=len(points),
    )  # fmt: skip


def summary(s: pb.Series) -> pb.Summary:
    values = [p.value for p in s.points]
    finite = [v for v in values if not math.isnan(v)]
    return pb.Summary(
        run_id=RUN, job_id=s.job_id, key=s.key, source=s.source, last=values[-1],
        min=min(finite), max=max(finite), count=len(values),
        nan_count=sum(math.isnan(v) for v in values),
        first_step=s.points[0].step, last_step=s.points[-1].step,
    )  # fmt: skip


CURVES = [series(TRIAL0, "training_loss", LOSS), series(TRIAL0, "accuracy", ACCURACY)]

COMPARISON = pb.Comparison(
    run_id=RUN,
    baseline_run_id="5d1c0a9e7f2b",
    reason="baseline: the best earlier run of pipeline train on refs/heads/main by val_loss",
    metrics=[
        pb.MetricComparison(key="val_loss", value=0.25, baseline=0.2, delta=0.05,
                            delta_pct=25.0, better="min", verdict="regressed"),
        pb.MetricComparison(key="accuracy", value=0.9, baseline=0.85, delta=0.05,
                            delta_pct=5.882, better="max", verdict="improved"),
        pb.MetricComparison(key="f1", value=NAN, baseline=NAN, delta=NAN, delta_pct=NAN,
                            better="max", verdict="missing"),
    ],
)  # fmt: skip


class FakeMetrics(metrics_collector_pb2_grpc.MetricsServiceServicer):
    """Canned answers; every request is recorded, in order, for the tests to look at."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, Any]] = []
        #: What StreamMetrics sends once its starting points are fixed; then it ends.
        self.stream: list[pb.MetricsUpdate] = []
        self._lock = threading.Lock()

    def _record(self, method: str, request: Any) -> None:
        with self._lock:
            self.requests.append((method, request))

    def received(self, method: str) -> list[Any]:
        return [request for name, request in self.requests if name == method]

    def _known(self, run_id: str, context: grpc.ServicerContext) -> None:
        if not RUN.startswith(run_id):
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"the metrics collector knows no run with an id starting {run_id!r}",
            )

    def GetCurves(self, request: pb.GetCurvesRequest, context: grpc.ServicerContext) -> Any:
        self._record("GetCurves", request)
        self._known(request.run_id, context)
        return pb.GetCurvesResponse(
            series=[s for s in CURVES if not request.keys or s.key in request.keys]
        )

    def GetSummaries(self, request: pb.GetSummariesRequest, context: grpc.ServicerContext) -> Any:
        self._record("GetSummaries", request)
        return pb.GetSummariesResponse(
            summaries=[summary(s) for s in CURVES if not request.keys or s.key in request.keys]
        )

    def StreamMetrics(
        self, request: pb.StreamMetricsRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.MetricsUpdate]:
        self._record("StreamMetrics", request)
        self._known(request.run_id, context)
        context.send_initial_metadata(())
        yield from self.stream

    def CompareRun(self, request: pb.CompareRunRequest, context: grpc.ServicerContext) -> Any:
        self._record("CompareRun", request)
        self._known(request.run_id, context)
        return COMPARISON


@pytest.fixture
def metrics(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeMetrics]:
    fake = FakeMetrics()  # type: ignore[abstract]  # only the methods the CLI calls
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    metrics_collector_pb2_grpc.add_MetricsServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    monkeypatch.setenv("CIUIC_METRICS_COLLECTOR_ADDR", f"127.0.0.1:{port}")
    yield fake
    server.stop(grace=None)


Ciuic = Callable[..., Result]


@pytest.fixture
def ciuic(metrics: FakeMetrics) -> Ciuic:
    runner = CliRunner()

    def invoke(*args: str) -> Result:
        return runner.invoke(app, list(args))

    return invoke


def _row(output: str, first_cell: str) -> str:
    """The table line whose first cell is `first_cell`."""
    for line in output.splitlines():
        cells = [c.strip() for c in line.replace("┃", "│").split("│")]
        if len(cells) > 2 and cells[1] == first_cell:
            return line
    raise AssertionError(f"no row starts with {first_cell!r} in:\n{output}")


def _chart_of(output: str, key: str) -> list[str]:
    """The lines drawn for `key`: from its heading to its summary line."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{key}  "))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("last "))
    return lines[start : end + 1]


# --- ciuic metrics ---------------------------------------------------------------------------


def test_metrics_draws_each_curve_with_its_summary(ciuic: Ciuic) -> None:
    done = ciuic("metrics", "9b2e")

    assert done.exit_code == 0, done.output
    assert f"run {RUN}" in done.stdout
    loss = _chart_of(done.stdout, "training_loss")
    assert "trial-0" in loss[0]  # the job by its name within the run
    assert any(set(line.strip()) & set(metrics_cmds.BLOCKS.strip()) for line in loss)
    assert "inf … 0.9" not in "\n".join(loss)  # the scale is the finite values'
    assert "2.3 … 0.9  steps 0..9" in loss[-2]
    assert loss[-1].split() == [
        "last",
        "0.9",
        "min",
        "0.9",
        "max",
        "inf",
        "points",
        "10",
        "NaN",
        "1",
    ]
    accuracy = _chart_of(done.stdout, "accuracy")
    assert "NaN" not in accuracy[-1]  # said only where there is one


def test_metrics_marks_nan_and_infinity_above_their_columns(ciuic: Ciuic) -> None:
    done = ciuic("metrics", "9b2e", "--key", "training_loss")

    assert done.exit_code == 0, done.output
    marks = _chart_of(done.stdout, "training_loss")[1]
    assert marks.count("×") >= 1  # noqa: RUF001  (the NaN mark)
    assert marks.count("▲") >= 1
    assert marks.index("×") < marks.index("▲"), "step 4 is left of step 7"  # noqa: RUF001
    assert "accuracy" not in done.stdout


def test_metrics_asks_for_the_keys_and_prefix_it_was_given(
    ciuic: Ciuic, metrics: FakeMetrics
) -> None:
    ciuic("metrics", "9b2e", "-k", "accuracy", "-k", "training_loss")

    (curves,) = metrics.received("GetCurves")
    assert (curves.run_id, list(curves.keys)) == ("9b2e", ["accuracy", "training_loss"])
    (summaries,) = metrics.received("GetSummaries")
    assert list(summaries.run_ids) == [RUN]  # the full id, from the curves


def test_metrics_json_keeps_every_point_nan_included(ciuic: Ciuic) -> None:
    done = ciuic("metrics", "9b2e", "--json")

    assert done.exit_code == 0, done.output
    body = json.loads(done.stdout)
    assert body["run_id"] == RUN
    loss = next(s for s in body["series"] if s["key"] == "training_loss")
    assert [step for step, _ in loss["points"]] == list(range(10))
    assert math.isnan(loss["points"][4][1])
    assert loss["points"][7][1] == math.inf
    assert (loss["summary"]["count"], loss["summary"]["nan_count"]) == (10, 1)
    assert loss["summary"]["max"] == "Infinity"  # as protobuf's JSON writes it


def test_follow_with_json_is_a_usage_error_on_one_line(ciuic: Ciuic) -> None:
    done = ciuic("metrics", "9b2e", "--follow", "--json")

    assert done.exit_code == 1
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        "error: --follow draws for people; scripts read StreamMetrics over gRPC"
    ]


def test_follow_subscribes_from_now_before_reading_the_curves(
    ciuic: Ciuic, metrics: FakeMetrics
) -> None:
    metrics.stream = [
        pb.MetricsUpdate(
            series=[
                # A repeat of a drawn step (dropped), a new one, and a trial that starts later.
                series(TRIAL0, "training_loss", [0.9, 0.5], first=9),
                series(TRIAL1, "training_loss", [3.0, NAN]),
            ]
        )
    ]

    done = ciuic("metrics", "9b2e", "--follow")

    assert done.exit_code == 0, done.output
    # The stream's starting points are fixed before the curves are read: no point between.
    order = [name for name, _ in metrics.requests]
    assert order == ["StreamMetrics", "GetCurves", "GetSummaries"]
    assert metrics.received("StreamMetrics")[0].after_step < -1  # from now
    loss = _chart_of(done.stdout, "training_loss")
    assert "steps 0..10" in loss[-2]
    summary = ["last", "0.5", "min", "0.5", "max", "inf", "points", "11", "NaN", "1"]
    assert loss[-1].split() == summary  # step 9 once, step 10 added
    new_trial = done.stdout.split("training_loss  trial-1", 1)[1].splitlines()
    assert "×" in new_trial[1]  # noqa: RUF001  (its NaN at step 1)
    assert "3 … 3  steps 0..1" in new_trial[-2]
    assert new_trial[-1].split()[-4:] == ["points", "2", "NaN", "1"]


def test_metrics_of_an_unknown_run_exits_1_with_one_error_line(ciuic: Ciuic) -> None:
    done = ciuic("metrics", "nope")

    assert done.exit_code == 1
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        "error: metrics_collector: the metrics collector knows no run with an id starting 'nope'"
    ]


# --- ciuic compare ---------------------------------------------------------------------------


def test_compare_prints_each_metric_beside_its_baseline_with_a_verdict(ciuic: Ciuic) -> None:
    done = ciuic("compare", "9b2e")

    assert done.exit_code == 0, done.output
    assert f"run {RUN}  vs baseline 5d1c0a9e7f2b" in done.stdout
    assert "by val_loss" in done.stdout
    val_loss = _row(done.stdout, "val_loss").split("│")
    assert [c.strip() for c in val_loss[2:-1]] == [
        "0.25", "0.2", "+0.05", "+25.00%", "lower", "regressed",
    ]  # fmt: skip
    assert "higher" in _row(done.stdout, "accuracy")
    assert "improved" in _row(done.stdout, "accuracy")
    f1 = [c.strip() for c in _row(done.stdout, "f1").split("│")[2:-1]]
    assert f1 == ["—", "—", "—", "—", "higher", "missing"]
    assert "some metrics regressed against their baseline" in done.stderr


def test_compare_passes_the_baseline_and_keys_for_each_run(
    ciuic: Ciuic, metrics: FakeMetrics
) -> None:
    done = ciuic("compare", "9b2e", RUN, "--baseline", "5d1c", "-k", "accuracy")

    assert done.exit_code == 0, done.output
    asked = [(r.run_id, r.baseline_run_id, list(r.keys)) for r in metrics.received("CompareRun")]
    assert asked == [("9b2e", "5d1c", ["accuracy"]), (RUN, "5d1c", ["accuracy"])]
    assert done.stdout.count(f"run {RUN}") == 2


def test_compare_json_is_one_object_per_run(ciuic: Ciuic) -> None:
    done = ciuic("compare", "9b2e", "--json")

    assert done.exit_code == 0, done.output
    (comparison,) = json.loads(done.stdout)
    assert comparison["baseline_run_id"] == "5d1c0a9e7f2b"
    by_key = {m["key"]: m for m in comparison["metrics"]}
    assert (by_key["val_loss"]["verdict"], by_key["val_loss"]["delta_pct"]) == ("regressed", 25.0)
    assert by_key["f1"]["value"] == "NaN"  # as protobuf's JSON writes it


def test_compare_of_an_unknown_run_exits_1_with_one_error_line(ciuic: Ciuic) -> None:
    done = ciuic("compare", "nope")

    assert done.exit_code == 1
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        "error: metrics_collector: the metrics collector knows no run with an id starting 'nope'"
    ]
