"""UEFI firmware for full images: find the engine's edk2 code + vars template, copy vars per VM.

UEFI boots through two pflash drives: the firmware code (read-only, shared) and a writable
variable store, which must be each VM's own copy (boot entries live there). Debian ships the
pairs below (qemu-efi-aarch64: AAVMF, ovmf: OVMF); QEMU's own tree names them edk2-*.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from egpu.errors import ImageError

# (code, vars template) file names per guest architecture, preferred first. Secure-boot
# variants are left out: the images are not signed for it.
FIRMWARE_NAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "aarch64": (
        ("AAVMF_CODE.no-secboot.fd", "AAVMF_VARS.fd"),
        ("AAVMF_CODE.fd", "AAVMF_VARS.fd"),
        ("edk2-aarch64-code.fd", "edk2-arm-vars.fd"),
    ),
    "x86_64": (
        ("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd"),
        ("OVMF_CODE.fd", "OVMF_VARS.fd"),
        ("edk2-x86_64-code.fd", "edk2-i386-vars.fd"),
    ),
}


@dataclass(frozen=True)
class UefiFirmware:
    """A firmware code image and the pristine variable store that goes with it."""

    code: Path
    vars_template: Path


def find_firmware(search_dirs: Iterable[Path], arch: str) -> UefiFirmware:
    """The first known code + vars pair present in ``search_dirs`` (e.g. Engine.firmware_dirs())."""
    names = FIRMWARE_NAMES.get(arch)
    if names is None:
        raise ImageError(f"no UEFI firmware is known for {arch}")
    dirs = list(search_dirs)
    for code_name, vars_name in names:
        for d in dirs:
            code, template = d / code_name, d / vars_name
            if code.is_file() and template.is_file():
                return UefiFirmware(code, template)
    where = ", ".join(str(d) for d in dirs) or "nowhere"
    raise ImageError(f"no UEFI firmware for {arch} in {where}")


def ensure_vars(firmware: UefiFirmware, dest: Path) -> Path:
    """The VM's own writable vars file: copied from the template once, then kept."""
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    try:
        shutil.copyfile(firmware.vars_template, tmp)
        os.chmod(tmp, 0o600)
        os.replace(tmp, dest)
    except OSError as e:
        raise ImageError(f"cannot create UEFI vars {dest}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def reset_disk_state(vm_dir: Path, names: Iterable[str]) -> list[Path]:
    """Delete a VM's overlay and EFI vars (the given file names in its directory)."""
    removed = []
    for name in names:
        path = vm_dir / name
        if path.exists():
            path.unlink()
            removed.append(path)
    return removed
