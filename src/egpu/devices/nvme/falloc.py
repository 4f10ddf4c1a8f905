"""fallocate(2) through ctypes: punch holes so deallocated ranges read as zeros, stay sparse."""

from __future__ import annotations

import ctypes
import sys

_FALLOC_FL_KEEP_SIZE = 0x01  # linux/falloc.h
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc: ctypes.CDLL | None = None


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate a range of a file (it then reads as zeros); False when unsupported."""
    global _libc
    if sys.platform != "linux":
        return False
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fallocate = _libc.fallocate
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fallocate.restype = ctypes.c_int
    result: int = fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
    return result == 0
