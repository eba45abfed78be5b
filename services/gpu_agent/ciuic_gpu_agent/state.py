"""What the agent remembers of its jobs across its own restarts: one small JSON file per node.

A record is written (atomically: temporary file, fsync, rename) when an assignment is accepted,
before `JobAccepted` goes out, and updated when its process group starts and when it finished
(with the `JobFinished` to publish). It is removed once that `JobFinished` is on the bus. So
after a crash or a restart, every record left names a job the scheduler may still think runs
here, and `recover` decides what to say about it (the service acts):

- finished but not yet reported: publish the stored `JobFinished` again (same `event_id`, so
  JetStream drops it if the first publish did land);
- its process group still alive: the agent that followed its output is gone, so nothing could
  report its result; stop it (SIGTERM, grace, SIGKILL), upload its last checkpoints, and report
  it `lost` with the reason, so the scheduler retries it from them;
- otherwise: report it `lost` ("the agent restarted and the job's processes were gone").

`AgentRegistered.running_jobs` lists only jobs the new agent really runs, which after this is
none of the recovered ones: the scheduler then loses what it still had placed here, and the
`JobFinished` reports say why.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import psutil

from ciuic_common.events import JobFinished

__all__ = ["JobRecord", "JobStateStore", "Recovery", "finished_event", "group_alive", "recover"]

Phase = Literal["accepted", "running", "finished"]
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass
class JobRecord:
    """One accepted node of a job, as the agent last wrote it down."""

    run_id: str
    job_id: str
    attempt: int
    node_rank: int
    agent_id: str
    phase: Phase = "accepted"
    accepted_at: str = ""
    started_at: str | None = None
    #: Process groups the job started (one per step; the last one is the live one).
    pgids: list[int] = field(default_factory=list)
    workdir: str = ""
    output_prefix: str | None = None
    #: The JobFinished to publish, as JSON, once the job ended.
    finished: dict[str, Any] | None = None

    @property
    def key(self) -> str:
        return f"{self.job_id}.a{self.attempt}.n{self.node_rank}"

    def started(self) -> datetime | None:
        return datetime.fromisoformat(self.started_at) if self.started_at else None


class JobStateStore:
    """The records under one directory (the agent's `state/`)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / f"{_SAFE.sub('_', key)}.json"

    def save(self, record: JobRecord) -> None:
        """Write `record` durably (blocking: call from a thread on the event loop's behalf)."""
        path = self._path(record.key)
        temporary = path.with_suffix(".tmp")
        data = json.dumps(asdict(record), indent=1).encode()
        with temporary.open("wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        temporary.replace(path)

    def remove(self, record: JobRecord) -> None:
        """Forget `record` (its JobFinished is on the bus)."""
        with contextlib.suppress(FileNotFoundError):
            self._path(record.key).unlink()

    def load_all(self) -> list[JobRecord]:
        """Every record left, oldest accepted first; unreadable files are renamed `.bad`."""
        records = []
        for path in sorted(self.root.glob("*.json")):
            try:
                records.append(JobRecord(**json.loads(path.read_text())))
            except (OSError, ValueError, TypeError):
                with contextlib.suppress(OSError):
                    path.replace(path.with_suffix(".bad"))
        return sorted(records, key=lambda r: r.accepted_at)


def group_alive(pgid: int) -> bool:
    """Whether any live (not zombie) process is in process group `pgid` (blocking: /proc)."""
    for proc in psutil.process_iter(["status"]):
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return True
    return False


@dataclass(frozen=True)
class Recovery:
    """What to do about one record after a restart (see the module docstring)."""

    action: Literal["republish", "stop_and_lose", "lose"]
    record: JobRecord
    reason: str


def recover(record: JobRecord, alive: bool) -> Recovery:
    """Decide about `record`; `alive`: whether one of its process groups still runs. Pure."""
    if record.finished is not None:
        return Recovery("republish", record, "finished before the agent restarted")
    if alive:
        return Recovery(
            "stop_and_lose",
            record,
            "the agent restarted while the job ran and could no longer follow its output; "
            "it stopped the job's processes",
        )
    where = "before its process started" if record.phase == "accepted" else "while it ran"
    return Recovery("lose", record, f"the agent restarted {where}; the job's processes were gone")


def finished_event(record: JobRecord) -> JobFinished:
    """The stored JobFinished of a finished record."""
    assert record.finished is not None
    return JobFinished.model_validate(record.finished)
