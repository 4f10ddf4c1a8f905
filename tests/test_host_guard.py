"""The Mac's safety rules: the guest-driver refusal (pure) and the power assertion the
supervisor holds while QEMU runs (a real supervisor with stand-in QEMU and caffeinate)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from egpu.engine.safety import (
    PID_PLACEHOLDER,
    GuestDrivers,
    HostGuard,
    guest_driver_problem,
    host_guard,
)
from egpu.host.address import PciAddress
from egpu.host.device import PciDevice
from egpu.vm import store

SUPERVISOR_WAIT_S = 60


def gpu(vendor: int = 0x10DE, class_code: int = 0x030000) -> PciDevice:
    return PciDevice(address=PciAddress(0, 1, 0, 0), vendor_id=vendor, device_id=0x2B85,
                     class_code=class_code, name="display", driver="VFIOUserPCIDriver",
                     passthrough_ready=True, root="pcic1-bridge")


@pytest.mark.parametrize(("guest", "fails"), [
    (GuestDrivers("the built-in guest", builtin=True), "built-in guest has no NVIDIA"),
    (GuestDrivers("base disk /x.qcow2"), "cannot tell whether base disk"),
    (GuestDrivers("image a", features=()), "image a has no NVIDIA"),
    (GuestDrivers("image a", features=("cuda",)), "its features: cuda"),
    (GuestDrivers("image a", features=("docker",)), None),
    (GuestDrivers("image a", features=("desktop", "fex")), None),
    (GuestDrivers("image a", features=("nvidia",)), None),
])
def test_guest_driver_rule(guest: GuestDrivers, fails: str | None) -> None:
    problem = guest_driver_problem([gpu()], guest)
    if fails is None:
        assert problem is None
    else:
        assert problem is not None and fails in problem


def test_guest_driver_rule_per_vendor_and_only_for_gpus() -> None:
    amd = gpu(vendor=0x1002)
    assert guest_driver_problem([amd], GuestDrivers("image a", features=("docker",)))
    assert guest_driver_problem([amd], GuestDrivers("image a", features=("amdgpu",))) is None
    usb = gpu(class_code=0x0C0330)
    assert guest_driver_problem([usb], GuestDrivers("g", builtin=True)) is None
    assert guest_driver_problem([], GuestDrivers("g", builtin=True)) is None


def test_host_guard_plan() -> None:
    assert host_guard([]) is None
    g = host_guard([gpu()])
    assert g is not None and g.assertion_argv(77) == ["caffeinate", "-i", "-w", "77"]
    assert HostGuard.from_json(g.to_json()) == g
    off = host_guard([gpu()], allow_sleep=True)
    assert off is not None and off.power_assertion == () and off.qos == "user-interactive"
    assert HostGuard.from_json({"power_assertion": [1]}) is None
    assert HostGuard.from_json(None) is None


# Stand-ins: "QEMU" runs until the assertion has recorded itself (a condition, not a sleep);
# the "caffeinate" records the pid it was given, then waits for that pid to exit as -w does.
FAKE_QEMU = """
import os, sys, time
marker = sys.argv[1]
deadline = time.monotonic() + 60
while not os.path.exists(marker) and time.monotonic() < deadline:
    time.sleep(0.01)
sys.exit(0 if os.path.exists(marker) else 3)
"""
FAKE_CAFFEINATE = """
import os, sys, time
marker, pid = sys.argv[1], int(sys.argv[2])
with open(marker + ".tmp", "w") as f:
    f.write(f"{pid} {os.getpid()}")
os.replace(marker + ".tmp", marker)
deadline = time.monotonic() + 60
while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
    time.sleep(0.01)
"""


def test_supervisor_holds_the_assertion_while_qemu_runs(tmp_path: Path) -> None:
    vm = store.VmDir("guarded", root=tmp_path)
    vm.create()
    marker = tmp_path / "assertion"
    guard = HostGuard((sys.executable, "-c", FAKE_CAFFEINATE, str(marker), PID_PLACEHOLDER))
    vm.write_config(store.VmConfig(
        name="guarded", arch="aarch64", cpus=1, memory_mib=64, accel="hvf",
        gpu_path="apple", qemu="test", qemu_version="10.2.50",
        argv=[sys.executable, "-c", FAKE_QEMU, str(marker)], host_guard=guard.to_json(),
    ))
    proc = subprocess.run([sys.executable, "-m", "egpu.vm.supervisor", str(vm.path)],
                          capture_output=True, text=True, timeout=SUPERVISOR_WAIT_S)
    assert proc.returncode == 0, proc.stderr
    exit_record = vm.read_json(store.EXIT_RECORD)
    assert exit_record is not None and exit_record["returncode"] == 0  # QEMU saw the assertion
    qemu, assertion = vm.read_process(store.QEMU_PID), vm.read_process(store.POWER_ASSERTION_PID)
    assert qemu is not None and assertion is not None
    qemu_pid = qemu.pid
    watched, assertion_pid = (int(x) for x in marker.read_text().split())
    assert watched == qemu_pid
    assert assertion.pid == assertion_pid
    assert not assertion.alive()  # released once QEMU ended


def test_supervisor_without_a_guard_starts_no_assertion(tmp_path: Path) -> None:
    vm = store.VmDir("plain", root=tmp_path)
    vm.create()
    vm.write_config(store.VmConfig(
        name="plain", arch="aarch64", cpus=1, memory_mib=64, accel="tcg",
        gpu_path="none", qemu="test",
        qemu_version="11.1.0", argv=[sys.executable, "-c", "pass"],
        host_guard=HostGuard(power_assertion=()).to_json(),
    ))
    proc = subprocess.run([sys.executable, "-m", "egpu.vm.supervisor", str(vm.path)],
                          capture_output=True, text=True, timeout=SUPERVISOR_WAIT_S)
    assert proc.returncode == 0, proc.stderr
    assert not vm.file(store.POWER_ASSERTION_PID).exists()
