"""Run one step of a job as its own process group, stream its output, stop it without orphans.

A step is an argv list or a `run:` string (run by bash with `-eo pipefail`, as CI runners do, so
a failing line fails the step). It starts in a new session (`start_new_session=True`), so its
process group holds everything it starts unless a process leaves on purpose (`setsid`); those are
followed through `psutil` as descendants while their parent lives.

Output: stdout and stderr lines, split at `\\n`, `\\r\\n` and a lone `\\r` (progress bars), decoded
as UTF-8 with replacement characters, cut into pieces of at most `max_line_bytes` (at a character
boundary), stamped with their arrival time and handed, in order, to an async callback.

Stop: SIGTERM to the group, up to `grace` seconds for every process of it to exit (a last
checkpoint), then SIGKILL to what is left. The same happens on timeout, and to processes left
behind when the step's main process exits by itself (after `leftover_grace`): a step never
leaves a process running.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import psutil

from ciuic_common.events import LogLine
from ciuic_common.logging import get_logger

__all__ = [
    "DEFAULT_GRACE",
    "SHELL",
    "StepProcess",
    "StepResult",
    "StepStartError",
    "run_step",
    "split_long_line",
]

log = get_logger(__name__)

#: Seconds between SIGTERM and SIGKILL unless the caller says otherwise (time for a checkpoint).
DEFAULT_GRACE = 30.0
#: Seconds processes left behind by a main process that exited by itself get before SIGKILL.
DEFAULT_LEFTOVER_GRACE = 5.0
DEFAULT_MAX_LINE_BYTES = 16 * 1024
#: How `run:` strings are run (what GitHub Actions does for `shell: bash`).
SHELL = ("bash", "--noprofile", "--norc", "-eo", "pipefail", "-c")
#: Lines waiting for the output callback before the step's pipes stop being read.
_MAX_QUEUED_LINES = 10_000
_POLL = 0.05
#: How long processes get to disappear after SIGKILL before we say they would not.
_KILL_WAIT = 10.0

StepOutcome = Literal["succeeded", "failed", "stopped", "timed_out"]
OnOutput = Callable[[LogLine], Awaitable[None]]


class StepStartError(RuntimeError):
    """The step's process could not be started (no such program or directory, ...)."""


@dataclass(frozen=True)
class StepResult:
    """How a step ended. `exit_code` is negative when a signal ended the main process."""

    outcome: StepOutcome
    exit_code: int | None
    started_at: datetime
    finished_at: datetime
    stopped_by: str | None = None
    reason: str | None = None

    @property
    def duration_s(self) -> float:
        return (self.finished_at - self.started_at).total_seconds()


@dataclass(frozen=True)
class _StopRequest:
    outcome: Literal["stopped", "timed_out"]
    reason: str
    requested_by: str | None


def split_long_line(line: bytes, max_bytes: int) -> list[bytes]:
    """`line` in pieces of at most `max_bytes`, never cutting a UTF-8 character in two."""
    pieces = []
    while len(line) > max_bytes:
        cut = max_bytes
        # Back off over continuation bytes (0b10xxxxxx) to the start of the character.
        while cut > max_bytes - 4 and cut > 0 and line[cut] & 0xC0 == 0x80:
            cut -= 1
        if cut <= 0 or line[cut] & 0xC0 == 0x80:
            cut = max_bytes  # not UTF-8 anyway: cut where the limit says
        pieces.append(line[:cut])
        line = line[cut:]
    pieces.append(line)
    return pieces


_LINE_END = re.compile(rb"\r\n|\r|\n")


class _LineSplitter:
    """Bytes of one stream in, complete lines out (see the module docstring)."""

    def __init__(self, max_bytes: int) -> None:
        self._max = max_bytes
        self._partial = b""
        self._after_cr = False  # the last byte was \r: a \n right after it ends nothing new

    def feed(self, data: bytes) -> list[bytes]:
        if self._after_cr and data.startswith(b"\n"):
            data = data[1:]
        self._after_cr = False
        if not data:
            return []
        self._after_cr = data.endswith(b"\r")
        parts = _LINE_END.split(self._partial + data)
        tail = parts.pop()
        lines: list[bytes] = []
        for part in parts:
            lines.extend(split_long_line(part, self._max) if len(part) > self._max else (part,))
        if len(tail) > self._max:
            *full, tail = split_long_line(tail, self._max)
            lines.extend(full)
        self._partial = tail
        return lines

    def finish(self) -> list[bytes]:
        rest, self._partial = self._partial, b""
        return [rest] if rest else []


class _Protocol(asyncio.SubprocessProtocol):
    def __init__(self, step: StepProcess) -> None:
        self._step = step

    def pipe_data_received(self, fd: int, data: bytes | str) -> None:
        assert isinstance(data, bytes)
        self._step._output(fd, data)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        self._step._output_closed(fd)

    def process_exited(self) -> None:
        self._step._process_exited()


class StepProcess:
    """One step's process group: start it, stream its output, stop it, wait for its result.

    Its supervision runs in tasks of the loop that started it; cancelling them (loop shutdown)
    SIGKILLs the whole group. Use `stop()` for a graceful end.
    """

    def __init__(
        self,
        command: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        on_output: OnOutput | None = None,
        timeout_s: float | None = None,
        timeout_grace: float = DEFAULT_GRACE,
        leftover_grace: float = DEFAULT_LEFTOVER_GRACE,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    ) -> None:
        self.argv = [*SHELL, command] if isinstance(command, str) else list(command)
        if not self.argv:
            raise ValueError("a step needs a command")
        self.env = dict(env) if env is not None else None
        self.cwd = Path(cwd) if cwd is not None else None
        self.timeout_s = timeout_s
        self.timeout_grace = timeout_grace
        self.leftover_grace = leftover_grace
        self._on_output = on_output
        self._splitters = {1: _LineSplitter(max_line_bytes), 2: _LineSplitter(max_line_bytes)}
        self._transport: asyncio.SubprocessTransport | None = None
        self._pid: int | None = None
        self._started_at: datetime | None = None
        self._exited: asyncio.Future[None] | None = None
        self._pipes_open = {1, 2}
        self._pipes_closed: asyncio.Future[None] | None = None
        self._lines: asyncio.Queue[LogLine | None] = asyncio.Queue()
        self._reading_paused = False
        self._stop: _StopRequest | None = None
        self._stop_event = asyncio.Event()
        self._result: asyncio.Future[StepResult] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._terminating: asyncio.Task[None] | None = None
        #: Processes seen in the step's tree, so one that left the group is still stopped.
        self._tracked: dict[int, psutil.Process] = {}
        self._tracked_lock = threading.Lock()
        #: Output lines the callback raised on.
        self.dropped_lines = 0

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the process in a new session; raises StepStartError if it cannot start."""
        if self._transport is not None:
            raise RuntimeError("a step starts once")
        loop = asyncio.get_running_loop()
        self._exited = loop.create_future()
        self._pipes_closed = loop.create_future()
        self._result = loop.create_future()
        # Before the call: output may arrive while it is still returning.
        self._started_at = datetime.now(UTC)
        try:
            transport, _ = await loop.subprocess_exec(
                lambda: _Protocol(self),
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        except OSError as error:
            raise StepStartError(f"cannot start {self.argv[0]!r}: {error}") from error
        self._transport = transport
        self._pid = transport.get_pid()
        self._tasks = [
            loop.create_task(self._supervise(), name=f"step-{self._pid}"),
            loop.create_task(self._pump(), name=f"step-output-{self._pid}"),
        ]

    @property
    def pid(self) -> int | None:
        """The main process's pid (also the process group's id)."""
        return self._pid

    @property
    def done(self) -> bool:
        return self._result is not None and self._result.done()

    async def wait(self) -> StepResult:
        """Wait until the step ended and everything it printed was handed over."""
        if self._result is None:
            raise RuntimeError("the step was not started")
        return await asyncio.shield(self._result)

    async def stop(
        self, reason: str, requested_by: str, grace: float = DEFAULT_GRACE
    ) -> StepResult:
        """SIGTERM the group, wait up to `grace` s for it to exit, SIGKILL what is left.

        The first stop (or the timeout) is the one recorded; a step that already ended keeps
        its own outcome.
        """
        if self._result is None:
            raise RuntimeError("the step was not started")
        if not self.done and self._stop is None and not self._exited_now():
            self._stop = _StopRequest("stopped", reason, requested_by)
            self._stop_event.set()
            self._start_terminating(grace)
        return await self.wait()

    def live_pids(self) -> set[int]:
        """Every live process of the step: the group and descendants that left it.

        Blocking (reads /proc): call it from a thread when the loop must not wait.
        """
        pids: set[int] = set()
        if self._pid is None:
            return pids
        for proc in self._tree():
            pids.add(proc.pid)
        return pids

    # -- supervision -------------------------------------------------------------------------
    async def _supervise(self) -> None:
        assert self._exited is not None
        assert self._result is not None
        loop = asyncio.get_running_loop()
        try:
            if self.timeout_s is not None:
                stop_wait = loop.create_task(self._stop_requested())
                try:
                    await asyncio.wait(
                        [self._exited, stop_wait],
                        timeout=self.timeout_s,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    stop_wait.cancel()
                if not self._exited.done() and self._stop is None:
                    self._stop = _StopRequest(
                        "timed_out", f"timed out after {self.timeout_s:g} s", None
                    )
                    self._stop_event.set()
                    self._start_terminating(self.timeout_grace)
            await self._exited
            if self._terminating is None and await asyncio.to_thread(self._leftovers):
                # The main process ended by itself; what it left behind in the group goes too.
                log.warning("step_left_processes", pid=self._pid, grace=self.leftover_grace)
                self._start_terminating(self.leftover_grace)
            if self._terminating is not None:
                await self._terminating
            await self._close_pipes()
            finished_at = datetime.now(UTC)
            await self._lines.put(None)
            await asyncio.gather(*self._tasks[1:])
            self._result.set_result(self._outcome(finished_at))
        except asyncio.CancelledError:
            # The agent is shutting down without stop(): leave no process behind either way
            # (closing the transport alone would kill only the main process).
            if not self._exited.done():
                self._signal_all(signal.SIGKILL)
            self._result.cancel()
            raise
        except BaseException as error:
            if not self._result.done():
                self._result.set_exception(error)
            raise
        finally:
            if self._transport is not None:
                self._transport.close()

    async def _stop_requested(self) -> None:
        await self._stop_event.wait()

    def _start_terminating(self, grace: float) -> None:
        if self._terminating is None:
            self._terminating = asyncio.get_running_loop().create_task(
                self._terminate(grace), name=f"step-stop-{self._pid}"
            )

    async def _terminate(self, grace: float) -> None:
        """SIGTERM everything of the step, wait up to `grace` s, SIGKILL what is left."""
        await asyncio.to_thread(self._signal_all, signal.SIGTERM)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while loop.time() < deadline:
            if not await asyncio.to_thread(self._leftovers):
                return
            await asyncio.sleep(min(_POLL, max(0.0, deadline - loop.time())))
        remaining = await asyncio.to_thread(self._signal_all, signal.SIGKILL)
        if remaining:
            log.info("step_killed", pid=self._pid, processes=remaining, grace=grace)
        # SIGKILL is not instant (a process may be finishing a system call): return when
        # every process is gone, so that callers never see one of ours still alive.
        deadline = loop.time() + _KILL_WAIT
        while await asyncio.to_thread(self._leftovers):
            if loop.time() >= deadline:
                log.error("step_processes_survive_sigkill", pid=self._pid, waited_s=_KILL_WAIT)
                return
            await asyncio.sleep(_POLL / 5)

    def _leftovers(self) -> bool:
        return bool(self._tree())

    def _signal_all(self, sig: signal.Signals) -> int:
        """Send `sig` to the group and to descendants that left it; how many processes got it."""
        procs = self._tree()
        if self._pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._pid, sig)
        for proc in procs:
            with contextlib.suppress(psutil.Error, OSError):
                if proc.is_running() and os.getpgid(proc.pid) != self._pid:
                    proc.send_signal(sig)
        return len(procs)

    def _tree(self) -> list[psutil.Process]:
        """Live (not zombie) processes of the step: its group plus every descendant we saw."""
        pgid = self._pid
        if pgid is None:
            return []
        found: dict[int, psutil.Process] = {}
        with contextlib.suppress(psutil.Error):
            main = psutil.Process(pgid)
            found[main.pid] = main
            for child in main.children(recursive=True):
                found[child.pid] = child
        for pid in psutil.pids():
            if pid not in found:
                with contextlib.suppress(OSError):
                    if os.getpgid(pid) == pgid:
                        with contextlib.suppress(psutil.Error):
                            found[pid] = psutil.Process(pid)
        with self._tracked_lock:
            for pid, proc in found.items():
                self._tracked.setdefault(pid, proc)
            candidates = list(self._tracked.values())
        alive: list[psutil.Process] = []
        gone: list[int] = []
        for proc in candidates:
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
                    continue
            except psutil.Error:
                pass
            gone.append(proc.pid)
        with self._tracked_lock:
            for pid in gone:
                self._tracked.pop(pid, None)
        return alive

    async def _close_pipes(self) -> None:
        assert self._pipes_closed is not None
        # Every process of the step is gone, so its pipes reach EOF; a process that escaped
        # our view and still holds them must not keep the step open forever.
        try:
            await asyncio.wait_for(asyncio.shield(self._pipes_closed), 2.0)
        except TimeoutError:
            log.warning("step_pipes_held_open", pid=self._pid)
            assert self._transport is not None
            for fd in (1, 2):
                pipe = self._transport.get_pipe_transport(fd)
                if pipe is not None:
                    pipe.close()
            for fd in list(self._pipes_open):
                self._output_closed(fd)

    def _outcome(self, finished_at: datetime) -> StepResult:
        assert self._transport is not None
        assert self._started_at is not None
        code = self._transport.get_returncode()
        started = self._started_at
        if self._stop is not None:
            return StepResult(
                self._stop.outcome,
                code,
                started,
                finished_at,
                stopped_by=self._stop.requested_by,
                reason=self._stop.reason,
            )
        if code == 0:
            return StepResult("succeeded", code, started, finished_at)
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = str(-code)
            reason = f"killed by {name}"
        else:
            reason = f"exited with code {code}"
        return StepResult("failed", code, started, finished_at, reason=reason)

    def _exited_now(self) -> bool:
        return self._exited is not None and self._exited.done()

    # -- protocol callbacks ------------------------------------------------------------------
    def _process_exited(self) -> None:
        if self._exited is not None and not self._exited.done():
            self._exited.set_result(None)

    def _output(self, fd: int, data: bytes) -> None:
        lines = self._splitters[fd].feed(data)
        if lines:
            self._queue(fd, lines)

    def _output_closed(self, fd: int) -> None:
        if fd not in self._pipes_open:
            return
        self._pipes_open.discard(fd)
        rest = self._splitters[fd].finish()
        if rest:
            self._queue(fd, rest)
        closed = self._pipes_closed
        if not self._pipes_open and closed is not None and not closed.done():
            closed.set_result(None)

    def _queue(self, fd: int, lines: list[bytes]) -> None:
        if self._on_output is None:
            return
        stream: Literal["stdout", "stderr"] = "stdout" if fd == 1 else "stderr"
        now = datetime.now(UTC)
        for raw in lines:
            text = raw.decode("utf-8", errors="replace")
            self._lines.put_nowait(LogLine(timestamp=now, stream=stream, text=text))
        if not self._reading_paused and self._lines.qsize() >= _MAX_QUEUED_LINES:
            self._set_reading(paused=True)

    def _set_reading(self, *, paused: bool) -> None:
        self._reading_paused = paused
        if self._transport is None:
            return
        for fd in (1, 2):
            pipe = self._transport.get_pipe_transport(fd)
            if isinstance(pipe, asyncio.ReadTransport) and not pipe.is_closing():
                if paused:
                    pipe.pause_reading()
                else:
                    pipe.resume_reading()

    async def _pump(self) -> None:
        """Hand output lines to the callback, one at a time, in order."""
        while True:
            line = await self._lines.get()
            if line is None:
                return
            if self._reading_paused and self._lines.qsize() <= _MAX_QUEUED_LINES // 2:
                self._set_reading(paused=False)
            if self._on_output is None:
                continue
            try:
                await self._on_output(line)
            except Exception as error:  # a log sink that fails must not fail the job
                self.dropped_lines += 1
                if self.dropped_lines == 1:
                    log.error("step_output_failed", pid=self._pid, error=repr(error))


async def run_step(
    command: str | Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    on_output: OnOutput | None = None,
    timeout_s: float | None = None,
    timeout_grace: float = DEFAULT_GRACE,
) -> StepResult:
    """Run a step to its end (see StepProcess) and return how it ended."""
    step = StepProcess(
        command,
        env=env,
        cwd=cwd,
        on_output=on_output,
        timeout_s=timeout_s,
        timeout_grace=timeout_grace,
    )
    await step.start()
    return await step.wait()
