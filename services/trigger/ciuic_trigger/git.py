"""A local cache of bare mirrors, one per repository, and the few git questions the trigger asks
of them. git runs as a subprocess (never on the event loop), with a timeout and no prompts."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
from pathlib import Path

from ciuic_common.errors import CiuicError, NotFound, Unavailable
from ciuic_common.logging import get_logger

log = get_logger(__name__)

_ENV = {
    **os.environ,
    "GIT_TERMINAL_PROMPT": "0",  # never wait for a password on a terminal nobody watches
    "GIT_SSH_COMMAND": os.environ.get("GIT_SSH_COMMAND", "ssh -o BatchMode=yes"),
    "LC_ALL": "C",
}


class GitError(CiuicError):
    """A git command failed; the message has git's own words."""


class Mirrors:
    """Bare mirrors under `root`, fetched on demand; one fetch at a time per repository."""

    def __init__(self, root: Path, *, timeout: float = 120.0) -> None:
        self.root = root
        self.timeout = timeout
        self._locks: dict[str, asyncio.Lock] = {}

    def path(self, url: str) -> Path:
        return self.root / (hashlib.sha256(url.encode()).hexdigest()[:24] + ".git")

    async def _git(self, *args: str, cwd: Path | None = None, check: bool = True) -> bytes:
        proc = await asyncio.create_subprocess_exec(
            "git", *args, cwd=cwd, env=_ENV,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            out, err = await asyncio.wait_for(proc.communicate(), self.timeout)
        except TimeoutError:
            raise Unavailable(f"git {args[0]} took longer than {self.timeout:g}s") from None
        finally:
            if proc.returncode is None:  # timed out or cancelled: leave no git behind
                proc.kill()
                await proc.wait()
        if check and proc.returncode != 0:
            raise GitError(
                f"git {' '.join(args[:2])} failed: {err.decode(errors='replace').strip()}"
            )
        return out

    async def _network(self, *args: str, cwd: Path | None = None) -> None:
        """A clone or fetch: failing to reach the remote is worth retrying later."""
        try:
            await self._git(*args, cwd=cwd)
        except GitError as exc:
            raise Unavailable(str(exc)) from exc

    async def _has(self, mirror: Path, commit: str) -> bool:
        out = await self._git("cat-file", "-t", commit, cwd=mirror, check=False)
        return out.strip() == b"commit"

    async def sync(self, url: str, *, want: str | None = None) -> Path:
        """The mirror of `url`, fetched unless it already has the commit `want`."""
        lock = self._locks.setdefault(url, asyncio.Lock())
        async with lock:
            mirror = self.path(url)
            if not (mirror / "HEAD").exists():
                self.root.mkdir(parents=True, exist_ok=True)
                partial = mirror.with_suffix(".partial")
                shutil.rmtree(partial, ignore_errors=True)
                await self._network("clone", "--mirror", "--quiet", url, str(partial))
                partial.rename(mirror)
                log.info("mirror_cloned", url=url)
            elif want is None or not await self._has(mirror, want):
                await self._network("fetch", "--prune", "--quiet", "origin", cwd=mirror)
            if want is not None and not await self._has(mirror, want):
                raise NotFound(f"commit {want} is not in {url} (force-pushed away, or not pushed?)")
            return mirror

    async def resolve(self, mirror: Path, ref: str) -> str:
        """The commit a branch, tag, `HEAD` or (abbreviated) commit names."""
        out = await self._git(
            "rev-parse",
            "--verify",
            "--quiet",
            f"{ref or 'HEAD'}^{{commit}}",
            cwd=mirror,
            check=False,
        )
        if not out.strip():
            raise NotFound(f"no branch, tag or commit {ref!r} in the repository")
        return out.decode().strip()

    async def full_ref(self, mirror: Path, ref: str) -> str:
        """`refs/heads/main` for `main`, `refs/tags/v1` for `v1`; '' for a commit."""
        out = await self._git(
            "rev-parse", "--symbolic-full-name", ref or "HEAD", cwd=mirror, check=False
        )
        return out.decode().strip()

    async def read_file(self, mirror: Path, commit: str, path: str, *, limit: int) -> bytes | None:
        """The file at `commit`, or None when it does not exist; larger than `limit` is an error."""
        spec = f"{commit}:{path}"
        size = await self._git("cat-file", "-s", spec, cwd=mirror, check=False)
        if not size.strip():
            return None
        if int(size) > limit:
            raise GitError(f"{path} is {int(size)} bytes at {commit[:12]}, more than {limit}")
        return await self._git("cat-file", "blob", spec, cwd=mirror)

    async def changed_files(self, mirror: Path, before: str, after: str) -> list[str]:
        """Files that differ between two commits; against the parent when `before` is unknown."""
        if before and await self._has(mirror, before):
            out = await self._git("diff", "--name-only", "-z", before, after, cwd=mirror)
        else:
            # A new branch, or a force-push whose old head we never fetched: the last commit's
            # own changes (all its files for a root commit) are what we can know.
            out = await self._git(
                "diff-tree", "--no-commit-id", "--name-only", "-r", "-z", "--root", after,
                cwd=mirror,
            )  # fmt: skip
        return [p for p in out.decode(errors="replace").split("\0") if p]
