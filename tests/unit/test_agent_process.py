"""A job step as a process group: output, outcome, timeout, stop, no orphans (real processes)."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import psutil
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ciuic_common.events import LogLine
from ciuic_gpu_agent.process import StepProcess, StepStartError, _LineSplitter, run_step

# A parent that ignores SIGTERM with a child that ignores it too, both printing their pids.
STUBBORN = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('child up', flush=True); time.sleep(60)")])
print("pids", os.getpid(), child.pid, flush=True)
time.sleep(60)
"""


class Output:
    """Lines a step printed, in order."""

    def __init__(self) -> None:
        self.lines: list[LogLine] = []

    async def __call__(self, line: LogLine) -> None:
        self.lines.append(line)

    def texts(self, stream: str | None = None) -> list[str]:
        return [line.text for line in self.lines if stream in (None, line.stream)]

    async def wait_for(self, text: str) -> LogLine:
        async with asyncio.timeout(10):
            while True:
                for line in self.lines:
                    if text in line.text:
                        return line
                await asyncio.sleep(0.01)


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def gone(pids: list[int]) -> bool:
    """Every pid exited (a zombie waiting for its reaper counts as exited)."""
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            pass
    return True


async def test_a_run_string_succeeds_and_its_lines_arrive_in_order_by_stream() -> None:
    out = Output()
    result = await run_step("echo one; echo two >&2; echo three", on_output=out)
    assert (result.outcome, result.exit_code) == ("succeeded", 0)
    assert out.texts("stdout") == ["one", "three"]
    assert out.texts("stderr") == ["two"]
    assert result.started_at <= out.lines[0].timestamp <= result.finished_at


async def test_a_failing_line_fails_the_run_string_with_its_exit_code() -> None:
    out = Output()
    result = await run_step("echo before; exit 3; echo never", on_output=out)
    assert (result.outcome, result.exit_code) == ("failed", 3)
    assert result.reason == "exited with code 3"
    assert out.texts() == ["before"]
    # -e and pipefail: `false | true` already fails a bash step, as in CI runners.
    failed_early = await run_step("false | true; echo never", on_output=(out2 := Output()))
    assert (failed_early.outcome, out2.texts()) == ("failed", [])


async def test_env_and_cwd_are_the_steps(tmp_path: Path) -> None:
    out = Output()
    env = {"PATH": os.environ["PATH"], "CIUIC_JOB_ID": "job-7"}
    result = await run_step('echo "$CIUIC_JOB_ID $(pwd)"', env=env, cwd=tmp_path, on_output=out)
    assert result.outcome == "succeeded"
    assert out.texts() == [f"job-7 {tmp_path}"]


async def test_invalid_utf8_and_long_lines_become_readable_pieces() -> None:
    out = Output()
    code = (
        "import sys; sys.stdout.buffer.write(b'bad \\xff byte\\n' + 'é'.encode() * 3000 + b'\\n')"
    )
    step = StepProcess(python(code), on_output=out, max_line_bytes=1001)
    await step.start()
    assert (await step.wait()).outcome == "succeeded"
    texts = out.texts()
    assert texts[0] == "bad \ufffd byte"
    assert "".join(texts[1:]) == "é" * 3000  # cut at character boundaries: nothing replaced
    assert all(len(t.encode()) <= 1001 for t in texts[1:])


async def test_progress_bars_written_with_carriage_returns_show_each_update() -> None:
    out = Output()
    code = "import sys; sys.stdout.write('10%\\r50%\\r100%\\r\\ndone\\r\\n')"
    await run_step(python(code), on_output=out)
    assert out.texts() == ["10%", "50%", "100%", "done"]


async def test_a_last_line_without_newline_is_kept() -> None:
    out = Output()
    await run_step("printf 'no newline'", on_output=out)
    assert out.texts() == ["no newline"]


async def test_a_program_that_does_not_exist_cannot_start() -> None:
    with pytest.raises(StepStartError, match="cannot start"):
        await run_step(["/nonexistent/train"])


async def test_stop_terminates_the_group_and_records_who_and_why() -> None:
    out = Output()
    code = (
        "import signal, sys, time\n"
        "def bye(*_):\n"
        "    print('checkpoint saved', flush=True); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, bye)\n"
        "print('training', flush=True); time.sleep(60)\n"
    )
    step = StepProcess(python(code), on_output=out)
    await step.start()
    await out.wait_for("training")
    result = await step.stop("loss is NaN", requested_by="alerter", grace=10)
    assert (result.outcome, result.exit_code) == ("stopped", 0)
    assert (result.stopped_by, result.reason) == ("alerter", "loss is NaN")
    assert out.texts()[-1] == "checkpoint saved"  # the grace period was used, not cut short
    assert result.duration_s < 5


async def test_stop_kills_a_group_that_ignores_sigterm_after_the_grace_leaving_no_orphans() -> None:
    out = Output()
    step = StepProcess(python(STUBBORN), on_output=out)
    await step.start()
    await out.wait_for("child up")
    pids = [int(p) for p in (await out.wait_for("pids")).text.split()[1:]]
    assert set(pids) <= step.live_pids()
    result = await step.stop("user asked", requested_by="cli", grace=0.3)
    assert (result.outcome, result.exit_code) == ("stopped", -9)
    assert gone(pids)
    assert step.live_pids() == set()


async def test_a_timeout_stops_the_step_and_says_it_timed_out() -> None:
    out = Output()
    step = StepProcess(python(STUBBORN), on_output=out, timeout_s=0.5, timeout_grace=0.2)
    await step.start()
    pids = [int(p) for p in (await out.wait_for("pids")).text.split()[1:]]
    result = await step.wait()
    assert result.outcome == "timed_out"
    assert (result.reason, result.stopped_by) == ("timed out after 0.5 s", None)
    assert gone(pids)


async def test_processes_left_behind_by_a_finished_step_are_ended() -> None:
    out = Output()
    step = StepProcess("sleep 60 & echo $!", on_output=out, leftover_grace=0.5)
    await step.start()
    result = await step.wait()
    assert result.outcome == "succeeded"
    assert gone([int(out.texts()[0])])


async def test_a_child_that_leaves_the_group_is_still_stopped() -> None:
    out = Output()
    code = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],"
        " start_new_session=True)\n"
        "print('escaped', child.pid, flush=True); time.sleep(60)\n"
    )
    step = StepProcess(python(code), on_output=out)
    await step.start()
    escaped = int((await out.wait_for("escaped")).text.split()[1])
    assert escaped in step.live_pids()  # seen as a descendant while its parent lives
    await step.stop("done", requested_by="scheduler", grace=1)
    assert gone([escaped])


async def test_stopping_a_finished_step_keeps_its_own_outcome() -> None:
    step = StepProcess("exit 0")
    await step.start()
    first = await step.wait()
    assert await step.stop("too late", requested_by="cli") == first


async def test_a_failing_output_callback_does_not_fail_the_step() -> None:
    async def broken(line: LogLine) -> None:
        raise RuntimeError("log sink down")

    step = StepProcess("echo a; echo b", on_output=broken)
    await step.start()
    assert (await step.wait()).outcome == "succeeded"
    assert step.dropped_lines == 2


async def test_a_signal_that_ends_the_step_is_named() -> None:
    result = await run_step("kill -SEGV $$")
    assert (result.outcome, result.exit_code, result.reason) == ("failed", -11, "killed by SIGSEGV")


@given(
    st.lists(st.sampled_from([b"a", b"\xc3\xa9", b"\n", b"\r", b"\r\n", b"xyz"]), max_size=30),
    st.integers(1, 7),
    st.integers(4, 9),
)
def test_output_splits_the_same_way_however_it_is_chunked(
    parts: list[bytes], chunk: int, max_bytes: int
) -> None:
    stream = b"".join(parts)

    def split(chunks: list[bytes]) -> list[bytes]:
        splitter = _LineSplitter(max_bytes)
        return [line for c in chunks for line in splitter.feed(c)] + splitter.finish()

    whole = split([stream])
    pieces = split([stream[i : i + chunk] for i in range(0, len(stream), chunk)])
    assert whole == pieces
    assert all(len(line) <= max_bytes for line in whole)
    expected = stream.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    assert b"".join(whole) == expected.replace(b"\n", b"")


async def test_a_step_whose_supervision_is_cancelled_leaves_no_process() -> None:
    out = Output()
    step = StepProcess(python(STUBBORN), on_output=out)
    await step.start()
    pids = [int(p) for p in (await out.wait_for("pids")).text.split()[1:]]
    for task in step._tasks:
        task.cancel()
    await asyncio.gather(*step._tasks, return_exceptions=True)
    for _ in range(250):  # SIGKILL takes effect within moments; poll up to 5 s
        if gone(pids):
            break
        await asyncio.sleep(0.02)
    assert gone(pids)
