"""A VM directory holds QMP and console sockets: it is private to its user, however it began."""

from __future__ import annotations

import stat
from pathlib import Path

from egpu.vm.store import VmDir

PRIVATE = 0o700
SHARED = 0o755


def test_vm_directory_is_private(tmp_path: Path) -> None:
    fresh = VmDir("fresh", root=tmp_path)
    fresh.create()
    assert stat.S_IMODE(fresh.path.stat().st_mode) == PRIVATE
    # a directory left world-readable (an older tool, a copy) is made private again
    old = VmDir("old", root=tmp_path)
    old.path.mkdir(mode=SHARED)
    old.path.chmod(SHARED)
    old.create()
    assert stat.S_IMODE(old.path.stat().st_mode) == PRIVATE
