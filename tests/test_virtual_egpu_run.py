"""`egpu run` with the virtual eGPU: device servers started, watched and stopped with the VM."""

from __future__ import annotations

import json
import os
import signal
import stat
import time
from pathlib import Path

import psutil
import pytest
from PIL import Image

from conftest import Cli
from egpu.devices.display import is_blank
from guest_helpers import shell_command

pytestmark = pytest.mark.qemu


@pytest.mark.parametrize("arch", ["aarch64", "x86_64"])
def test_self_test_with_the_virtual_egpu(cli: Cli, arch: str) -> None:
    proc = cli("run", "--self-test", "--json", "--arch", arch, "--accel", "tcg",
               "--passthrough", "virtual", "--nvme-size", "64M", timeout=400)
    result = json.loads(proc.stdout)
    checks = {c["name"]: c for c in result["checks"]}
    assert set(checks) >= {"pci", "memory", "cpus", "nvme", "display", "screenshot"}, checks
    assert result["ok"] is True and proc.returncode == 0, result
    assert "read back identical" in checks["nvme"]["detail"]
    vm = cli.home / "data" / "vms" / "selftest"
    # the servers stopped with the VM and are reported as such
    status = cli.status("selftest")
    assert status["state"] == "stopped"
    assert {s["name"] for s in status["servers"]} == {"display", "nvme"}
    for server in status["servers"]:
        assert server["returncode"] is not None and not Path(f"/proc/{server['pid']}").exists()
    assert (vm / "egpu-nvme.img").stat().st_size == 64 << 20


def test_running_vm_servers_screenshot_and_server_crash(cli: Cli, tmp_path: Path) -> None:
    assert cli("run", "--name", "card", "--accel", "tcg", "--detach", "--passthrough",
               "virtual", "--nvme-size", "64M").returncode == 0
    status = cli.wait_for("card", lambda s: s["guest_ready"], timeout=120)
    servers = {s["name"]: s for s in status["servers"]}
    assert set(servers) == {"display", "nvme"}
    for s in servers.values():
        assert s["returncode"] is None and Path(f"/proc/{s['pid']}").exists()
        sock = Path(s["socket"])
        assert sock.is_socket() and stat.S_IMODE(sock.stat().st_mode) == 0o600
        assert sock.parent.stat().st_mode & 0o777 == 0o700

    # type into the guest's serial shell: draw a line on its framebuffer console
    shell_command(cli.home / "data" / "vms" / "card",
                  b"echo egpu-was-here > /dev/tty1; echo TYPED-$((6*7))\n", "TYPED-42")
    shot = tmp_path / "screen.png"
    deadline = time.monotonic() + 30
    while True:
        cli("screenshot", "card", "-o", str(shot), check=True)
        with Image.open(shot) as image:
            assert image.size == (1024, 768)
            if not is_blank(image):
                break
        assert time.monotonic() < deadline, "the guest's text never reached the screen"
        time.sleep(0.5)

    # a device server dies under the running guest: reported, never hidden; VM stopped
    os.kill(int(servers["nvme"]["pid"]), signal.SIGKILL)
    final = cli.wait_for("card", lambda s: s["state"] in ("stopped", "crashed"), timeout=60)
    assert final["state"] == "crashed"
    assert any("device server nvme" in p for p in final["problems"]), final["problems"]
    assert not Path(f"/proc/{servers['display']['pid']}").exists()
    assert not Path(f"/proc/{status['pid']}").exists()


def test_stop_stops_the_servers(cli: Cli) -> None:
    assert cli("run", "--name", "st2", "--accel", "tcg", "--detach", "--passthrough",
               "virtual", "--nvme-size", "64M").returncode == 0
    status = cli.wait_for("st2", lambda s: s["guest_ready"], timeout=120)
    pids = [int(s["pid"]) for s in status["servers"]]
    cli("stop", "st2", check=True)
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{p}").exists() for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(Path(f"/proc/{p}").exists() for p in pids)
    assert cli.status("st2")["state"] == "stopped"


def test_dry_run_shows_the_card(cli: Cli) -> None:
    out = cli.json("run", "--dry-run", "--passthrough", "virtual")
    argv = out["argv"]
    assert out["gpu"]["path"] == "user"
    assert "memory-backend-memfd,id=pc.ram,size=512M,share=on" in argv
    devices = [json.loads(a) for a in argv if a.startswith('{"driver":"vfio-user-pci"')]
    assert [d["addr"] for d in devices] == ["0x10.0", "0x10.1"]
    assert devices[0]["multifunction"] is True and "multifunction" not in devices[1]
    assert "egpu.checks=pci,memory,cpus,nvme,display" in argv[argv.index("-append") + 1]


def test_screenshot_of_vm_without_display(cli: Cli) -> None:
    assert cli("run", "--name", "plain", "--accel", "tcg", "--detach",
               "--gpu", "none").returncode == 0
    proc = cli("screenshot", "plain", "-o", "/tmp/never.png")
    assert proc.returncode == 2 and "has no display" in proc.stderr
    cli("stop", "plain", "--force", check=True)


def running(pid: int) -> bool:
    """Alive and not a zombie (orphans here go to an init that may not reap them)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_stop_after_the_supervisor_died(cli: Cli) -> None:
    assert cli("run", "--name", "lost", "--accel", "tcg", "--detach", "--passthrough",
               "virtual", "--nvme-size", "64M").returncode == 0
    status = cli.wait_for("lost", lambda s: s["guest_ready"], timeout=120)
    vm = cli.home / "data" / "vms" / "lost"
    os.kill(int((vm / "supervisor.pid").read_text().split()[0]), signal.SIGKILL)
    # QEMU and the servers outlive their supervisor: the VM still runs and can be stopped
    assert cli.status("lost")["state"] == "running"
    cli("stop", "lost", check=True)
    final = cli.status("lost")
    assert final["state"] == "stopped"
    pids = [int(status["pid"]), *(int(s["pid"]) for s in status["servers"])]
    assert not any(running(p) for p in pids)


def test_stop_while_the_guest_does_io(cli: Cli) -> None:
    assert cli("run", "--name", "busy", "--accel", "tcg", "--detach", "--passthrough",
               "virtual", "--nvme-size", "64M").returncode == 0
    status = cli.wait_for("busy", lambda s: s["guest_ready"], timeout=120)
    vm = cli.home / "data" / "vms" / "busy"
    # endless direct I/O through the NVMe function, started from the guest's console shell
    shell_command(vm, b"while true; do dd if=/dev/urandom of=/dev/nvme0n1 bs=64k count=256 "
                      b"oflag=direct 2>/dev/null; dd if=/dev/nvme0n1 of=/dev/null bs=1M "
                      b"iflag=direct 2>/dev/null; echo IO-ROUND-$((1+1)); done &\n", "IO-ROUND-2")
    deadline = time.monotonic() + 60
    while (vm / "serial.log").read_text(errors="replace").count("IO-ROUND-2") < 3:
        assert time.monotonic() < deadline, "the guest's I/O loop never completed a round"
        time.sleep(0.3)
    cli("stop", "busy", "--timeout", "30", check=True)
    final = cli.status("busy")
    assert final["state"] == "stopped", final
    # the servers were told to stop (SIGTERM: exit 0), neither crashed under load
    assert [s["returncode"] for s in final["servers"]] == [0, 0], final["servers"]
    for server in status["servers"]:
        assert "Traceback" not in Path(server["log"]).read_text(errors="replace")
