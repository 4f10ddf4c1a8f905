"""Files replaced whole: written under a fresh name beside the target, renamed over it when done.

Readers never see half a file; two writers never share a temp file (``mkstemp`` is O_EXCL);
the rename stays on one filesystem. On any failure the temp file goes and the target is left
as it was.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def replacing(path: Path, *, mode: int | None = None) -> Iterator[BinaryIO]:
    """A new file to write, renamed over ``path`` when the block ends without an exception.

    The file is 0600 (``mkstemp``) unless ``mode`` is given. A check that must hold at the
    moment of the rename goes at the end of the block: raising there leaves ``path`` alone.
    """
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            yield f
        os.replace(name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise


def write_bytes(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Replace ``path`` with ``data`` whole (see :func:`replacing`)."""
    with replacing(path, mode=mode) as f:
        f.write(data)
