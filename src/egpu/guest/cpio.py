"""A writer (and a small reader, for checking) of newc cpio archives, the Linux initramfs format.

Format: the kernel's Documentation/driver-api/early-userspace/buffer-format.rst and cpio(5)
"New ASCII Format". Each member is a 110-byte header of ASCII hex fields (magic "070701"),
then the NUL-terminated name, padded to 4 bytes, then the data, padded to 4 bytes. The archive
ends with a member named "TRAILER!!!". Pure: values in, bytes out.
"""

from __future__ import annotations

import gzip
import stat
from collections.abc import Iterable
from dataclasses import dataclass

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
ALIGN = 4
HEADER_SIZE = 110
# the 13 fields after the magic, each 8 hex digits
_FIELDS = ("ino", "mode", "uid", "gid", "nlink", "mtime", "filesize",
           "devmajor", "devminor", "rdevmajor", "rdevminor", "namesize", "check")
_FIELD_WIDTH = 8
_MAX_FIELD = 0xFFFFFFFF
# gzip level: 6 is within a few percent of 9 in size and several times faster to write
GZIP_LEVEL = 6


@dataclass(frozen=True)
class Entry:
    """One archive member: ``mode`` includes the file type bits (S_IFREG, S_IFDIR, ...)."""

    name: str
    mode: int
    data: bytes = b""
    rdev_major: int = 0
    rdev_minor: int = 0
    uid: int = 0
    gid: int = 0
    mtime: int = 0


def directory(name: str, perm: int = 0o755) -> Entry:
    """A directory member."""
    return Entry(name, stat.S_IFDIR | perm)


def regular(name: str, data: bytes, perm: int = 0o644) -> Entry:
    """A regular file member."""
    return Entry(name, stat.S_IFREG | perm, data)


def symlink(name: str, target: str) -> Entry:
    """A symbolic link member; the target is stored as the data, as cpio does."""
    return Entry(name, stat.S_IFLNK | 0o777, target.encode())


def char_device(name: str, major: int, minor: int, perm: int = 0o600) -> Entry:
    """A character device node member."""
    return Entry(name, stat.S_IFCHR | perm, rdev_major=major, rdev_minor=minor)


def _pad(n: int) -> bytes:
    return b"\0" * (-n % ALIGN)


def _header(ino: int, e: Entry, namesize: int) -> bytes:
    values = (ino, e.mode, e.uid, e.gid, 2 if stat.S_ISDIR(e.mode) else 1, e.mtime,
              len(e.data), 0, 0, e.rdev_major, e.rdev_minor, namesize, 0)
    for field, v in zip(_FIELDS, values, strict=True):
        if not 0 <= v <= _MAX_FIELD:
            raise ValueError(f"cpio field {field}={v} of {e.name!r} out of range")
    return MAGIC + b"".join(b"%08X" % v for v in values)


def archive(entries: Iterable[Entry]) -> bytes:
    """Serialise entries (parents before children) followed by the trailer."""
    out = bytearray()
    for ino, e in enumerate([*entries, Entry(TRAILER, 0)], start=1):
        name = e.name.lstrip("/").encode() + b"\0"
        if name == b"\0" or b"\0" in name[:-1]:
            raise ValueError(f"bad cpio member name {e.name!r}")
        out += _header(0 if e.name == TRAILER else ino, e, len(name))
        out += name + _pad(HEADER_SIZE + len(name))
        out += e.data + _pad(len(e.data))
    return bytes(out)


def gzip_archive(entries: Iterable[Entry]) -> bytes:
    """The archive, gzip-compressed, with a fixed header time so builds are reproducible."""
    return gzip.compress(archive(entries), compresslevel=GZIP_LEVEL, mtime=0)


def parse(blob: bytes) -> list[Entry]:
    """Read back a newc archive (without the trailer); raises ValueError on malformed input."""
    out: list[Entry] = []
    pos = 0
    while True:
        if pos + HEADER_SIZE > len(blob):
            raise ValueError("truncated cpio header")
        head = blob[pos:pos + HEADER_SIZE]
        if head[:len(MAGIC)] != MAGIC:
            raise ValueError(f"bad cpio magic at offset {pos}")
        raw = head[len(MAGIC):]
        try:
            f = {k: int(raw[i * _FIELD_WIDTH:(i + 1) * _FIELD_WIDTH], 16)
                 for i, k in enumerate(_FIELDS)}
        except ValueError:
            raise ValueError(f"bad cpio header field at offset {pos}") from None
        name_end = pos + HEADER_SIZE + f["namesize"]
        data_start = name_end + (-(HEADER_SIZE + f["namesize"]) % ALIGN)
        data_end = data_start + f["filesize"]
        if f["namesize"] < 1 or data_end > len(blob):
            raise ValueError(f"cpio member at offset {pos} runs past the end")
        raw_name = blob[pos + HEADER_SIZE:name_end]
        if raw_name[-1:] != b"\0":
            raise ValueError(f"cpio name at offset {pos} is not NUL-terminated")
        name = raw_name[:-1].decode()
        if name == TRAILER:
            return out
        out.append(Entry(name, f["mode"], blob[data_start:data_end], f["rdevmajor"],
                         f["rdevminor"], f["uid"], f["gid"], f["mtime"]))
        pos = data_end + (-f["filesize"] % ALIGN)
