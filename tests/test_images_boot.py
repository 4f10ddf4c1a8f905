"""A full image end to end: build a small UEFI-bootable qcow2 from the built-in guest, push it
to the loopback registry, pull it, give a VM an overlay and its own EFI vars, and boot it with
egpu's own QEMU command through the engine's UEFI firmware under TCG until the guest prints its
ready marker."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

import pytest

from egpu.engine.argv import Disk, Firmware, VmSpec, build_argv
from egpu.engine.qemu import Engine, find_engine
from egpu.guest.assets import GuestAssets, ensure_guest
from egpu.guest.protocol import READY_MARKER
from egpu.images.disk import plan_boot_disk, prepare_boot_disk
from egpu.images.firmware import ensure_vars, find_firmware
from egpu.paths import dirs
from egpu.vm import store as vm_store
from registry_server import Registry, egpu, engine_tool, home, push_reference_image, registry
from uefi_image import build_uefi_image, stuck_vm_report

__all__ = ["home", "registry"]  # fixtures, imported so pytest sees them

ARCH = "aarch64"
# Firmware start, systemd-boot, then the guest: about 7 s on these machines.
BOOT_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def engine() -> Engine:
    return find_engine()


@pytest.fixture(scope="module")
def guest() -> GuestAssets:
    return ensure_guest(ARCH)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory, guest: GuestAssets) -> bytes:
    qemu_img, env = engine_tool("qemu-img")
    out = tmp_path_factory.mktemp("uefi") / "guest.qcow2"
    return build_uefi_image(qemu_img, env, guest, out).read_bytes()


@pytest.mark.qemu
def test_pulled_image_boots_with_uefi(
    home: Path, registry: Registry, engine: Engine, image: bytes
) -> None:
    pushed = push_reference_image(
        registry.host, "egpu/guest", "docker-latest", image, file_name="egpu-guest.qcow2"
    )
    assert egpu("pull", "--quiet", pushed.ref).returncode == 0
    vm = vm_store.VmDir("full")
    vm.path.mkdir(parents=True)
    disk, action = prepare_boot_disk(
        plan_boot_disk(vm.file(vm_store.OVERLAY), image=pushed.ref), engine.qemu_img(), engine.env()
    )
    assert action == "created"
    firmware = find_firmware(engine.firmware_dirs(), ARCH)
    efivars = ensure_vars(firmware, vm.file(vm_store.EFI_VARS))
    serial = vm.serial_log
    spec = VmSpec(
        name="full", arch=ARCH, cpus=1, memory_mib=512, accel="tcg",
        qmp_socket=vm.qmp_socket, console_socket=vm.console_socket, serial_log=serial,
        firmware=Firmware(firmware.code, efivars), boot_disk=Disk(disk.overlay, "qcow2"),
    )
    qemu = subprocess.Popen(
        build_argv(engine.qemu(ARCH), spec), env={**os.environ, **engine.env()},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while READY_MARKER.encode() not in (serial.read_bytes() if serial.exists() else b""):
            assert qemu.poll() is None, qemu.stderr.read() if qemu.stderr else ""
            assert time.monotonic() < deadline, (
                f"{serial.read_bytes()[-2000:]!r}\n{stuck_vm_report(vm.qmp_socket)}")
            time.sleep(0.5)
    finally:
        qemu.kill()
        qemu.wait()
    log = serial.read_text(errors="replace")
    assert "virtio_blk" in log  # the kernel saw its boot disk
    # The firmware wrote its variables to the VM's own copy, never to the template...
    assert efivars.read_bytes() != firmware.vars_template.read_bytes()
    # ...and the cached base is exactly what was pulled: the VM wrote only to its overlay.
    assert hashlib.sha256(disk.base.read_bytes()).hexdigest() == pushed.disk_digest.split(":")[1]
    assert disk.base.parent == dirs().images / "blobs" / "sha256"
