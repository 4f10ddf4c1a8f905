"""Shared folders in a real guest: ``egpu run --mount`` under TCG, the built-in guest's own 9p
mounts, files crossing both ways, a read-only share refusing writes in the guest and in QEMU.

One VM for the module: three shares at once (a writable one whose host name holds a space and
a comma, mounted at its host path; a second writable one at a guest path of its own; a
read-only one).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import SHARED_CACHE, Cli, _stop_leftovers
from egpu.paths import CACHE_ENV, HOME_ENV
from guest_helpers import shell_command

pytestmark = pytest.mark.qemu

NAME = "shares"
READY_TIMEOUT_S = 180
ODD_NAME = "my models, v2"
RO_GUEST = "/mnt/ro"
SECOND_GUEST = "/srv/second"
RO_CONTENT = "read-only original\n"


@dataclass
class SharedVm:
    """The running VM and its three host folders."""

    cli: Cli
    vm: Path
    odd: Path  # rw, in the guest at the same path
    second: Path  # rw, at SECOND_GUEST
    ro: Path  # ro, at RO_GUEST

    steps: int = 0

    def sh(self, command: str, expect: str) -> None:
        shell_command(self.vm, command.encode() + b"\n", expect)

    def ok(self, command: str, *, fails: bool = False) -> None:
        """Run ``command`` in the guest and wait until it succeeded (or, ``fails``, failed).

        The token waited for is computed by the guest's shell, so the echo of the typed
        command never matches it, and each step's is new."""
        self.steps += 1
        token = f"step-{self.steps}-{'failed' if fails else 'ok'}"
        self.sh(f"{command} {'||' if fails else '&&'} echo step-$(({self.steps}+0))-"
                f"{'failed' if fails else 'ok'}", token)


@pytest.fixture(scope="module")
def shared_vm() -> Iterator[SharedVm]:
    # short: UNIX socket paths in the VM directory must stay short
    home = Path(tempfile.mkdtemp(prefix="egpu-m", dir="/tmp"))
    cli = Cli(env={**os.environ, HOME_ENV: str(home), CACHE_ENV: str(SHARED_CACHE)}, home=home)
    folders = home / "host"
    odd, second, ro = folders / ODD_NAME, folders / "second", folders / "ro"
    for d in (odd, second, ro):
        d.mkdir(parents=True)
    (odd / "from-host.txt").write_text("written on the host\n")
    (ro / "keep.txt").write_text(RO_CONTENT)
    try:
        proc = cli("run", "--name", NAME, "--accel", "tcg", "--detach", "--gpu", "none",
                   "--mount", str(odd), "--mount", f"{second}:{SECOND_GUEST}",
                   "--mount", f"{ro}:{RO_GUEST}:ro")
        assert proc.returncode == 0, proc.stderr
        cli.wait_for(NAME, lambda s: s["guest_ready"], timeout=READY_TIMEOUT_S)
        yield SharedVm(cli, home / "data" / "vms" / NAME, odd, second, ro)
        cli("stop", NAME, "--force")
    finally:
        _stop_leftovers(home)
        shutil.rmtree(home, ignore_errors=True)


def test_status_lists_the_mounts(shared_vm: SharedVm) -> None:
    mounts = shared_vm.cli.status(NAME)["mounts"]
    assert mounts == [
        {"tag": "egpu0", "host": str(shared_vm.odd), "guest": str(shared_vm.odd),
         "readonly": False},
        {"tag": "egpu1", "host": str(shared_vm.second), "guest": SECOND_GUEST, "readonly": False},
        {"tag": "egpu2", "host": str(shared_vm.ro), "guest": RO_GUEST, "readonly": True},
    ]
    log = (shared_vm.vm / "serial.log").read_text(errors="replace")
    # mounted before the ready marker, so a ready guest has its shares
    assert log.index(f"mounted share egpu0 at {shared_vm.odd} (rw)") \
        < log.index("EGPU-GUEST-READY")


def test_guest_reads_a_host_file_through_a_path_with_a_space_and_a_comma(
        shared_vm: SharedVm) -> None:
    # tr: what is waited for is the guest's output, not the typed command's echo
    shared_vm.sh(f"tr a-z A-Z < '{shared_vm.odd}/from-host.txt'", "WRITTEN ON THE HOST")


def test_host_reads_what_the_guest_wrote(shared_vm: SharedVm) -> None:
    for where, host in ((str(shared_vm.odd), shared_vm.odd),
                        (SECOND_GUEST, shared_vm.second)):
        shared_vm.ok(f"echo from-guest > '{where}/g.txt'")
        assert (host / "g.txt").read_text() == "from-guest\n"
        shared_vm.ok(f"rm '{where}/g.txt'")
        assert not (host / "g.txt").exists()


def test_read_only_share_refuses_writes(shared_vm: SharedVm) -> None:
    shared_vm.sh(f"tr a-z A-Z < {RO_GUEST}/keep.txt", "READ-ONLY ORIGINAL")
    shared_vm.sh(f"echo changed > {RO_GUEST}/keep.txt", "Read-only file system")
    shared_vm.sh(f"touch {RO_GUEST}/new.txt", f"{RO_GUEST}/new.txt: Read-only file system")
    # and QEMU itself refuses, even when the guest's mount is made writable
    shared_vm.ok(f"mount -o remount,rw {RO_GUEST}")
    shared_vm.ok(f"echo x > {RO_GUEST}/keep.txt", fails=True)
    shared_vm.ok(f"mount -o remount,ro {RO_GUEST}")
    assert (shared_vm.ro / "keep.txt").read_text() == RO_CONTENT
    assert sorted(p.name for p in shared_vm.ro.iterdir()) == ["keep.txt"]
