"""Which repository a URL names: the same repository arrives as an https clone URL, an ssh URL,
a web URL or (for local work) a path, and must match the one registration."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

from ciuic_common.errors import InvalidArgument

_SCP = re.compile(r"^(?:[\w.-]+@)?(?P<host>[\w.-]+):(?P<path>(?!//).+)$")


def fetch_url(url_or_path: str) -> str:
    """The URL git fetches from: a local path becomes a file:// URL; others stay as given."""
    text = url_or_path.strip()
    if not text:
        raise InvalidArgument("a repository URL or path is required")
    if "://" in text:
        if urlsplit(text).password is not None:
            raise InvalidArgument(
                "put no credentials in the repository URL (they would show in logs and events); "
                "give git a credential helper or an ssh key instead"
            )
        return text
    if _SCP.match(text):
        return text
    return Path(text).expanduser().resolve().as_uri()


def repository_key(url_or_path: str) -> str:
    """The URL reduced to what identifies the repository: `github.com/org/repo`,
    `file:/abs/path`. Scheme, credentials, port and a trailing `.git` do not count."""
    url = fetch_url(url_or_path)
    if url.startswith("file://"):
        path = urlsplit(url).path.rstrip("/") or "/"
        return f"file:{path.removesuffix('/.git')}"
    scp = _SCP.match(url) if "://" not in url else None
    if scp:
        host, path = scp.group("host"), scp.group("path")
    else:
        parts = urlsplit(url)
        if not parts.hostname:
            raise InvalidArgument(f"{url_or_path!r} is not a repository URL")
        host, path = parts.hostname, parts.path
    path = path.strip("/").removesuffix(".git").strip("/")
    if not path:
        raise InvalidArgument(f"{url_or_path!r} names a host but no repository")
    # Hosted git (GitHub, GitLab, Gitea) treats owner and repository names case-insensitively.
    return f"{host.lower()}/{path.lower()}"
