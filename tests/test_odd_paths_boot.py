"""A real boot where EGPU_HOME and a --disk path hold commas and '=': QEMU gets each as a path."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import SHARED_CACHE, Cli, _stop_leftovers
from egpu.paths import CACHE_ENV, HOME_ENV
from guest_helpers import shell_command

pytestmark = pytest.mark.qemu

GREETING = "hello-through-an-odd-path"


@pytest.fixture
def odd_cli() -> Iterator[Cli]:
    """A CLI whose EGPU_HOME reads as QEMU options if pasted unescaped (short: socket paths)."""
    home = Path(tempfile.mkdtemp(prefix="egpu,id=h", dir="/tmp"))
    yield Cli(env={**os.environ, HOME_ENV: str(home), CACHE_ENV: str(SHARED_CACHE)}, home=home)
    _stop_leftovers(home)
    shutil.rmtree(home, ignore_errors=True)


def test_home_and_disk_with_commas_boot_and_the_guest_reads_the_disk(
        odd_cli: Cli, tmp_path: Path) -> None:
    files = tmp_path / "files"
    files.mkdir()
    (files / "greeting").write_text(GREETING + "\n")
    disk = tmp_path / "x.img,readonly=on,file=y"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(files), str(disk), "16M"], check=True)
    proc = odd_cli("run", "--name", "odd", "--accel", "tcg", "--detach", "--gpu", "none",
                   "--disk", str(disk))
    assert proc.returncode == 0, proc.stderr
    status = odd_cli.wait_for("odd", lambda s: s["guest_ready"], timeout=120)
    assert str(odd_cli.home) in str(status["qmp_socket"])  # QMP answered at the odd path
    vm = odd_cli.home / "data" / "vms" / "odd"
    # ext4 comes in with the modules loaded after the ready marker
    shell_command(vm, b"until grep -qw ext4 /proc/filesystems; do sleep 0.2; done;"
                      b" mkdir -p /mnt && mount -t ext4 /dev/vda /mnt && cat /mnt/greeting\n",
                  GREETING)
    odd_cli("stop", "odd", "--force", check=True)
