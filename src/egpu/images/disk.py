"""A full image's boot disk for ``egpu run --image REF`` / ``--base PATH``: the vm layer's entry.

``plan_boot_disk`` decides (no writes; dry runs use it), ``prepare_boot_disk`` makes it real:
the base is the cached qcow2 of REF (pulled when missing) or the user's own image, and the VM
writes only to its overlay, which is created, kept or rebased onto the base.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from egpu.errors import ImageError, NotFoundError, UsageError
from egpu.images.overlay import BASE_FORMATS, QCOW2, disk_info, ensure_overlay
from egpu.images.pull import pull, resolve_cached
from egpu.images.reference import parse_reference
from egpu.images.store import ImageStore
from egpu.progress import Progress


@dataclass(frozen=True)
class BootDisk:
    """Where a VM's system disk comes from and where it writes."""

    base: Path
    base_format: str
    overlay: Path
    ref: str | None = None  # the image reference, when the base is a cached image
    cached: bool = True  # False: the image reference must be pulled first

    @property
    def source(self) -> str:
        """What the user named: the image reference, or the base path (record it with the VM)."""
        return self.ref if self.ref is not None else str(self.base)


def plan_boot_disk(
    overlay: Path,
    *,
    image: str | None = None,
    base: str | None = None,
    store: ImageStore | None = None,
) -> BootDisk:
    """Which base a VM boots from, checked without network or writes (exactly one source)."""
    if (image is None) == (base is None):
        raise UsageError("give either --image REF or --base PATH")
    if base is not None:
        path = Path(base).expanduser().absolute()
        if not path.is_file():
            raise NotFoundError(f"--base {base}: no such file")
        return BootDisk(path, QCOW2, overlay)
    assert image is not None
    ref = str(parse_reference(image))
    cached = resolve_cached(ref, store)
    if cached is None:
        # Not pulled yet: the path it will have is only known after the pull.
        return BootDisk(Path(f"<{ref} after pull>"), QCOW2, overlay, ref, cached=False)
    return BootDisk(cached, QCOW2, overlay, ref)


def prepare_boot_disk(
    plan: BootDisk,
    qemu_img: Sequence[str],
    env: Mapping[str, str] | None = None,
    *,
    progress: Progress | None = None,
    store: ImageStore | None = None,
    previous_source: str | None = None,
) -> tuple[BootDisk, str]:
    """Pull the image if needed, probe the base, and create/keep/rebase the overlay.

    ``previous_source`` is the ``source`` the VM's overlay was made from (from its recorded
    config): an existing overlay is only rebased onto newer builds of the same image, never
    onto another image. Returns the final BootDisk and what was done to the overlay
    ("created", "kept", "rebased").
    """
    if plan.overlay.exists() and previous_source not in (None, plan.source):
        raise ImageError(
            f"this VM's disk was made from {previous_source}, not {plan.source}",
            hint=f"to start over from the new image: egpu reset {plan.overlay.parent.name}",
        )
    if plan.ref is not None and not plan.cached:
        pulled = pull(plan.ref, store=store, progress=progress)
        plan = BootDisk(pulled.path, QCOW2, plan.overlay, plan.ref)
    info = disk_info(qemu_img, plan.base, env)
    if info.format not in BASE_FORMATS:
        raise ImageError(f"{plan.base} is a {info.format} image; a base must be qcow2 or raw")
    plan = BootDisk(plan.base, info.format, plan.overlay, plan.ref)
    action = ensure_overlay(qemu_img, plan.base, plan.overlay, env, info.format)
    return plan, action
