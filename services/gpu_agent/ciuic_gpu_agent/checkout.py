"""Code for a job: a local bare mirror per repository, and a fresh work tree per job at its commit.

The first job of a repository clones it (`git clone --mirror`) under `mirrors/`; later jobs
fetch into the mirror only when it lacks their commit, so git moves only the new objects. Each
job then gets its own tree: `git clone --shared --no-checkout` from the mirror (no objects are
copied: the tree borrows the mirror's through `objects/info/alternates`) and a detached
checkout of the commit. One lock per mirror keeps two jobs from fetching into it at once.

Git runs as a subprocess of the event loop (never blocking it), with no terminal prompts and a
timeout; its failures become `CheckoutError` with git's own message.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
from pathlib import Path

from ciuic_common.errors import CiuicError
from ciuic_common.logging import get_logger

__all__ = ["CheckoutError", "Mirrors"]

log = get_logger(__name__)

DEFAULT_TIMEOUT = 600.0
_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


class CheckoutError(CiuicError):
    """The job's code could not be checked out (git's message says why)."""


async def git(*args: str, cwd: Path | None = None, limit: float = DEFAULT_TIMEOUT) -> str:
    """Run git; its stdout, or CheckoutError with its stderr."""
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "true", "LC_ALL": "C"}
    proc = await asyncio.create_subprocess_exec(
        "git",
        *args,
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), limit)
    except (TimeoutError, asyncio.CancelledError):
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        message = err.decode(errors="replace").strip().splitlines()
        raise CheckoutError(f"git {args[0]} failed: {message[-1] if message else proc.returncode}")
    return out.decode(errors="replace")


class Mirrors:
    """Bare mirrors of repositories under `root`, and work trees made from them."""

    def __init__(self, root: Path, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.root = root
        self.timeout = timeout
        self._locks: dict[str, asyncio.Lock] = {}
        #: What the last `checkout` did to the mirror: "clone", "fetch" or "none".
        self.last_mirror_action = "none"

    def mirror_path(self, repository: str) -> Path:
        """Where the mirror of `repository` lives (a readable name plus a hash of the URL)."""
        digest = hashlib.sha256(repository.encode()).hexdigest()[:16]
        tail = _NAME.sub("-", repository.rstrip("/").rsplit("/", 1)[-1])[:40]
        return self.root / f"{tail}-{digest}.git"

    async def _has_commit(self, mirror: Path, commit: str) -> bool:
        try:
            await git("cat-file", "-e", f"{commit}^{{commit}}", cwd=mirror, limit=self.timeout)
        except CheckoutError:
            return False
        return True

    async def update(self, repository: str, commit: str) -> Path:
        """The mirror of `repository`, holding `commit` (cloned or fetched as needed)."""
        mirror = self.mirror_path(repository)
        lock = self._locks.setdefault(str(mirror), asyncio.Lock())
        async with lock:
            if not (mirror / "HEAD").exists():
                self.root.mkdir(parents=True, exist_ok=True)
                partial = mirror.with_name(mirror.name + ".partial")
                await asyncio.to_thread(shutil.rmtree, partial, True)
                await git(
                    "clone", "--mirror", "--quiet", repository, str(partial), limit=self.timeout
                )
                partial.replace(mirror)
                self.last_mirror_action = "clone"
                log.info("mirror_cloned", repository=repository, path=str(mirror))
            elif not await self._has_commit(mirror, commit):
                await git("fetch", "--prune", "--quiet", "origin", cwd=mirror, limit=self.timeout)
                self.last_mirror_action = "fetch"
            else:
                self.last_mirror_action = "none"
            if not await self._has_commit(mirror, commit):
                raise CheckoutError(f"commit {commit} is not in {repository}")
        return mirror

    async def checkout(self, repository: str, commit: str, dest: Path) -> Path:
        """A fresh tree of `repository` at `commit` in `dest` (which must not exist yet)."""
        mirror = await self.update(repository, commit)
        await git(
            "clone", "--shared", "--no-checkout", "--quiet", str(mirror), str(dest),
            limit=self.timeout,
        )  # fmt: skip
        await git("checkout", "--quiet", "--detach", commit, cwd=dest, limit=self.timeout)
        return dest
