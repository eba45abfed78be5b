"""`ciuic validate`, run as a person runs it: the real console script in a subprocess."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_pipeline_spec import SEED, THREE_MISTAKES

CIUIC = Path(sys.executable).parent / "ciuic"


def ciuic(*args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CIUIC), *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_seed_is_valid_and_summarised(tmp_path: Path) -> None:
    (tmp_path / ".ciuicci.yaml").write_text(SEED)

    done = ciuic("validate", cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    assert "valid: .ciuicci.yaml" in done.stdout
    assert "32 GPUs per trial" in done.stdout
    assert "9 trials (grid)" in done.stdout
    assert "horovod" in done.stdout
    assert "setup -> training -> validation:quick-check -> validation:thorough-eval" in done.stdout
    assert "value > threshold or is_nan() -> email, stop_training" in done.stdout
    assert "quick-check on small-test-set, timeout 30m" in done.stdout
    assert "onnx, tensorrt, torchscript -> s3://model-registry/deepseek/" in done.stdout
    assert "v1.2.0 80%, v1.3.0 20%" in done.stdout


def test_a_bad_file_prints_every_problem_as_file_line_column_and_exits_1(tmp_path: Path) -> None:
    (tmp_path / "pipeline.yaml").write_text(THREE_MISTAKES)

    done = ciuic("validate", "pipeline.yaml", cwd=tmp_path)

    assert done.returncode == 1
    lines = done.stdout.splitlines()
    located = [re.match(r"pipeline\.yaml:(\d+):(\d+): ([^:]+): .", line) for line in lines]
    assert [
        match.groups() if match else line for match, line in zip(located, lines, strict=True)
    ] == [
        ("1", "1", "trigers"),
        ("13", "15", "training.hyperparameters[1].values"),
        ("17", "5", "experiment.variants"),
    ]
    assert lines[1].endswith("a sweep needs at least one value")
    assert "3 problems in pipeline.yaml" in done.stderr


def test_json_reports_validity_errors_and_summary(tmp_path: Path) -> None:
    (tmp_path / "good.yaml").write_text(SEED)
    (tmp_path / "bad.yaml").write_text(THREE_MISTAKES)

    good = ciuic("validate", "--json", "good.yaml", cwd=tmp_path)
    bad = ciuic("validate", "bad.yaml", "--json", cwd=tmp_path)

    assert good.returncode == 0
    report = json.loads(good.stdout)
    assert (report["valid"], report["errors"]) == (True, [])
    assert report["summary"]["trials"] == 9
    assert report["summary"]["gpus_per_trial"] == 32
    assert bad.returncode == 1
    report = json.loads(bad.stdout)
    assert report["valid"] is False
    assert report["summary"] is None
    assert report["errors"][1] == {
        "path": "training.hyperparameters[1].values",
        "line": 13,
        "column": 15,
        "message": "a sweep needs at least one value",
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "error: .ciuicci.yaml: no such file"),
        (("nowhere.yaml",), "error: nowhere.yaml: no such file"),
        ((".",), "error: . is a directory, not a pipeline file"),
    ],
)
def test_a_missing_file_is_a_clear_failure(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    done = ciuic("validate", *args, cwd=tmp_path)

    assert done.returncode == 1
    assert message in done.stderr
    assert done.stdout == ""


def test_a_file_on_stdin_is_validated(tmp_path: Path) -> None:
    done = ciuic("validate", "-", cwd=tmp_path, stdin="jobs:\n  a:\n    steps: []\n")

    assert done.returncode == 1
    assert done.stdout == "<stdin>:3:12: jobs.a.steps: needs at least 1 item(s)\n"
