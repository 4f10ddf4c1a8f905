"""Barriers the VM directory keeps: private to its user, and shallow enough for its sockets."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from egpu.errors import VMError
from egpu.vm.store import MAX_SOCKET_PATH, VmDir

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


def test_socket_paths_too_long_for_sun_path_are_refused(tmp_path: Path) -> None:
    VmDir("short", root=tmp_path).check_socket_paths()
    deep = tmp_path / ("d" * MAX_SOCKET_PATH)
    with pytest.raises(VMError, match="too long for UNIX sockets"):
        VmDir("vm", root=deep).check_socket_paths()
