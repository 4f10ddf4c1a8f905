"""The guest agent end to end: one built-in guest under TCG, driven by egpu exec, cp, status
and stop through its virtio-serial channel (no network, no ssh)."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import SHARED_CACHE, Cli
from egpu.paths import CACHE_ENV, HOME_ENV

pytestmark = pytest.mark.qemu

NAME = "ga"
COPY_SIZE = 3 << 20
READY_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def vm() -> Iterator[Cli]:
    """One running VM for the whole module (each boot costs tens of seconds under TCG)."""
    home = Path(tempfile.mkdtemp(prefix="egpu-ga", dir="/tmp"))
    cli = Cli(env={**os.environ, HOME_ENV: str(home), CACHE_ENV: str(SHARED_CACHE)}, home=home)
    try:
        cli("run", "--name", NAME, "--accel", "tcg", "--detach", "--gpu", "none", check=True)
        cli.wait_for(NAME, lambda s: s["guest_ready"], timeout=READY_TIMEOUT_S)
        yield cli
    finally:
        cli("rm", "--force", NAME)
        shutil.rmtree(home, ignore_errors=True)


def test_agent_socket_is_private(vm: Cli) -> None:
    vmdir = vm.home / "data" / "vms" / NAME
    for sock in ("agent.sock", "qmp.sock", "console.sock"):
        mode = (vmdir / sock).stat().st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600, sock


def test_exec_prints_both_streams_and_passes_the_exit_code(vm: Cli) -> None:
    proc = vm("exec", NAME, "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert proc.returncode == 7
    assert proc.stdout == "out\n"
    assert proc.stderr == "err\n"
    ok = vm("exec", NAME, "--", "uname", "-s")
    assert (ok.returncode, ok.stdout) == (0, "Linux\n")


def test_exec_timeout_says_so_and_exits_non_zero(vm: Cli) -> None:
    proc = vm("exec", NAME, "--timeout", "2", "--", "sleep", "100")
    assert proc.returncode == 124
    assert "still running in the guest after 2 s" in proc.stderr
    # it was killed: no sleep is left in the guest
    left = vm("exec", NAME, "--", "sh", "-c", "ps | grep -c '[s]leep 100'")
    assert left.stdout.strip() == "0"


def test_exec_needs_a_command_and_a_vm(vm: Cli) -> None:
    assert vm("exec", NAME).returncode == 2
    missing = vm("exec", "nosuchvm", "--", "true")
    assert missing.returncode != 0 and "nosuchvm" in missing.stderr


def test_cp_in_and_out_keeps_every_byte(vm: Cli, tmp_path: Path) -> None:
    data = os.urandom(COPY_SIZE)
    src = tmp_path / "a:b"  # a local name with ':' in it (./a:b is parsed the same way)
    src.write_bytes(data)
    vm("cp", str(src), f"{NAME}:/tmp/copy.bin", check=True)
    listing = vm("exec", NAME, "--", "ls", "/tmp", check=True).stdout.split()
    assert "copy.bin" in listing and not any(".egpu-partial" in n for n in listing)
    in_guest = vm("exec", NAME, "--", "sha256sum", "/tmp/copy.bin", check=True).stdout
    assert in_guest.split()[0] == hashlib.sha256(data).hexdigest()
    back = tmp_path / "back"
    back.mkdir()
    vm("cp", f"{NAME}:/tmp/copy.bin", str(back), check=True)
    assert hashlib.sha256((back / "copy.bin").read_bytes()).digest() == \
        hashlib.sha256(data).digest()
    assert [p.name for p in back.iterdir()] == ["copy.bin"]


def test_cp_of_a_missing_guest_file_leaves_nothing(vm: Cli, tmp_path: Path) -> None:
    proc = vm("cp", f"{NAME}:/no/such/file", str(tmp_path / "out"))
    assert proc.returncode == 1 and "No such file" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_status_json_shows_the_agent(vm: Cli) -> None:
    facts = vm.status(NAME)["agent"]
    assert facts["answering"] is True
    assert "10.0.2.15" in facts["ip"]  # QEMU user networking's first guest address
    assert facts["kernel"].startswith("6.12.")
    assert facts["os"] == "egpu built-in guest (busybox)"


def test_stop_uses_the_agent_when_the_guest_ignores_acpi(vm: Cli) -> None:
    # the guest's power-button reader is gone: system_powerdown does nothing now
    vm("exec", NAME, "--", "killall", "acpid", check=True)
    gone = vm("exec", NAME, "--", "sh", "-c", "pidof acpid || echo none", check=True)
    assert gone.stdout.strip() == "none"
    vm("stop", NAME, "--timeout", "20", check=True, timeout=60)
    after = vm.status(NAME)
    assert after["state"] == "stopped"
    # the guest powered itself off (a SIGTERM would be recorded as signal 15)
    assert (after["exit"]["returncode"], after["exit"]["signal"]) == (0, None)
    assert after["agent"]["answering"] is False
    proc = vm("exec", NAME, "--", "true")
    assert proc.returncode == 1 and "needs it running" in proc.stderr
