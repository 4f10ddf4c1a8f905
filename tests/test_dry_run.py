"""run --dry-run prints the exact command and starts or creates nothing."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from conftest import Cli


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


FIXTURES = Path(__file__).parent / "fixtures" / "host"


def test_dry_run_apple_from_a_registry_dump(cli: Cli) -> None:
    out = cli.json("run", "--dry-run", "--engine", "apple", "--memory", "14G", "--cpus", "8",
                   "--ioreg", str(FIXTURES / "ioreg-rtx-bound.plist"), "--passthrough", "auto")
    argv = out["argv"]
    assert out["gpu"]["engine"] == "apple"
    assert argv[argv.index("-accel") + 1] == "hvf,tso=on"
    assert argv[argv.index("-cpu") + 1] == "host"
    assert "memory-backend-ram,id=pc.ram,size=14336M,prealloc=on,share=off" in argv
    apple = [a for a in argv if a.startswith("vfio-apple-pci,")]
    assert apple and all("dma-companion=on,rombar=0" in a for a in apple)
    assert all(",addr=0x1e." in a for a in apple)
    pflash = [a for a in argv if a.startswith("if=pflash")]
    assert len(pflash) == 2 and "readonly=on" in pflash[0]
    assert pflash[1].endswith("/data/vms/default/efivars.fd")


def test_dry_run_apple_no_tso(cli: Cli) -> None:
    argv = cli.json("run", "--dry-run", "--engine", "apple", "--no-tso",
                    "--passthrough", "03:00.0")["argv"]
    assert argv[argv.index("-accel") + 1] == "hvf"
    assert "vfio-apple-pci,host=03:00.0,addr=0x1e.0,dma-companion=on,rombar=0" in " ".join(argv)


def test_dry_run_with_a_malformed_dump_is_one_line(cli: Cli) -> None:
    proc = cli("run", "--dry-run", "--engine", "apple",
               "--ioreg", str(FIXTURES / "ioreg-truncated.plist"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr  # a HostError
    assert len(proc.stderr.strip().splitlines()) == 1
