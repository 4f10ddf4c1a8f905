"""The few qcow2 header fields egpu reads: magic, version, backing file name (pure, bounds-checked).

Layout from QEMU's docs/interop/qcow2.rst: big-endian, bytes 0-3 magic ``QFI\\xfb``, 4-7 version
(2 or 3), 8-15 backing_file_offset, 16-19 backing_file_size (QEMU caps it at 1023), 24-31 size.
An overlay names its base there, which is how egpu tells which cached image a VM uses.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from egpu.errors import ImageError

QCOW2_MAGIC = b"QFI\xfb"
SUPPORTED_VERSIONS = (2, 3)
# magic, version, backing_file_offset, backing_file_size, cluster_bits, size
HEADER = struct.Struct(">4sIQIIQ")
MAX_BACKING_NAME = 1023  # QEMU's own limit
# The backing name lives in the first cluster; the largest cluster is 2 MiB.
MAX_BACKING_OFFSET = 2 * 1024 * 1024


@dataclass(frozen=True)
class Qcow2Header:
    """The parsed start of a qcow2 header."""

    version: int
    backing_offset: int
    backing_size: int
    virtual_size: int

    @classmethod
    def unpack(cls, data: bytes) -> Qcow2Header:
        """Parse the header's first bytes; ImageError when it is not a qcow2 egpu can read."""
        if len(data) < HEADER.size:
            raise ImageError("not a qcow2 image: file too short")
        magic, version, offset, size, _cluster_bits, virtual_size = HEADER.unpack_from(data)
        if magic != QCOW2_MAGIC:
            raise ImageError("not a qcow2 image: bad magic")
        if version not in SUPPORTED_VERSIONS:
            raise ImageError(f"unsupported qcow2 version {version}")
        if offset == 0 or size == 0:
            offset, size = 0, 0
        elif size > MAX_BACKING_NAME or offset < HEADER.size or offset > MAX_BACKING_OFFSET:
            raise ImageError("qcow2 backing file name out of bounds")
        return cls(version, offset, size, virtual_size)


def backing_name(data: bytes) -> str | None:
    """The backing file name recorded in a qcow2 header, or None; ``data`` starts at offset 0."""
    header = Qcow2Header.unpack(data)
    if header.backing_size == 0:
        return None
    end = header.backing_offset + header.backing_size
    if end > len(data):
        raise ImageError("qcow2 backing file name lies past the end of the data")
    raw = data[header.backing_offset : end]
    try:
        name = raw.decode()
    except UnicodeDecodeError:
        raise ImageError("qcow2 backing file name is not UTF-8") from None
    if "\0" in name:
        raise ImageError("qcow2 backing file name contains NUL")
    return name


def read_backing_file(path: Path) -> Path | None:
    """The absolute backing file of a qcow2 file (relative names are relative to its directory)."""
    with open(path, "rb") as f:
        header = Qcow2Header.unpack(f.read(HEADER.size))
        f.seek(0)
        data = f.read(header.backing_offset + header.backing_size or HEADER.size)
    name = backing_name(data)
    if name is None:
        return None
    if "://" in name or name.startswith(("json:", "nbd:")):
        return None  # a protocol, not a file egpu manages
    return Path(os.path.normpath(path.parent / name))


def is_qcow2(path: Path) -> bool:
    """Whether a file starts like a qcow2 image egpu can read."""
    try:
        with open(path, "rb") as f:
            Qcow2Header.unpack(f.read(HEADER.size))
    except (OSError, ImageError):
        return False
    return True
