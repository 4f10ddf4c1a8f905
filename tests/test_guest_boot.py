"""The built-in guest boots for real under QEMU TCG: ready marker, self-test, power button."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from egpu.guest.assets import GuestAssets, ensure_guest
from egpu.guest.protocol import ARCHES, find_ready, parse_selftest
from guest_helpers import boot, shared_cache

pytestmark = pytest.mark.qemu
PROMPT = "/ # "
# the shell's prompt, then (busybox line editing) its query for the cursor position
AT_PROMPT = re.compile(re.escape(PROMPT) + r"(\x1b\[6n)?$")
POWERDOWN_TIMEOUT_S = 60  # far above the ~2.5 s it takes; only a hang gets near it
# a different shape per arch, so a check that passes by accident on defaults shows up
SHAPES = {"aarch64": (2, 384), "x86_64": (1, 640)}


def at_prompt(console: str) -> bool:
    """Whether the shell has finished its command and waits for the next one."""
    return AT_PROMPT.search(console) is not None


@pytest.fixture(scope="module", params=ARCHES)
def guest(request: pytest.FixtureRequest) -> GuestAssets:
    with shared_cache():
        return ensure_guest(request.param)


@pytest.fixture
def vmdir(egpu_home: Path) -> Path:
    # short path: QMP is a UNIX socket
    return egpu_home


def test_selftest_passes_with_the_configured_shape(guest: GuestAssets, vmdir: Path) -> None:
    cpus, mem = SHAPES[guest.arch]
    with boot(guest, vmdir, cpus=cpus, memory_mib=mem, selftest=True) as run:
        text = run.wait_console(parse_selftest)
        assert run.wait_exit() == 0  # it powers itself off
    assert find_ready(text)
    result = parse_selftest(text)
    assert result is not None, text
    assert result.ok, result.as_dict()
    by_name = {c.name: c for c in result.checks}
    assert {"pci", "memory", "cpus"} <= set(by_name)
    assert f"{cpus} CPUs" in by_name["cpus"].detail
    assert f"configured {mem} MiB" in by_name["memory"].detail


def test_selftest_fails_exactly_the_checks_whose_expectation_is_wrong(
        guest: GuestAssets, vmdir: Path) -> None:
    cpus, mem = SHAPES[guest.arch]
    with boot(guest, vmdir, cpus=cpus, memory_mib=mem, selftest=True,
              claim_cpus=cpus + 1, claim_memory_mib=mem * 2) as run:
        text = run.wait_console(parse_selftest)
        run.wait_exit()
    result = parse_selftest(text)
    assert result is not None and not result.ok and result.error is None
    verdicts = {c.name: c.ok for c in result.checks}
    assert verdicts == {"pci": True, "memory": False, "cpus": False}, result.as_dict()
    details = {c.name: c.detail for c in result.checks}
    assert f"expected {cpus + 1}" in details["cpus"]
    assert f"expected {mem * 2} MiB" in details["memory"]


def test_console_shell_devices_respawn_and_system_powerdown(
        guest: GuestAssets, vmdir: Path) -> None:
    # an ext4 filesystem as mkfs.ext4 makes it today (metadata_csum: needs crc32c in the guest)
    files = vmdir / "files"
    files.mkdir()
    (files / "greeting").write_text("hello-from-the-host\n")
    disk = vmdir / "disk.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(files), str(disk), "16M"], check=True)
    devices = ["-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0,romfile=",
               "-device", "virtio-rng-pci",
               "-drive", f"file={disk},format=raw,if=none,id=d0",
               "-device", "virtio-blk-pci,drive=d0"]
    with boot(guest, vmdir, selftest=False, extra=devices) as run:
        run.wait_console(find_ready)
        # an interactive shell on the console (arithmetic so the echo of the command differs)
        run.type("echo answer=$((6*7))\n")
        run.wait_console(lambda t: "answer=42" in t)
        # the virtio disk mounts as ext4 once the modules loaded after the marker are in
        run.type("until grep -qw ext4 /proc/filesystems; do sleep 0.2; done;"
                 " mkdir -p /mnt && mount -t ext4 /dev/vda /mnt && cat /mnt/greeting\n")
        run.wait_console(lambda t: "hello-from-the-host" in t)
        run.type("until grep -q '^vfio_pci .* Live' /proc/modules; do sleep 0.2; done;"
                 " echo late=$((1+1))\n")
        run.wait_console(lambda t: "late=2" in t)
        # the NIC got QEMU's user-network address by DHCP; the virtio RNG feeds the kernel
        run.type("until ip -4 addr show eth0 | grep -q inet; do sleep 0.2; done;"
                 " ip -4 addr show eth0; cat /sys/class/misc/hw_random/rng_current\n")
        run.wait_console(lambda t: "inet 10.0.2.15/24" in t and "virtio_rng.0" in t)
        # "exit" goes to a shell back at its prompt, so the next prompt can only be the new one's
        run.wait_console(at_prompt)
        mark = len(run.console)
        run.type("exit\n")
        # busybox init gives the console a new shell. Input typed while the old one is still
        # exiting is lost: the kernel hangs the tty up (flushing its input) as it ends.
        run.wait_console(lambda t: PROMPT in t[mark:])
        run.type("echo answer=$((7*8))\n")
        run.wait_console(lambda t: "answer=56" in t)
        run.qmp("system_powerdown")
        assert run.wait_exit(POWERDOWN_TIMEOUT_S) == 0
        text = run.console
    # busybox init ran its shutdown (the power button went through acpid), then the kernel
    # powered off. (init's last lines may be lost: the kernel stops before the tty drains.)
    assert "The system is going down" in text, text
    assert "reboot: Power down" in text, text
    assert parse_selftest(text) is None


def test_only_the_requested_checks_run_and_unknown_ones_fail(guest: GuestAssets,
                                                             vmdir: Path) -> None:
    with boot(guest, vmdir, selftest=True, checks=("cpus", "nosuch")) as run:
        text = run.wait_console(parse_selftest)
        run.wait_exit()
    result = parse_selftest(text)
    assert result is not None and not result.ok
    assert [(c.name, c.ok) for c in result.checks] == [("cpus", True), ("nosuch", False)]
