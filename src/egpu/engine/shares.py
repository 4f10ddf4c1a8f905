"""Shared folders (``run --mount HOST_DIR[:GUEST_DIR][:ro]``): parsing, checks and QEMU's 9p side.

Each share is a host directory QEMU exports over virtio-9p (``-fsdev local`` plus
``-device virtio-9p-pci``) under a tag egpu makes up (``egpu0``, ``egpu1``, ...; never user
text), mounted in the guest at GUEST_DIR, by default the host path itself (as Lima does).

Which ':' separates what: a trailing ``:ro`` or ``:rw`` is the mode; then the part after the
last remaining ':' is GUEST_DIR only if it starts with '/'. So ``/data/a:b`` is one host
directory, and any host path can be given by writing GUEST_DIR (and the mode) out in full:
``/x:/y:/g`` shares host ``/x:/y`` at ``/g``; ``/m:ro:/m:rw`` shares host ``/m:ro`` writable.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from egpu.engine.qemu_options import option_string
from egpu.errors import UsageError

OPTION = "--mount"
SEPARATOR = ":"
READ_ONLY, READ_WRITE = "ro", "rw"
TAG_PREFIX = "egpu"  # tags are egpu0, egpu1, ...: short (9p allows 31 bytes) and never user text
FSDEV_PREFIX = "share"
DEVICE = "virtio-9p-pci"
FSDRIVER = "local"
# One slot each; a guest sharing more folders than this is better served by one parent folder.
MAX_SHARES = 16
# security_model=none: QEMU creates and opens files as the (usually non-root) host user, with
# the modes the guest asks for, and ignores the ownership changes it cannot make. A root guest
# then writes host files the user owns and can use as they are (a model cache shared with host
# tools), and nothing runs as root. mapped-xattr would keep the guest's owners and modes in
# user.virtfs.* xattrs and give every file it creates mode 0600 on the host: right for a guest
# with many users, wrong for a shared cache; it also needs user xattrs from the host filesystem
# (a Linux tmpfs has them only from 6.6). On macOS QEMU's 9p has to map Linux xattr namespaces
# onto Darwin's flat ones and would leave those attributes on the user's files: none again, so
# both hosts behave the same. passthrough needs QEMU to run as root.
SECURITY_MODEL: Literal["none"] = "none"

# Guest directories a share may not cover: the kernel's and the runtime's filesystems (at or
# below), and the system's own top-level directories (themselves; a folder inside is fine).
GUEST_PSEUDO_DIRS = ("/proc", "/sys", "/dev", "/run")
GUEST_SYSTEM_DIRS = frozenset({"/", "/bin", "/boot", "/etc", "/lib", "/lib32", "/lib64",
                               "/libx32", "/sbin", "/usr", "/var", "/tmp", "/root", "/home"})
_FORBIDDEN_CHARS = {"\x00": "a NUL byte", "\n": "a newline"}


@dataclass(frozen=True)
class MountRequest:
    """One ``--mount`` as written, split but not yet checked against the host."""

    host: str
    guest: str | None  # None: the host directory's own absolute path
    readonly: bool


@dataclass(frozen=True)
class Share:
    """One shared folder as the VM gets it: resolved host directory, guest path, tag."""

    tag: str
    host: Path
    guest: str
    readonly: bool

    @property
    def fsdev_id(self) -> str:
        return f"{FSDEV_PREFIX}{self.tag.removeprefix(TAG_PREFIX)}"

    def to_json(self) -> dict[str, Any]:
        return {"tag": self.tag, "host": str(self.host), "guest": self.guest,
                "readonly": self.readonly}

    @classmethod
    def from_json(cls, data: object) -> Share:
        """A share read back from a VM's config; ValueError for anything malformed."""
        if not isinstance(data, dict):
            raise ValueError("a mount entry is not an object")
        tag, host, guest, ro = (data.get(k) for k in ("tag", "host", "guest", "readonly"))
        if not (isinstance(tag, str) and isinstance(host, str) and isinstance(guest, str)
                and isinstance(ro, bool)):
            raise ValueError("a mount entry needs tag, host, guest (strings) and readonly")
        return cls(tag=tag, host=Path(host), guest=guest, readonly=ro)


def parse_mount(text: str) -> MountRequest:
    """Split ``HOST_DIR[:GUEST_DIR][:ro|rw]`` by the rule in this module's docstring (pure)."""
    rest, readonly = text, False
    for suffix, ro in ((READ_ONLY, True), (READ_WRITE, False)):
        if rest.endswith(SEPARATOR + suffix):
            rest, readonly = rest[:-len(suffix) - 1], ro
            break
    guest = None
    head, sep, tail = rest.rpartition(SEPARATOR)
    if sep and tail.startswith("/"):
        rest, guest = head, tail
    if not rest:
        raise UsageError(f"{OPTION} {text!r} names no host directory",
                         hint=f"use {OPTION} HOST_DIR[:GUEST_DIR][:ro]")
    return MountRequest(host=rest, guest=guest, readonly=readonly)


def check_guest_path(path: str) -> str:
    """A guest mount point, normalised (``//a/b/`` -> ``/a/b``); UsageError when unusable."""
    for ch, name in _FORBIDDEN_CHARS.items():
        if ch in path:
            raise UsageError(f"{OPTION}: guest path {path!r} contains {name}")
    if not path.startswith("/"):
        raise UsageError(f"{OPTION}: guest path {path!r} is not absolute")
    parts = [p for p in path.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise UsageError(f"{OPTION}: guest path {path!r} has a '.' or '..' component",
                         hint="write the guest path out plainly")
    norm = "/" + "/".join(parts)
    if norm in GUEST_SYSTEM_DIRS or any(
            norm == d or norm.startswith(d + "/") for d in GUEST_PSEUDO_DIRS):
        raise UsageError(f"{OPTION}: guest path {norm!r} is a system directory of the guest",
                         hint="mount under another path, e.g. /mnt/NAME")
    return norm


def _covers(outer: str, inner: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def resolve_mounts(texts: Sequence[str], cwd: Path | None = None) -> tuple[Share, ...]:
    """Every ``--mount`` checked and resolved: the host directory exists (absolute, symlinks
    resolved), guest paths are usable and none is inside another; tags assigned in order."""
    if len(texts) > MAX_SHARES:
        raise UsageError(f"at most {MAX_SHARES} {OPTION} options",
                         hint="share one parent folder instead")
    shares: list[Share] = []
    for i, text in enumerate(texts):
        request = parse_mount(text)
        for ch, name in _FORBIDDEN_CHARS.items():
            if ch in request.host:
                raise UsageError(f"{OPTION}: host path {request.host!r} contains {name}")
        host = Path(request.host).expanduser()
        if not host.is_absolute():
            host = (cwd or Path.cwd()) / host
        if not host.is_dir():
            what = "is not a directory" if host.exists() else "does not exist"
            raise UsageError(f"{OPTION}: host directory {request.host!r} {what}")
        host = host.resolve()
        guest = check_guest_path(request.guest if request.guest is not None
                                 else posixpath.normpath(host.as_posix()))
        for other in shares:
            if _covers(other.guest, guest) or _covers(guest, other.guest):
                same = "is" if other.guest == guest else "overlaps"
                raise UsageError(f"{OPTION}: guest path {guest!r} {same} {other.guest!r} "
                                 f"(from {str(other.host)!r})",
                                 hint="give each share a guest path of its own")
        shares.append(Share(tag=f"{TAG_PREFIX}{i}", host=host, guest=guest,
                            readonly=request.readonly))
    return tuple(shares)


def share_args(shares: Sequence[Share]) -> list[str]:
    """QEMU's options for the shares: an fsdev and a virtio-9p device each (paths escaped)."""
    argv: list[str] = []
    for share in shares:
        fsdev: dict[str, str | bool | Path] = {
            "id": share.fsdev_id, "path": share.host, "security_model": SECURITY_MODEL}
        if share.readonly:
            fsdev["readonly"] = True  # QEMU refuses every write, whatever the guest mounts
        argv += ["-fsdev", option_string(FSDRIVER, fsdev),
                 "-device", option_string(DEVICE, {"fsdev": share.fsdev_id,
                                                   "mount_tag": share.tag})]
    return argv
