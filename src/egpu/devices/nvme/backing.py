"""The NVMe namespace's storage: a sparse file kept open, and whole-buffer writes to it."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from egpu.errors import DeviceServerError, UsageError

DEFAULT_LBA_SHIFT = 9


class NvmeBacking:
    """The namespace's storage: a (sparse) file of ``size`` bytes, kept open."""

    def __init__(self, path: Path, size: int | None, lba_shift: int = DEFAULT_LBA_SHIFT) -> None:
        block = 1 << lba_shift
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise DeviceServerError(f"cannot open NVMe backing file {path}: {e.strerror}") from e
        try:
            current = os.fstat(fd).st_size
            if size is None:
                size = current
            size -= size % block
            if size < block:
                raise UsageError(f"NVMe backing {path} is smaller than one {block}-byte block",
                                 hint="pass a size such as 1G")
            if current < size:
                os.ftruncate(fd, size)  # sparse: grows without writing, never shrinks user data
        except OSError as e:
            os.close(fd)
            raise DeviceServerError(f"cannot size NVMe backing file {path}: {e.strerror}") from e
        except BaseException:
            os.close(fd)
            raise
        self.path = path
        self.fd = fd
        self.size = size
        self.lba_shift = lba_shift
        self.blocks = size >> lba_shift

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def pwritev_all(fd: int, views: list[memoryview], offset: int) -> None:
    """Write every byte of ``views`` at ``offset``, resuming after short writes."""
    remaining = sum(map(len, views))
    while True:
        n = os.pwritev(fd, views, offset)
        if n == remaining:
            return  # the usual case: one call wrote the whole scatter list
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        offset += n
        remaining -= n
        i = 0
        while n >= len(views[i]):  # n < remaining: a view with bytes left exists
            n -= len(views[i])
            i += 1
        views = [views[i][n:], *views[i + 1:]]
