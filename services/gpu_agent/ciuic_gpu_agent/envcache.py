"""The `cache:` step: a job's Python environment (and the paths it lists), kept by key.

How steps and the cache interact (what a pipeline author can count on):

- `cache:` steps are hoisted, as their description says ("restore before the job, save after
  it"): wherever they stand in `steps`, every one is restored before the first `run:` step, and
  saved after the last one, only when every step succeeded and only when it missed (an entry,
  once made, never changes; a new requirements file is a new key).
- The key is rendered first: `${{ hashFiles('requirements.txt', ...) }}` is what GitHub Actions
  computes (the SHA-256 of each matched file, in path order, then the SHA-256 of those digests;
  the empty string when nothing matches; `!pattern` excludes), over the job's checkout. The
  entry's name is the key plus the agent's Python (`<key>-py3.11`), because an environment is
  only good for the interpreter that built it.
- The first `cache:` step of a job also gives it a Python virtual environment: every `run:`
  step runs with its `bin/` first on PATH and `VIRTUAL_ENV` set, so `pip install -r
  requirements.txt` installs into it and `python` is its interpreter. On a hit the environment
  comes back with everything installed, and the same `pip install` finds every requirement
  satisfied in about a second. The entry also holds each listed path (`/root/.cache/pip`,
  `node_modules`; relative paths are inside the checkout) and puts them back where they were.
- Where an entry lives: on the agent (`<work_dir>/envs/<name>/`, used in place: jobs with one
  key share one environment, so a job must not change it beyond what its key says), and in
  the artifacts bucket as `cache/<name>.tar.gz`, so another agent restores it (download,
  extract, rewrite the old location in `bin/` scripts) instead of building it. A key being
  built by one job is built privately, and not saved, by a second job that wants it meanwhile.
- Without a `cache:` step a job runs with the agent's own Python first on PATH (the host's
  environment, as on a CI runner).

Blocking work (hashing, tar, copying) runs in threads; venv creation is a subprocess.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import sys
import tarfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ciuic_common.errors import CiuicError, NotFound
from ciuic_common.expressions import render
from ciuic_common.globs import matches_any
from ciuic_common.logging import get_logger
from ciuic_common.storage import Storage

__all__ = [
    "CacheError",
    "EnvCache",
    "JobEnv",
    "cache_name",
    "hash_files",
    "render_key",
    "venv_env",
]

log = get_logger(__name__)

Note = Callable[[str], Awaitable[None]]

_UNSAFE = re.compile(r"[^A-Za-z0-9_.=-]+")
_CHUNK = 1 << 20
_SKIP_DIRS = {".git"}


class CacheError(CiuicError):
    """A cache step could not be used (a bad key, a venv that would not build)."""


# ---------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------
def _file_digest(path: Path) -> bytes:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.digest()


def hash_files(root: Path, patterns: Sequence[str]) -> str:
    """GitHub Actions' `hashFiles` over the files under `root` (blocking: reads them)."""
    if not patterns:
        raise CacheError("hashFiles needs at least one pattern")
    matched = []
    for directory, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        for name in files:
            full = Path(directory) / name
            relative = full.relative_to(root).as_posix()
            if matches_any(list(patterns), relative) and full.is_file():
                matched.append((relative, full))
    if not matched:
        return ""
    total = hashlib.sha256()
    for _, full in sorted(matched):
        total.update(_file_digest(full))
    return total.hexdigest()


def render_key(template: str, root: Path) -> str:
    """The cache key `template` with its `${{ }}` expressions evaluated over the checkout."""

    def hashFiles(*patterns: object) -> str:
        if not all(isinstance(p, str) for p in patterns):
            raise CacheError("hashFiles takes file patterns (strings)")
        return hash_files(root, [str(p) for p in patterns])

    functions = {"hashFiles": hashFiles}
    key = render(template, {}, functions).strip()
    if not key:
        raise CacheError(
            f"the cache key {template!r} is empty (does hashFiles match any file of the checkout?)"
        )
    return key


def cache_name(key: str, python: tuple[int, int] = sys.version_info[:2]) -> str:
    """The entry's name: the key (made safe for paths and S3) plus the Python it is for."""
    safe = _UNSAFE.sub("_", key).strip("._") or "key"
    if len(safe) > 120 or safe != key:
        safe = f"{safe[:60]}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    return f"{safe}-py{python[0]}.{python[1]}"


# ---------------------------------------------------------------------------------------------
# Entries
# ---------------------------------------------------------------------------------------------
Hit = Literal["local", "s3", "miss", "busy"]


@dataclass
class JobEnv:
    """One restored (or to-be-built) cache entry of a job."""

    key: str
    name: str
    paths: list[str]
    hit: Hit
    #: The job's virtual environment (the first cache step's), or None.
    venv: Path | None
    #: The entry directory this job builds and saves on success (a miss it claimed).
    building: Path | None
    seconds: float = 0.0


def _target(path: str, workdir: Path) -> Path:
    expanded = Path(os.path.expanduser(path))
    return expanded if expanded.is_absolute() else workdir / expanded


def _copy(source: Path, target: Path) -> None:
    if source.is_dir() and not source.is_symlink():
        shutil.copytree(source, target, symlinks=True, dirs_exist_ok=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target, follow_symlinks=False)


def _relocate(venv: Path, old: str, new: str) -> int:
    """Rewrite `old` to `new` in the venv's scripts and pyvenv.cfg; how many files changed."""
    if old == new:
        return 0
    changed = 0
    candidates = [venv / "pyvenv.cfg"]
    bin_dir = venv / "bin"
    if bin_dir.is_dir():
        candidates += [p for p in bin_dir.iterdir() if p.is_file() and not p.is_symlink()]
    for path in candidates:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if len(data) > 1 << 20 or b"\0" in data[:1024] or old.encode() not in data:
            continue
        path.write_bytes(data.replace(old.encode(), new.encode()))
        changed += 1
    return changed


class EnvCache:
    """Cache entries on this agent (`root`) and in S3 (`bucket`, `cache/<name>.tar.gz`)."""

    def __init__(
        self,
        root: Path,
        storage: Storage | None,
        bucket: str,
        *,
        python: str = sys.executable,
    ) -> None:
        self.root = root
        self.storage = storage
        self.bucket = bucket
        self.python = python
        self._restoring: dict[str, asyncio.Lock] = {}
        root.mkdir(parents=True, exist_ok=True)
        # Entries a previous run of the agent was still building are half made: start afresh.
        for entry in root.iterdir():
            if entry.is_dir() and not (entry / "complete").exists():
                shutil.rmtree(entry, ignore_errors=True)
            elif entry.suffix in (".part", ".restoring"):
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink()

    def s3_key(self, name: str) -> str:
        return f"cache/{name}.tar.gz"

    async def restore(
        self,
        key: str,
        paths: Sequence[str],
        workdir: Path,
        job_dir: Path,
        *,
        with_venv: bool,
        note: Note,
    ) -> JobEnv:
        """Bring the entry of `key` back (from this agent, else S3), or prepare to build it."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        name = cache_name(key)
        entry = self.root / name
        env = JobEnv(key, name, list(paths), "miss", None, None)
        # Jobs starting together with one key (the nodes and trials of a sweep) restore it once:
        # the others wait and find it here.
        async with self._restoring.setdefault(name, asyncio.Lock()):
            if (entry / "complete").exists():
                env.hit = "local"
            elif await self._from_s3(name, entry, note):
                env.hit = "s3"
        if env.hit != "miss":
            await asyncio.to_thread(self._put_back, entry, paths, workdir)
            env.venv = entry / "venv" if (entry / "venv").is_dir() and with_venv else None
            if with_venv and env.venv is None:
                # Saved by a job whose cache step was not the first: build a venv anyway.
                env.venv = await self._create_venv(job_dir / "venv")
        else:
            try:
                entry.mkdir()
                env.building = entry
                target = entry / "venv"
            except FileExistsError:
                env.hit = "busy"  # another job builds this key: build privately, save nothing
                target = job_dir / "venv"
            if with_venv:
                env.venv = await self._create_venv(target)
        env.seconds = loop.time() - started
        return env

    async def _create_venv(self, target: Path) -> Path:
        proc = await asyncio.create_subprocess_exec(
            self.python, "-m", "venv", str(target),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            raise CacheError(f"could not create a virtualenv: {out.decode(errors='replace')}")
        return target

    def _put_back(self, entry: Path, paths: Sequence[str], workdir: Path) -> None:
        for index, path in enumerate(paths):
            saved = entry / "paths" / str(index)
            if saved.exists() or saved.is_symlink():
                _copy(saved, _target(path, workdir))

    async def _from_s3(self, name: str, entry: Path, note: Note) -> bool:
        if self.storage is None:
            return False
        archive = self.root / f"{name}.tar.gz.part"
        try:
            await self.storage.download_file(self.bucket, self.s3_key(name), archive)
        except NotFound:
            return False
        except CiuicError as error:
            await note(f"cache: could not read s3://{self.bucket}/{self.s3_key(name)}: {error}")
            return False
        try:
            await asyncio.to_thread(self._unpack, archive, entry)
        except (OSError, tarfile.TarError, ValueError) as error:
            await note(f"cache: s3://{self.bucket}/{self.s3_key(name)} is unusable: {error}")
            return False
        finally:
            archive.unlink(missing_ok=True)
        return True

    def _unpack(self, archive: Path, entry: Path) -> None:
        staging = entry.with_name(entry.name + ".restoring")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        with tarfile.open(archive, "r:gz") as tar:
            # "tar", not "data": a venv's bin/python is a symlink to an absolute path.
            tar.extractall(staging, filter="tar")
        manifest = json.loads((staging / "manifest.json").read_text())
        if (staging / "venv").is_dir():
            _relocate(staging / "venv", f"{manifest['prefix']}/venv", f"{entry}/venv")
        (staging / "complete").touch()
        try:
            staging.rename(entry)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)  # a concurrent restore won the race
            if not (entry / "complete").exists():
                raise

    async def save(self, env: JobEnv, workdir: Path, note: Note) -> None:
        """Keep the entry this job built (its paths copied in), here and in S3."""
        entry = env.building
        if entry is None:
            return
        archive = self.root / f"{env.name}.tar.gz.part"
        try:
            await asyncio.to_thread(self._pack, env, entry, workdir, archive)
            if self.storage is not None:
                await self.storage.upload_file(archive, self.bucket, self.s3_key(env.name))
                await note(f"cache: saved {env.name} to s3://{self.bucket}/{self.s3_key(env.name)}")
        except CiuicError as error:
            await note(f"cache: could not upload {env.name}: {error} (kept on this agent)")
        finally:
            archive.unlink(missing_ok=True)
            (entry / "complete").touch()
            env.building = None

    def _pack(self, env: JobEnv, entry: Path, workdir: Path, archive: Path) -> None:
        saved = []
        for index, path in enumerate(env.paths):
            source = _target(path, workdir)
            if source.exists():
                _copy(source, entry / "paths" / str(index))
                saved.append(path)
        manifest = {"key": env.key, "prefix": str(entry), "paths": env.paths, "saved": saved}
        (entry / "manifest.json").write_text(json.dumps(manifest))
        with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
            for item in sorted(entry.iterdir()):
                if item.name != "complete":
                    tar.add(item, arcname=item.name)

    async def discard(self, env: JobEnv) -> None:
        """Forget an entry this job claimed but did not complete (a failed step)."""
        if env.building is not None:
            await asyncio.to_thread(shutil.rmtree, env.building, True)
            env.building = None


def venv_env(venv: Path | None, base_path: str) -> dict[str, str]:
    """The variables that make `venv` the job's Python (PATH first, VIRTUAL_ENV)."""
    if venv is None:
        return {"PATH": base_path}
    return {"PATH": f"{venv / 'bin'}{os.pathsep}{base_path}", "VIRTUAL_ENV": str(venv)}
