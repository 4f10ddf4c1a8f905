"""Per-VM qcow2 overlays on a cached base: argv builders (pure) and thin qemu-img calls.

The VM writes only to its overlay; the cached base stays read-only and shared. When the base a
reference points at changes (a newer pull), the overlay is rebased onto it with a safe
``qemu-img rebase``, which keeps what the guest wrote. qemu-img comes from the engine: callers
pass its argv prefix and environment (``Engine.qemu_img()``, ``Engine.env()``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from egpu.errors import ImageError
from egpu.images.qcow2 import read_backing_file
from egpu.process import run_tool

QCOW2 = "qcow2"
# Formats a base may have: what the images are (qcow2) and what users often have (raw).
BASE_FORMATS = (QCOW2, "raw")
QEMU_IMG_TIMEOUT = 600.0
MAX_INFO_OUTPUT = 1024 * 1024


def create_argv(
    qemu_img: Sequence[str], base: Path, overlay: Path, base_format: str = QCOW2
) -> list[str]:
    """``qemu-img create`` of a qcow2 overlay backed by ``base`` (same virtual size)."""
    fmt = _format(base_format)
    return [*qemu_img, "create", "-q", "-f", QCOW2, "-F", fmt, "-b", str(base), str(overlay)]


def rebase_argv(
    qemu_img: Sequence[str],
    new_base: Path,
    overlay: Path,
    *,
    base_format: str = QCOW2,
    unsafe: bool = False,
) -> list[str]:
    """``qemu-img rebase`` of an overlay onto ``new_base`` (safe mode compares old and new)."""
    fmt = _format(base_format)
    argv = [*qemu_img, "rebase", "-q", "-f", QCOW2, "-F", fmt, "-b", str(new_base)]
    if unsafe:
        argv.append("-u")
    return [*argv, str(overlay)]


def _format(fmt: str) -> str:
    if fmt not in BASE_FORMATS:
        raise ImageError(f"a base image must be qcow2 or raw, not {fmt}")
    return fmt


def info_argv(qemu_img: Sequence[str], path: Path) -> list[str]:
    """``qemu-img info`` as JSON; ``-U`` so it also reads an image a running VM holds."""
    return [*qemu_img, "info", "-U", "--output=json", str(path)]


@dataclass(frozen=True)
class DiskInfo:
    """What qemu-img says about one image."""

    format: str
    virtual_size: int
    backing_file: str | None

    @classmethod
    def from_json(cls, text: str) -> DiskInfo:
        """Parse ``qemu-img info --output=json``; ImageError when it is not that."""
        try:
            doc = json.loads(text[:MAX_INFO_OUTPUT])
            fmt, size = doc["format"], doc["virtual-size"]
        except (ValueError, KeyError, TypeError):
            raise ImageError("qemu-img info gave unexpected output") from None
        backing = doc.get("full-backing-filename") or doc.get("backing-filename")
        if not isinstance(fmt, str) or not isinstance(size, int):
            raise ImageError("qemu-img info gave unexpected output")
        return cls(fmt, size, backing if isinstance(backing, str) else None)


def _run(argv: Sequence[str], env: Mapping[str, str] | None, what: str) -> str:
    return run_tool(argv, lambda why: ImageError(f"{what}: {why}"), timeout=QEMU_IMG_TIMEOUT,
                    env=env)


def disk_info(
    qemu_img: Sequence[str], path: Path, env: Mapping[str, str] | None = None
) -> DiskInfo:
    """Probe an image with qemu-img (also how a ``--disk`` or ``--base`` is checked)."""
    return DiskInfo.from_json(_run(info_argv(qemu_img, path), env, f"cannot probe {path}"))


def create_overlay(
    qemu_img: Sequence[str],
    base: Path,
    overlay: Path,
    env: Mapping[str, str] | None = None,
    base_format: str = QCOW2,
) -> Path:
    """Create ``overlay`` on ``base``; built under a temporary name, renamed when complete."""
    base = base.absolute()
    overlay.parent.mkdir(parents=True, exist_ok=True)
    tmp = overlay.with_name(f".{overlay.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        argv = create_argv(qemu_img, base, tmp, base_format)
        _run(argv, env, f"cannot create overlay {overlay}")
        os.replace(tmp, overlay)
    finally:
        tmp.unlink(missing_ok=True)
    return overlay


def rebase_overlay(
    qemu_img: Sequence[str],
    new_base: Path,
    overlay: Path,
    env: Mapping[str, str] | None = None,
    base_format: str = QCOW2,
) -> None:
    """Point ``overlay`` at ``new_base``, keeping the guest's writes (safe rebase).

    Safe mode reads the old base to compute what differs, so it must still exist; egpu's
    prune never deletes a base an overlay uses, so it does.
    """
    old = read_backing_file(overlay)
    if old is not None and not old.exists():
        raise ImageError(
            f"cannot rebase {overlay}: its old base {old} is gone",
            hint="reset the VM to start over from the new image",
        )
    argv = rebase_argv(qemu_img, new_base.absolute(), overlay, base_format=base_format)
    _run(argv, env, f"cannot rebase {overlay}")


def ensure_overlay(
    qemu_img: Sequence[str],
    base: Path,
    overlay: Path,
    env: Mapping[str, str] | None = None,
    base_format: str = QCOW2,
) -> str:
    """The overlay for a VM on ``base``: create it, rebase it, or keep it; says which it did."""
    if not overlay.exists():
        create_overlay(qemu_img, base, overlay, env, base_format)
        return "created"
    current = read_backing_file(overlay)
    if current is not None and os.path.realpath(current) == os.path.realpath(base):
        return "kept"
    rebase_overlay(qemu_img, base, overlay, env, base_format)
    return "rebased"
