"""The VM lifecycle end to end: real QEMU (TCG) booting the real built-in guest."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from conftest import Cli

pytestmark = pytest.mark.qemu

ARCHES = ("aarch64", "x86_64")


def boot(cli: Cli, name: str, arch: str = "aarch64", *extra: str) -> dict[str, object]:
    # the plain lifecycle, without a GPU (the virtual eGPU has tests of its own)
    proc = cli("run", "--name", name, "--arch", arch, "--accel", "tcg", "--detach",
               "--gpu", "none", *extra)
    assert proc.returncode == 0, proc.stderr
    return cli.wait_for(name, lambda s: s["guest_ready"], timeout=90)


def vm_dir(cli: Cli, name: str) -> Path:
    return cli.home / "data" / "vms" / name


@pytest.mark.parametrize("arch", ARCHES)
def test_boot_status_list_logs_stop(cli: Cli, arch: str) -> None:
    status = boot(cli, "vm1", arch, "--cpus", "2", "--memory", "384M")
    assert status["state"] == "running"
    assert status["arch"] == arch
    assert isinstance(status["pid"], int) and Path(f"/proc/{status['pid']}").exists()
    assert Path(str(status["qmp_socket"])).is_socket()
    assert status["memory_mib"] == 384 and status["cpus"] == 2
    assert status["gpu_path"] == "none" and "QEMU" in str(status["qemu"])
    # the VM directory and its sockets are private
    assert vm_dir(cli, "vm1").stat().st_mode & 0o777 == 0o700

    listed = cli.json("list")
    assert [v["name"] for v in listed] == ["vm1"] and listed[0]["state"] == "running"

    logs = cli("logs", "vm1", check=True).stdout
    assert "EGPU-GUEST-READY" in logs

    stopped = cli("stop", "vm1", "--timeout", "30", check=True)
    assert "stopped" in stopped.stderr
    after = cli.status("vm1")
    assert after["state"] == "stopped" and after["pid"] is None
    assert not Path(f"/proc/{status['pid']}").exists()
    # a clean stop was the guest powering off, not a signal
    assert (after["exit"]["returncode"], after["exit"]["signal"]) == (0, None)
    assert after["exit"]["stop_requested"] is True


def test_same_name_twice_is_refused(cli: Cli) -> None:
    boot(cli, "dup")
    second = cli("run", "--name", "dup", "--accel", "tcg", "--detach", "--gpu", "none")
    assert second.returncode == 1
    assert "already running" in second.stderr and len(second.stderr.strip().splitlines()) == 1
    cli("stop", "dup", "--force", check=True)


def test_killed_qemu_reads_as_crashed_and_run_restarts(cli: Cli) -> None:
    status = boot(cli, "crashy")
    os.kill(int(str(status["pid"])), signal.SIGKILL)
    crashed = cli.wait_for("crashy", lambda s: s["state"] == "crashed", timeout=20)
    assert crashed["exit"]["signal"] == signal.SIGKILL
    assert "signal 9" in " ".join(crashed["problems"])
    again = boot(cli, "crashy")
    assert again["state"] == "running" and again["pid"] != status["pid"]
    cli("stop", "crashy", "--force", check=True)
    forced = cli.status("crashy")
    assert forced["state"] == "stopped"
    # --force skips the power button: SIGTERM, which QEMU catches and exits 0 on
    assert (forced["exit"]["returncode"], forced["exit"]["signal"]) == (0, signal.SIGTERM)


def test_cli_killed_while_attached_then_stop_from_new_cli(cli: Cli) -> None:
    attached = cli.popen("run", "--name", "orphan", "--accel", "tcg", "--gpu", "none",
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        cli.wait_for("orphan", lambda s: s["guest_ready"], timeout=90)
    finally:
        attached.kill()
        attached.wait()
    assert cli.status("orphan")["state"] == "running"
    cli("stop", "orphan", check=True)
    final = cli.status("orphan")
    assert final["state"] == "stopped"


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_in_attached_mode_shuts_down_cleanly(cli: Cli) -> None:
    # A runner started in the background hands SIGINT down ignored; a user's terminal does not.
    attached = cli.popen("run", "--name", "att", "--accel", "tcg", "--gpu", "none",
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, preexec_fn=_default_sigint)
    cli.wait_for("att", lambda s: s["guest_ready"], timeout=90)
    attached.send_signal(signal.SIGINT)
    out, err = attached.communicate(timeout=60)
    assert attached.returncode == 0, err
    assert b"EGPU-GUEST-READY" in out  # attached mode showed the console
    final = cli.status("att")
    assert final["state"] == "stopped"
    assert final["exit"]["returncode"] == 0  # powered off by the guest, not killed


def test_guest_poweroff_reads_as_stopped(cli: Cli) -> None:
    result = cli("run", "--self-test", "--name", "st", "--accel", "tcg", "--json",
                 "--gpu", "none", timeout=300)
    assert '"checks"' in result.stdout, result.stderr  # the guest ran its checks and powered off
    final = cli.status("st")
    assert final["state"] == "stopped" and final["exit"]["returncode"] == 0


def test_ssh_port_forward_is_loopback_only(cli: Cli) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    boot(cli, "fwd", "aarch64", "--ssh-port", str(port))
    listeners = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True,
                               text=True, check=True).stdout
    assert f"127.0.0.1:{port}" in listeners
    assert f"0.0.0.0:{port}" not in listeners and f"*:{port}" not in listeners
    cli("stop", "fwd", "--force", check=True)


def test_stop_and_status_of_unknown_vm_fail(cli: Cli) -> None:
    for args in (("status", "nosuch"), ("stop", "nosuch"), ("logs", "nosuch")):
        proc = cli(*args)
        assert proc.returncode == 1
        assert "no VM named 'nosuch'" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_stop_escalates_when_guest_ignores_powerdown(cli: Cli) -> None:
    # a 10 ms timeout gives the guest no time to answer the power button: SIGTERM must follow
    # (0 is refused: a timeout is positive)
    status = boot(cli, "stubborn")
    proc = cli("stop", "stubborn", "--timeout", "0.01")
    assert proc.returncode == 0, proc.stderr
    final = cli.status("stubborn")
    assert final["state"] == "stopped" and final["exit"]["stop_requested"] is True
    assert final["exit"]["signal"] == signal.SIGTERM
    assert not Path(f"/proc/{status['pid']}").exists()
