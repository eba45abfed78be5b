"""Make sure Debian's `chromium` is installed for the browser tests, installing it when missing.

    python tools/ensure_chromium.py     print the browser's path (exit 0), or why there is none (1)

The dashboard test drives a real headless Chromium. Playwright's own browser download is never
used (the platform and its CI run offline from everything but the package mirrors), so the
browser comes from apt: `apt-get install -y --no-install-recommends chromium`, which needs root.
Where that cannot happen (not root, no apt, no mirror) the caller gets the reason to skip with.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["ChromiumUnavailable", "ensure_chromium", "find_chromium"]

# Debian installs the launcher script here; `chromium` on PATH is the same file.
CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
# apt waits this long for another dpkg (a concurrent test session, unattended-upgrades).
_DPKG_LOCK_TIMEOUT_S = 300
_INSTALL_TIMEOUT_S = 900


class ChromiumUnavailable(RuntimeError):
    """Chromium is not installed and could not be installed; the message says why."""


def find_chromium() -> str | None:
    """The path of an installed Chromium, or None."""
    env = os.environ.get("CIUIC_CHROMIUM")
    if env:
        return env if os.access(env, os.X_OK) else None
    for path in CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    return shutil.which("chromium")


def ensure_chromium(log: bool = True) -> str:
    """The path of Chromium, installed with apt-get first if it is missing; raises
    ChromiumUnavailable with the reason when it is missing and cannot be installed."""
    found = find_chromium()
    if found:
        return found
    if os.environ.get("CIUIC_CHROMIUM"):
        raise ChromiumUnavailable(
            f"CIUIC_CHROMIUM={os.environ['CIUIC_CHROMIUM']} is not executable"
        )
    if os.geteuid() != 0:
        raise ChromiumUnavailable(
            "chromium is not installed and installing it needs root "
            "(run `sudo apt-get install -y chromium`)"
        )
    if shutil.which("apt-get") is None:
        raise ChromiumUnavailable("chromium is not installed and there is no apt-get to install it")
    # Two test sessions at once would otherwise both run apt; the second waits, then finds it.
    lock_path = Path(tempfile.gettempdir()) / "ciuic-ensure-chromium.lock"
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = find_chromium()
        if found:
            return found
        started = time.monotonic()
        _apt_install(log)
        found = find_chromium()
        if not found:
            raise ChromiumUnavailable("apt-get installed chromium but no chromium binary was found")
        if log:
            elapsed = time.monotonic() - started
            print(f"ensure_chromium: installed {found} in {elapsed:.1f} s", file=sys.stderr)
        return found


def _apt_install(log: bool) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock_wait = f"DPkg::Lock::Timeout={_DPKG_LOCK_TIMEOUT_S}"
    install = ["apt-get", "-o", lock_wait, "install", "-y", "--no-install-recommends", "chromium"]
    if log:
        print("ensure_chromium: chromium is missing; installing it with apt-get", file=sys.stderr)
    # Try with the package lists we have first; refresh them only if that fails (stale lists
    # name versions the mirror no longer has).
    first = _run(install, env)
    if first.returncode == 0:
        return
    update = _run(["apt-get", "-o", lock_wait, "update"], env)
    if update.returncode != 0:
        raise ChromiumUnavailable(f"apt-get update failed: {_tail(update.stdout)}")
    second = _run(install, env)
    if second.returncode != 0:
        raise ChromiumUnavailable(f"apt-get install chromium failed: {_tail(second.stdout)}")


def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            argv,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=_INSTALL_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ChromiumUnavailable(f"{' '.join(argv)} took over {_INSTALL_TIMEOUT_S} s") from exc


def _tail(output: str, lines: int = 5) -> str:
    return " | ".join(output.strip().splitlines()[-lines:])


def main() -> int:
    """Print the browser's path, or the reason there is none on stderr (exit 1)."""
    try:
        print(ensure_chromium())
    except ChromiumUnavailable as exc:
        print(f"ensure_chromium: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
