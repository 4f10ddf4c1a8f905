"""Bad input: one line on stderr, a non-zero exit, and nothing left behind."""

from __future__ import annotations

import socket
import stat
import subprocess
from pathlib import Path

import pytest

from conftest import Cli, InProcessCli


@pytest.fixture
def cli(inproc: InProcessCli) -> Cli:
    """What these commands decide and print is tested in-process (quick; see InProcessCli)."""
    return inproc



def assert_clean_failure(
    cli: Cli, proc: subprocess.CompletedProcess[str], code: int, words: str
) -> None:
    assert proc.returncode == code, proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and words in err, err
    assert "Traceback" not in err
    vms = cli.home / "data" / "vms"
    # refused before any VM directory is made, and the name's lock is gone (the lock lives
    # beside the VM directories, so checks made while holding it may leave their parent)
    assert not vms.exists() or list(vms.iterdir()) == [], list(vms.iterdir())


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (("--arch", "riscv64"), 2, "unknown architecture 'riscv64'"),
        (("--memory", "lots"), 2, "bad memory size 'lots'"),
        (("--memory", "1.3M"), 2, "not a whole number of MiB"),
        (("--memory", "8"), 2, "out of range"),
        (("--cpus", "0"), 2, "--cpus must be at least 1"),
        (("--name", "../x"), 2, "bad VM name"),
        (("--disk", "/nonexistent/disk.img"), 2, "no such file"),
        (("--qemu", "/nonexistent/qemu-system-aarch64"), 2, "no such file"),
        (("--ssh-port", "70000"), 2, "not a TCP port number"),
        (("--nvme-size", "512K"), 2, "--nvme-size '512K' is out of range (at least 1M)"),
        (("--nvme-size", "big"), 2, "bad --nvme-size 'big'"),
    ],
)
def test_bad_run_input(cli: Cli, args: tuple[str, ...], code: int, words: str) -> None:
    assert_clean_failure(cli, cli("run", "--accel", "tcg", *args), code, words)


def test_disk_qemu_img_cannot_probe(cli: Cli, tmp_path: Path) -> None:
    bad = tmp_path / "broken.qcow2"
    # a qcow2 magic with a header qemu-img rejects (version 99)
    bad.write_bytes(b"QFI\xfb" + (99).to_bytes(4, "big") + bytes(504))
    before = bad.read_bytes()
    proc = cli("run", "--accel", "tcg", "--disk", str(bad))
    assert_clean_failure(cli, proc, 2, "qemu-img cannot probe it")
    assert bad.read_bytes() == before  # user disks are never touched


def test_ssh_port_in_use(cli: Cli) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = cli("run", "--accel", "tcg", "--ssh-port", str(port))
    assert_clean_failure(cli, proc, 1, f"port {port} on 127.0.0.1 is already in use")


def test_too_old_qemu_is_refused(cli: Cli, tmp_path: Path) -> None:
    fake = tmp_path / "qemu-system-aarch64"
    fake.write_text("#!/bin/sh\necho 'QEMU emulator version 7.2.0'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    proc = cli("run", "--accel", "tcg", "--qemu", str(fake))
    assert_clean_failure(cli, proc, 1, "egpu needs >= 10.1")


def test_no_usable_engine_without_provisioning(cli: Cli, tmp_path: Path) -> None:
    env = {**cli.env, "EGPU_CACHE": str(tmp_path / "empty-cache"), "PATH": "/usr/bin:/bin"}
    proc = Cli(env=env, home=cli.home)("engine")
    assert_clean_failure(cli, proc, 1, "no usable QEMU")


def test_json_without_dry_run_or_selftest(cli: Cli) -> None:
    assert_clean_failure(cli, cli("run", "--json"), 2, "--json goes with --dry-run")


def test_stop_negative_timeout(cli: Cli) -> None:
    proc = cli("stop", "x", "--timeout", "-1")
    assert proc.returncode == 2 and "positive number of seconds" in proc.stderr


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("run", "--gpuu", "x"), "No such option '--gpuu'"),
        (("run", "--cpus", "abc"), "'abc' is not a valid integer"),
        (("nosuch",), "No such command 'nosuch'"),
    ],
)
def test_click_usage_errors_are_one_line(cli: Cli, args: tuple[str, ...], words: str) -> None:
    proc = cli(*args)
    assert_clean_failure(cli, proc, 2, words)
    assert "--help')" in proc.stderr  # it says where to look
