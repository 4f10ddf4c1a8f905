"""Registry authentication inputs: WWW-Authenticate challenges and container auth files (pure).

A registry answers an anonymous request with ``401`` and a challenge such as
``Bearer realm="https://ghcr.io/token",service="ghcr.io",scope="repository:o/r:pull"``
(RFC 7235 syntax); the client then fetches a token from the realm, with the user's credentials
when it has some. Credentials come from the auth files podman and docker already write.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from egpu.errors import ImageError

MAX_CHALLENGE_LEN = 8192
# Docker writes Hub credentials under this legacy key.
DOCKER_HUB_AUTH_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io")
REGISTRY_AUTH_FILE_ENV = "REGISTRY_AUTH_FILE"

_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
# \Z, not $: '$' also matches before a trailing newline.
_SCHEME_RE = re.compile(rf"\s*({_TOKEN})(?:\s+|\Z)")
_PARAM_RE = re.compile(rf'\s*({_TOKEN})\s*=\s*(?:"((?:[^"\\]|\\.)*)"|({_TOKEN}))\s*(?:,|\Z)')


@dataclass(frozen=True)
class Challenge:
    """One authentication challenge: its scheme (lowercased) and parameters."""

    scheme: str
    params: Mapping[str, str] = field(default_factory=dict, hash=False)

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")


@dataclass(frozen=True)
class Credentials:
    """A user name and secret for one registry."""

    username: str
    password: str = field(repr=False)


def parse_challenges(header: str) -> list[Challenge]:
    """Parse a WWW-Authenticate header into its challenges; ImageError when it is malformed."""
    if len(header) > MAX_CHALLENGE_LEN:
        raise ImageError("registry sent an oversized WWW-Authenticate header")
    challenges: list[Challenge] = []
    pos = 0
    text = header.strip()
    while pos < len(text):
        m = _SCHEME_RE.match(text, pos)
        if not m:
            raise ImageError(f"registry sent a malformed WWW-Authenticate header: {header[:120]!r}")
        scheme, pos = m.group(1).lower(), m.end()
        params: dict[str, str] = {}
        while pos < len(text):
            p = _PARAM_RE.match(text, pos)
            if not p:
                break
            value = p.group(2) if p.group(2) is not None else p.group(3)
            params[p.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
            pos = p.end()
        challenges.append(Challenge(scheme, params))
        # A scheme with neither parameters nor a following challenge may end with a comma.
        while pos < len(text) and text[pos] in ", ":
            pos += 1
    return challenges


def bearer_challenge(header: str) -> Challenge | None:
    """The Bearer challenge in a header (the one registries use for token auth), if any."""
    for c in parse_challenges(header):
        if c.scheme == "bearer" and c.realm:
            return c
    return None


def credentials_from_auth_doc(
    doc: Mapping[str, Any], registry: str, repository: str
) -> Credentials | None:
    """Find credentials for a registry in a docker/podman auth file's parsed JSON.

    podman allows keys narrowed to a namespace (``registry/org``): the longest match wins.
    """
    auths = doc.get("auths")
    if not isinstance(auths, dict):
        return None
    wanted = [f"{registry}/{repository}"]
    parts = repository.split("/")
    wanted += [f"{registry}/{'/'.join(parts[:i])}" for i in range(len(parts) - 1, 0, -1)]
    wanted += [registry, f"https://{registry}", f"http://{registry}", f"https://{registry}/v2/"]
    wanted += [f"https://{registry}/v1/"]
    if registry == "docker.io":
        wanted += list(DOCKER_HUB_AUTH_KEYS)
    for key in wanted:
        entry = auths.get(key)
        if isinstance(entry, dict):
            creds = _decode_entry(entry)
            if creds is not None:
                return creds
    return None


def _decode_entry(entry: Mapping[str, Any]) -> Credentials | None:
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        try:
            user, sep, secret = base64.b64decode(auth, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise ImageError(
                "container auth file has an entry that is not base64 user:password"
            ) from None
        if sep and user:
            return Credentials(user, secret)
    name, password = entry.get("username"), entry.get("password")
    if isinstance(name, str) and isinstance(password, str) and name:
        return Credentials(name, password)
    return None


def auth_file_candidates(env: Mapping[str, str], home: Path) -> list[Path]:
    """Where podman/skopeo and docker keep registry credentials, in the order they look."""
    out: list[Path] = []
    if env.get(REGISTRY_AUTH_FILE_ENV):
        out.append(Path(env[REGISTRY_AUTH_FILE_ENV]))
    if env.get("XDG_RUNTIME_DIR"):
        out.append(Path(env["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    out.append(Path(env.get("XDG_CONFIG_HOME") or home / ".config") / "containers" / "auth.json")
    out.append(Path(env.get("DOCKER_CONFIG") or home / ".docker") / "config.json")
    return out


def load_credentials(
    registry: str, repository: str, env: Mapping[str, str] | None = None
) -> Credentials | None:
    """Credentials for a registry from the first auth file that has some, or None."""
    env = os.environ if env is None else env
    for path in auth_file_candidates(env, Path.home()):
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as e:
            raise ImageError(f"cannot read container auth file {path}: {e}") from None
        if isinstance(doc, dict):
            creds = credentials_from_auth_doc(doc, registry, repository)
            if creds is not None:
                return creds
    return None
