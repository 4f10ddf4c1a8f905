"""A small UEFI-bootable qcow2 built from the built-in guest, laid out like a real image's ESP.

The disk holds one FAT filesystem: systemd-boot from Debian as the removable-media loader
(``\\EFI\\BOOT\\BOOT<ARCH>.EFI``), a Boot Loader Specification entry that names the guest's
kernel, initramfs and console, and ``timeout 0`` so it boots straight away. The firmware finds
the loader by itself, as it finds GRUB on scottjg/qemu-vfio-apple's images: no shell, no
countdown.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from egpu import debpkg
from egpu.errors import VMError
from egpu.guest.assets import DEBIAN_ARCH, SUITES, GuestAssets
from egpu.paths import dirs
from egpu.vm import qmp

LOADER_PACKAGE = "systemd-boot-efi"
LOADER_FILES = {  # arch -> (file in the package, removable-media path on the ESP)
    "aarch64": ("systemd-bootaa64.efi", "EFI/BOOT/BOOTAA64.EFI"),
    "x86_64": ("systemd-bootx64.efi", "EFI/BOOT/BOOTX64.EFI"),
}
LOADER_CONF = "timeout 0\ndefault egpu.conf\n"
ENTRY = "title egpu built-in guest\nlinux /vmlinuz\ninitrd /initrd.gz\noptions console={console}\n"


def boot_loader(arch: str) -> Path:
    """Debian's systemd-boot EFI binary for ``arch``, fetched once into the cache (verified)."""
    name, _ = LOADER_FILES[arch]
    base = dirs().cache / "tests" / "systemd-boot"
    out = base / name
    if out.exists():
        return out
    base.mkdir(parents=True, exist_ok=True)
    debarch = DEBIAN_ARCH[arch]
    archive = debpkg.DebianArchive(base / "apt", SUITES, [debarch])
    archive.update(debpkg.find_mirror())
    debs = debpkg.download(archive.resolve_only([f"{LOADER_PACKAGE}:{debarch}"]), dirs().debs)
    with tempfile.TemporaryDirectory(dir=base) as tree:
        debpkg.extract(debs[0], Path(tree))
        found = next(Path(tree).rglob(name))
        partial = out.with_suffix(".partial")
        shutil.copyfile(found, partial)
        partial.rename(out)
    return out


def build_uefi_image(
    qemu_img: list[str], env: dict[str, str], guest: GuestAssets, out: Path
) -> Path:
    """A compressed qcow2 with one FAT filesystem: loader, its entry, kernel and initramfs.

    qemu-img's vvfat driver turns a directory into the FAT disk, so no extra tools are needed.
    """
    _, loader_path = LOADER_FILES[guest.arch]
    esp = out.parent / f"{out.stem}-esp"
    (esp / loader_path).parent.mkdir(parents=True)
    (esp / "loader/entries").mkdir(parents=True)
    shutil.copyfile(boot_loader(guest.arch), esp / loader_path)
    shutil.copyfile(guest.kernel, esp / "vmlinuz")
    shutil.copyfile(guest.initramfs, esp / "initrd.gz")
    (esp / "loader/loader.conf").write_text(LOADER_CONF)
    (esp / "loader/entries/egpu.conf").write_text(ENTRY.format(console=guest.console))
    subprocess.run(
        [*qemu_img, "convert", "-c", "-f", "vvfat", f"fat:16:{esp}", "-O", "qcow2", str(out)],
        check=True,
        capture_output=True,
        env={**os.environ, **env},
    )
    shutil.rmtree(esp)
    return out


def stuck_vm_report(qmp_socket: Path) -> str:
    """Where a VM that never got ready is: its run state and vCPU registers, for the failure.

    A firmware stall once seen only in CI left nothing but the serial log; the program counter
    tells firmware idle loops, guest code and a QEMU that stopped the vCPU apart.
    """
    try:
        status = qmp.execute(qmp_socket, "query-status")
        registers = qmp.execute(qmp_socket, "human-monitor-command",
                                {"command-line": "info registers"})
    except VMError as e:
        return f"QMP unavailable: {e}"
    head = "\n".join(str(registers).splitlines()[:6])
    return f"status {status}\n{head}"
