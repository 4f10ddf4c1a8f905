"""run --dry-run prints the exact command and starts or creates nothing."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from tests.conftest import Cli


@pytest.mark.parametrize("arch", ["aarch64", "x86_64"])
def test_dry_run_json_and_text_agree(cli: Cli, arch: str, tmp_path: Path) -> None:
    disk = tmp_path / "data.raw"
    disk.write_bytes(bytes(1 << 20))
    args = ("run", "--dry-run", "--arch", arch, "--accel", "tcg", "--cpus", "3",
            "--memory", "1G", "--name", "dr", "--disk", f"{disk}:ro", "--ssh-port", "2299",
            "--", "-device", "virtio-balloon-pci")
    argv = cli.json(*args)["argv"]
    text = cli(*args, check=True).stdout.strip()
    assert shlex.split(text) == argv
    joined = " ".join(argv)
    assert argv[argv.index("-m") + 1] == "1024M"
    assert argv[argv.index("-smp") + 1].startswith("3,")
    assert argv[argv.index("-accel") + 1].startswith("tcg")
    assert f"qemu-system-{arch}" in joined
    assert "hostfwd=tcp:127.0.0.1:2299-:22" in joined
    assert f"file={disk},format=raw,if=none,id=disk0,readonly=on" in argv
    assert argv[-2:] == ["-device", "virtio-balloon-pci"]
    assert "egpu.cpus=3 egpu.mem_mib=1024" in argv[argv.index("-append") + 1]
    assert not (cli.home / "data" / "vms" / "dr").exists()


def test_dry_run_needs_no_engine(cli: Cli, tmp_path: Path) -> None:
    env = {**cli.env, "EGPU_CACHE": str(tmp_path / "empty"), "PATH": "/usr/bin:/bin"}
    argv = Cli(env=env, home=cli.home).json("run", "--dry-run")["argv"]
    assert argv[0] == "/usr/bin/qemu-system-aarch64"
    assert not (tmp_path / "empty").exists()  # nothing was downloaded or built
