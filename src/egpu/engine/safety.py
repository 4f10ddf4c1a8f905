"""Keep a Mac safe while a real GPU is passed to a VM (pure: values in, values out).

Two reports from users of scottjg/qemu-vfio-apple's launcher (its issue tracker) shape this:

- booting with the eGPU attached before the guest has its GPU driver "is very likely to kernel
  panic macOS": so egpu refuses to pass a real GPU to a guest that cannot drive it, unless the
  user forces it;
- host sleep under a running GPU can wedge the machine, and App Nap throttles a background
  QEMU: so while the VM runs egpu holds a power assertion (``caffeinate -i -w QEMU_PID``, which
  ends by itself when QEMU does) and starts QEMU at the user-interactive QoS class.

The VM layer applies the HostGuard (egpu.vm.supervisor); ``run --dry-run --json`` shows it.
"""

from __future__ import annotations

import ctypes
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from egpu.host.device import PciDevice

NVIDIA_VENDOR = 0x10DE
AMD_VENDOR = 0x1002
# Image features that mean the vendor's driver is installed. egpu's own images are built
# `--with nvidia`; scottjg/qemu-vfio-apple's docker and desktop profiles install
# nvidia-driver-NNN-open (its image-builder), so those features count for NVIDIA too.
DRIVER_FEATURES: dict[int, frozenset[str]] = {
    NVIDIA_VENDOR: frozenset({"nvidia", "docker", "desktop"}),
    AMD_VENDOR: frozenset({"amdgpu"}),
}
VENDOR_NAMES = {NVIDIA_VENDOR: "NVIDIA", AMD_VENDOR: "AMD"}
PANIC_RISK = ("booting with an eGPU attached before the guest has its GPU driver is reported "
              "to kernel panic macOS")

PID_PLACEHOLDER = "{qemu_pid}"
# caffeinate(8): -i holds an assertion against idle sleep; -w PID releases it when PID exits.
POWER_ASSERTION = ("caffeinate", "-i", "-w", PID_PLACEHOLDER)
QOS_USER_INTERACTIVE = "user-interactive"
QOS_CLASS_USER_INTERACTIVE = 0x21  # <sys/qos.h> QOS_CLASS_USER_INTERACTIVE


@dataclass(frozen=True)
class GuestDrivers:
    """What is known about the guest that would receive the GPU."""

    label: str  # "the built-in guest", "image REF", "base disk PATH"
    builtin: bool = False
    features: tuple[str, ...] | None = None  # an image's manifest features; None: unknown


def guest_driver_problem(functions: Sequence[PciDevice], guest: GuestDrivers) -> str | None:
    """Why this guest cannot drive these GPUs (None: it can, or no GPU goes)."""
    gpus = [d for d in functions if d.is_display]
    if not gpus:
        return None
    for d in gpus:
        vendor = VENDOR_NAMES.get(d.vendor_id, f"vendor {d.vendor_id:04x}")
        if guest.builtin:
            return f"{guest.label} has no {vendor} GPU driver"
        if guest.features is None:
            return f"egpu cannot tell whether {guest.label} has a {vendor} GPU driver"
        wanted = DRIVER_FEATURES.get(d.vendor_id)
        if wanted is None:
            return f"egpu knows no guest driver feature for {vendor} ({d.address.bdf})"
        if not wanted & set(guest.features):
            have = ", ".join(guest.features) or "none"
            return (f"{guest.label} has no {vendor} GPU driver (its features: {have}; "
                    f"wanted one of: {', '.join(sorted(wanted))})")
    return None


@dataclass(frozen=True)
class HostGuard:
    """What keeps the host awake and QEMU unthrottled while a passed-through GPU runs."""

    power_assertion: tuple[str, ...] = POWER_ASSERTION  # argv, with PID_PLACEHOLDER
    qos: str | None = QOS_USER_INTERACTIVE

    def assertion_argv(self, qemu_pid: int) -> list[str]:
        """The power-assertion command for a running QEMU."""
        return [a.replace(PID_PLACEHOLDER, str(qemu_pid)) for a in self.power_assertion]

    def to_json(self) -> dict[str, object]:
        return {"power_assertion": list(self.power_assertion), "qos": self.qos}

    @classmethod
    def from_json(cls, doc: object) -> HostGuard | None:
        """Rebuild a recorded guard; None when there is none or it is malformed."""
        if not isinstance(doc, dict):
            return None
        argv, qos = doc.get("power_assertion"), doc.get("qos")
        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
            return None
        return cls(tuple(argv), qos if isinstance(qos, str) else None)


def host_guard(functions: Sequence[PciDevice], *, allow_sleep: bool = False) -> HostGuard | None:
    """The guard a run with these passed functions needs (None: no GPU, or ``allow_sleep``)."""
    if not functions:
        return None
    if allow_sleep:
        return HostGuard(power_assertion=())
    return HostGuard()


def qos_preexec(guard: HostGuard | None) -> Callable[[], None] | None:
    """A ``preexec_fn`` that puts the child at the guard's QoS class (macOS only, else None)."""
    # Set on the thread that then execs QEMU, as Foundation's Process does through
    # posix_spawnattr_set_qos_class_np. Unverified: no Mac reaches this project.
    if guard is None or guard.qos != QOS_USER_INTERACTIVE or platform.system() != "Darwin":
        return None

    def apply() -> None:
        libc = ctypes.CDLL(None)
        libc.pthread_set_qos_class_self_np(ctypes.c_uint(QOS_CLASS_USER_INTERACTIVE),
                                           ctypes.c_int(0))

    return apply
