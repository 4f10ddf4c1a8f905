"""OCI references (``registry/repository[:tag|@sha256:digest]``) and digests: pure parsing.

The grammar follows the distribution project's reference grammar (as docker, podman and oras
accept it): a first path component with a dot, a colon or equal to ``localhost`` is a registry,
otherwise the registry is Docker Hub. Everything here is untrusted input (a command line, a
registry's JSON), so every part is validated before it is used in a URL or a file name.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from egpu.errors import ImageError, UsageError

DEFAULT_REGISTRY = "docker.io"
# Docker Hub's API lives on another host than the name people write.
DOCKER_HUB_API = "registry-1.docker.io"
DEFAULT_TAG = "latest"
SHA256 = "sha256"
SHA256_HEX_LEN = 64
# distribution's limit on the whole name (registry + repository).
MAX_NAME_LEN = 255
MAX_TAG_LEN = 128

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
# Every pattern is used with fullmatch: '$' would also accept a trailing newline.
_DOMAIN_RE = re.compile(
    rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{{1,5}})?"
)
# all matched with fullmatch: "$" alone would let a trailing newline through
_PATH_COMPONENT_RE = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST_RE = re.compile(r"sha256:[a-f0-9]{64}")


@dataclass(frozen=True, order=True)
class Digest:
    """A validated ``sha256:<64 lowercase hex>`` content digest (safe to use as a file name)."""

    hex: str

    @classmethod
    def parse(cls, text: object) -> Digest:
        """Parse a digest; ImageError unless it is sha256 with exactly 64 lowercase hex digits."""
        if not isinstance(text, str) or not _DIGEST_RE.fullmatch(text):
            shown = text[:80] if isinstance(text, str) else type(text).__name__
            raise ImageError(f"invalid digest {shown!r}: expected sha256:<64 hex digits>")
        return cls(text.split(":", 1)[1])

    @classmethod
    def of_hex(cls, hex_digest: str) -> Digest:
        """A digest from a bare sha256 hex string (as hashlib's hexdigest gives)."""
        return cls.parse(f"{SHA256}:{hex_digest.lower()}")

    def __str__(self) -> str:
        return f"{SHA256}:{self.hex}"


@dataclass(frozen=True)
class OciReference:
    """A parsed image reference. ``tag`` is None only when a digest pins the manifest."""

    registry: str
    repository: str
    tag: str | None = None
    digest: Digest | None = None

    @property
    def api_host(self) -> str:
        """The host (and port) that serves the registry API for this reference."""
        return DOCKER_HUB_API if self.registry == DEFAULT_REGISTRY else self.registry

    @property
    def hostname(self) -> str:
        """The registry's host name without port or IPv6 brackets."""
        host = self.registry
        if host.startswith("["):
            return host[1 : host.index("]")]
        return host.rsplit(":", 1)[0] if ":" in host else host

    @property
    def is_loopback(self) -> bool:
        """True for registries on this machine: the only ones egpu talks to over plain HTTP."""
        return is_loopback_host(self.hostname)

    @property
    def manifest_ref(self) -> str:
        """What goes after ``/manifests/``: the digest when pinned, else the tag."""
        if self.digest is not None:
            return str(self.digest)
        return self.tag or DEFAULT_TAG

    @property
    def name(self) -> str:
        """``registry/repository`` without tag or digest."""
        return f"{self.registry}/{self.repository}"

    def __str__(self) -> str:
        text = self.name
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text

    def with_digest(self, digest: Digest) -> OciReference:
        return OciReference(self.registry, self.repository, self.tag, digest)


def is_loopback_host(host: str) -> bool:
    """Whether a host name or address is this machine (localhost, 127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_reference(text: str) -> OciReference:
    """Parse ``[registry/]repository[:tag][@sha256:digest]``; UsageError when malformed."""
    original = text
    if not text or len(text) > MAX_NAME_LEN + MAX_TAG_LEN + 80 or text != text.strip():
        raise UsageError(f"bad image reference {original[:80]!r}")
    digest: Digest | None = None
    if "@" in text:
        text, _, digest_text = text.partition("@")
        try:
            digest = Digest.parse(digest_text)
        except ImageError as e:
            raise UsageError(f"bad image reference {original!r}: {e}") from None
    tag: str | None = None
    # A tag is after the last ':' only when no '/' follows it (else the ':' is a port).
    head, sep, tail = text.rpartition(":")
    if sep and "/" not in tail:
        if not _TAG_RE.fullmatch(tail):
            raise UsageError(f"bad image reference {original!r}: invalid tag {tail!r}")
        text, tag = head, tail
    parts = text.split("/")
    first = parts[0]
    if len(parts) > 1 and ("." in first or ":" in first or first == "localhost"):
        registry, path = first, parts[1:]
        if not _DOMAIN_RE.fullmatch(registry) or not _valid_port(registry):
            raise UsageError(f"bad image reference {original!r}: invalid registry {registry!r}")
    else:
        registry, path = DEFAULT_REGISTRY, parts
        if len(path) == 1:
            path = ["library", *path]  # Docker Hub's official images
    for component in path:
        if not _PATH_COMPONENT_RE.fullmatch(component):
            raise UsageError(
                f"bad image reference {original!r}: invalid repository component {component!r}"
            )
    repository = "/".join(path)
    if len(registry) + 1 + len(repository) > MAX_NAME_LEN:
        raise UsageError(f"bad image reference {original[:80]!r}: name too long")
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return OciReference(registry, repository, tag, digest)


def parse_tag(text: str) -> str:
    """A tag on its own (as ``image push --tag`` takes it); UsageError when malformed."""
    if not _TAG_RE.fullmatch(text):
        raise UsageError(f"bad tag {text[:80]!r}: letters, digits, '_', '.' and '-', at most 128")
    return text


def _valid_port(registry: str) -> bool:
    """Port in range, and a bracketed host is a real IPv6 address."""
    if registry.startswith("["):
        try:
            ipaddress.IPv6Address(registry[1 : registry.index("]")])
        except ValueError:
            return False
    if ":" not in registry.rsplit("]", 1)[-1]:
        return True
    port = int(registry.rsplit(":", 1)[1])
    return 0 < port < 65536
