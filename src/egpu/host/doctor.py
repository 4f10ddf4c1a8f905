"""``egpu doctor``: pure checks over HostFacts, each ok / warn / fail with a one-sentence fix.

A ``fail`` blocks passthrough (the CLI exits non-zero); a ``warn`` is worth knowing. Facts come
from egpu.host.facts (the I/O edge) or, in tests, are built directly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from egpu.host.device import DEXT_NAME, VFIO_PCI_DRIVER, PciDevice
from egpu.host.facts import HostFacts

Status = Literal["ok", "warn", "fail"]
GIB = 1 << 30
# Leave the host this share of its RAM: macOS and QEMU itself need room, and hvf wires guest RAM.
GUEST_MEMORY_WARN_SHARE = 0.75
# A PCIe link at 16 GT/s or more on a Thunderbolt-tunnelled bridge means a Thunderbolt 5
# (USB4 v2, PCIe 4.0 tunnelling) controller; TB3/TB4 enclosure bridges top out at 8 GT/s.
TB5_BRIDGE_MIN_GTS = 16.0
APPLE_DEVICE = "vfio-apple-pci"
APPLE_HOST_ROOT = "host-root"
LINUX_DEVICE = "vfio-pci"
APPROVE_PATH = "System Settings > General > Login Items & Extensions > Driver Extensions"


@dataclass(frozen=True)
class Check:
    """One doctor line."""

    name: str
    status: Status
    message: str
    fix: str | None = None

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "status": self.status, "message": self.message, "fix": self.fix}


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def _label(d: PciDevice) -> str:
    return f"{d.address.bdf} {d.name} ({d.vendor_id:04x}:{d.device_id:04x})"


def _gpus(f: HostFacts) -> list[PciDevice]:
    return [d for d in f.devices if d.is_display]


def check_os(f: HostFacts) -> Check:
    arch = f.machine.lower()
    if f.platform == "macos":
        if arch in ("arm64", "aarch64"):
            return Check("os-cpu", "ok", f"{f.system} on Apple Silicon ({f.machine})")
        if f.from_dump and arch == "unknown":
            return Check("os-cpu", "ok", f"{f.system}; the dumped host's CPU is not recorded")
        return Check(
            "os-cpu", "fail", f"{f.system} on {f.machine}",
            "The GPU path apple needs an Apple Silicon Mac (M1 or later).",
        )
    if f.platform == "linux":
        if arch in ("x86_64", "amd64", "aarch64", "arm64"):
            return Check("os-cpu", "ok", f"{f.system} on {f.machine}")
        if f.from_dump and arch == "unknown":
            return Check("os-cpu", "ok", f"{f.system}; the dumped host's CPU is not recorded")
        return Check("os-cpu", "warn", f"{f.system} on {f.machine}",
                     "egpu is tested on x86_64 and aarch64 Linux hosts only.")
    return Check("os-cpu", "fail", f"{f.system} on {f.machine}",
                 "Run egpu on an Apple Silicon Mac or a Linux host.")


def check_engine(f: HostFacts) -> Check:
    need = APPLE_DEVICE if f.platform == "macos" else LINUX_DEVICE
    e = f.engine
    if e is None:
        return Check("engine", "warn", "engine not checked")
    # An engine found here says nothing about the dumped host's: never fail on its account.
    bad: Status = "warn" if f.from_dump else "fail"
    if not e.found:
        fix = (
            "Install a QEMU that has vfio-apple-pci (scottjg/qemu-vfio-apple's build) and pass "
            "--qemu PATH."
            if f.platform == "macos"
            else "Run `egpu engine` to provision the private QEMU, or pass --qemu PATH."
        )
        return Check("engine", bad, f"no usable QEMU: {e.error or 'none found'}", fix)
    has = ", ".join(e.devices) or "no passthrough device"
    text = f"QEMU {e.version} ({e.source}) with {has}"
    if need in e.devices:
        return Check("engine", "ok", text)
    fix = (
        "Use a QEMU built with the vfio-apple-pci device (pass --qemu PATH)."
        if f.platform == "macos"
        else "Use a QEMU built with VFIO support (Debian's qemu-system packages have it)."
    )
    return Check("engine", bad, f"{text}; {need} is missing", fix)


def check_accelerator(f: HostFacts) -> Check:
    need = "hvf" if f.platform == "macos" else "kvm"
    e = f.engine
    if e is None or not e.found:
        return Check("accelerator", "warn", f"{need} not checked (no engine)")
    if need in e.accelerators:
        return Check("accelerator", "ok", f"{need} available")
    if f.from_dump:
        return Check("accelerator", "warn", f"{need} not available here (checked this host, "
                     "not the dumped one)")
    fix = (
        "Run on macOS 15 or later on Apple Silicon, outside another VM."
        if f.platform == "macos"
        else "Enable virtualization in firmware and give your user /dev/kvm (group kvm)."
    )
    return Check("accelerator", "fail", f"{need} is not available", fix)


def check_dext(f: HostFacts) -> Check:
    s = f.dext
    if s is None:
        return Check("driver-extension", "warn", "DriverKit extension state not known",
                     "Pass --systemextensions FILE with the output of `systemextensionsctl list`.")
    label = f"{s.bundle_id or DEXT_NAME} {s.version or ''}".strip()
    expected = f.dext_bundle_id
    if s.state == "enabled" and expected and s.bundle_id and s.bundle_id != expected:
        return Check("driver-extension", "warn",
                     f"{label} is enabled, but the host app names its extension {expected}",
                     "Activate the extension of the app whose QEMU egpu uses, or set "
                     "EGPU_DEXT_BUNDLE_ID to the one that is enabled.")
    if s.state == "enabled":
        return Check("driver-extension", "ok", f"{label} is activated and enabled")
    if s.state == "waiting":
        return Check("driver-extension", "fail", f"{label} is waiting for user approval",
                     f"Approve it in {APPROVE_PATH}, then replug the enclosure.")
    if s.state == "uninstalling":
        return Check("driver-extension", "fail", f"{label} is being uninstalled ({s.detail})",
                     "Reboot to finish the uninstall, then activate the extension again.")
    if s.state == "inactive":
        return Check("driver-extension", "fail",
                     f"{label} is installed but not active ({s.detail})",
                     "Open the host app and activate its driver extension again.")
    return Check("driver-extension", "fail",
                 f"the {DEXT_NAME} DriverKit extension ({expected or 'bundle id unknown'}) is "
                 "not installed",
                 "Install the host app (qemu-vfio-apple) and activate its driver extension.")


def check_engine_candidates(f: HostFacts) -> Check:
    """Every QEMU looked at, whether it has vfio-apple-pci, and which of its options."""
    e = f.engine
    if e is None or not e.candidates:
        return Check("engine-candidates", "ok", "no other QEMU looked at")
    parts = []
    for c in e.candidates:
        what = f"QEMU {c.version}" if c.version else "does not run"
        if c.apple_properties is not None:
            has = f"{APPLE_DEVICE} ({', '.join(c.apple_properties) or 'no options'})"
        else:
            has = f"no {APPLE_DEVICE}"
        parts.append(f"{'*' if c.chosen else '-'}{c.source} {c.path}: {what}, {has}")
    chosen = next((c for c in e.candidates if c.chosen), None)
    text = "; ".join(parts)
    if chosen is not None and chosen.apple_properties is not None:
        missing = [p for p in (APPLE_HOST_ROOT,) if p not in chosen.apple_properties]
        roots = {d.root for d in _gpus(f) if d.root and d.passthrough_ready}
        if missing and len(roots) > 1:
            return Check("engine-candidates", "warn", text,
                         f"This build has no {APPLE_HOST_ROOT}: it cannot tell eGPUs on different "
                         "root ports apart. Update the qemu-vfio-apple host app.")
    return Check("engine-candidates", "ok", text)


def check_root_ports(f: HostFacts) -> Check:
    """Which root port each eGPU hangs off (Apple Silicon reuses bus numbers per port)."""
    gpus = [d for d in _gpus(f) if d.passthrough_ready or d.thunderbolt]
    if not gpus:
        return Check("root-ports", "ok", "no eGPU to place")
    text = "; ".join(f"{d.root or '?'}: {_label(d)}" for d in gpus)
    known = [d for d in gpus if d.root]
    if len(known) < len(gpus):
        addresses = [d.address.bdf for d in gpus]
        if len(set(addresses)) < len(addresses):
            return Check("root-ports", "fail", text,
                         "Save the dump with `ioreg -a -l -r -c IOPCIDevice` so egpu sees the "
                         "root ports of cards that share an address.")
    return Check("root-ports", "ok", text)


def check_guest_driver(f: HostFacts) -> Check:
    """The rule `egpu run` applies: never a real GPU to a guest that cannot drive it."""
    g = f.guest
    if g is None:
        return Check("guest-driver", "ok", "guest not checked")
    if g.problem is None:
        return Check("guest-driver", "ok", f"{g.label} can drive the eGPU")
    return Check("guest-driver", "warn", f"{g.problem}: `egpu run` refuses to pass the GPU",
                 "Booting a guest without the GPU driver is reported to panic macOS; use "
                 "--image with an NVIDIA-driver image (docker/desktop, or built --with nvidia).")


def check_gpu(f: HostFacts) -> Check:
    gpus = _gpus(f)
    ready = [d for d in gpus if d.passthrough_ready]
    if ready:
        how = f"bound to {DEXT_NAME}" if f.platform == "macos" else f"bound to {VFIO_PCI_DRIVER}"
        return Check("egpu", "ok", f"{_label(ready[0])} is {how}")
    if f.platform == "linux":
        rebind = [d for d in gpus if d.rebindable]
        if rebind:
            d = rebind[0]
            return Check("egpu", "warn", f"{_label(d)} is bound to {d.driver or 'no driver'}",
                         "Pass --bind to `egpu run` to rebind it to vfio-pci while the VM runs.")
    if gpus:
        d = gpus[0]
        fix = (
            "Add the card's vendor:device ids to the extension's match list, then replug."
            if f.platform == "macos"
            else "Fix what the reason names (IOMMU, group, BARs), then run doctor again."
        )
        return Check("egpu", "fail", f"{_label(d)} cannot be passed through: {d.why_not}", fix)
    fix = (
        "Connect and power the enclosure, and authorize it when macOS asks."
        if f.platform == "macos"
        else "Connect the GPU (authorize a Thunderbolt enclosure with `boltctl`), or use "
        "--passthrough virtual."
    )
    return Check("egpu", "fail", "no display-class PCI device found", fix)


def check_thunderbolt5(f: HostFacts) -> Check:
    tb5: list[str] = []
    for d in f.devices:
        link = d.link
        fast = link is not None and (link.max_speed_gts or 0) >= TB5_BRIDGE_MIN_GTS
        if d.thunderbolt and d.is_bridge and fast:
            tb5.append(f"bridge {d.address.bdf} ({d.vendor_id:04x}:{d.device_id:04x})")
    tb5 += [t.device_name or t.name for t in f.thunderbolt if t.is_tb5]
    if tb5:
        # Users of scottjg/qemu-vfio-apple report Thunderbolt 5 enclosures falling off the bus
        # with Apple Silicon, while TB3/TB4 ones work (the project's issues; the blog post
        # "RTX 5090 + M4 MacBook Air: Can it Game?" used a TB4 one).
        return Check("thunderbolt5", "warn", f"Thunderbolt 5 enclosure: {', '.join(tb5)}",
                     "Thunderbolt 5 enclosures are reported not to work; use a TB3 or TB4 one.")
    unauthorized = [t.device_name or t.name for t in f.thunderbolt if t.authorized is False]
    if unauthorized:
        return Check("thunderbolt5", "warn",
                     f"Thunderbolt device not authorized: {', '.join(unauthorized)}",
                     "Authorize it with `boltctl authorize` so its PCIe tunnel opens.")
    return Check("thunderbolt5", "ok", "no Thunderbolt 5 enclosure")


def check_bars(f: HostFacts) -> Check:
    hit = [d for d in f.devices if d.unassigned_bars and not d.is_bridge]
    if not hit:
        return Check("bars", "ok", "every BAR has an address")
    d = hit[0]
    bars = ", ".join(f"BAR{i}" for i in d.unassigned_bars)
    return Check("bars", "fail", f"{_label(d)}: {bars} left unassigned",
                 "Replug the enclosure after boot, or try another enclosure (some leave BARs "
                 "unassigned).")


def check_link(f: HostFacts) -> Check:
    slow = [d for d in f.devices if d.link and d.link.degraded and (d.is_display or d.is_audio)]
    if not slow:
        linked = [d for d in _gpus(f) if d.link is not None]
        first = linked[0] if linked else None
        if first is not None and first.link is not None:
            return Check("pcie-link", "ok", f"{first.address.bdf} at {first.link.describe()}")
        return Check("pcie-link", "ok", "no degraded PCIe link")
    d = slow[0]
    assert d.link is not None
    fix = (
        "A Thunderbolt enclosure tunnels at most x4; check the cable and port if the speed is low."
        if d.thunderbolt
        else "Reseat the card or move it to a slot wired for its full width and speed."
    )
    return Check("pcie-link", "warn", f"{d.address.bdf} runs at {d.link.describe()}", fix)


def check_memory(f: HostFacts) -> Check:
    if f.host_memory is None:
        return Check("memory", "ok", "host memory not known (reading a dump)")
    host = f.host_memory
    if f.guest_memory is None:
        return Check("memory", "ok", f"host has {_gib(host)}")
    guest = f.guest_memory
    text = f"guest {_gib(guest)} of host {_gib(host)}"
    if guest >= host:
        return Check("memory", "fail", text, "Give the guest less memory than the host has.")
    if guest > host * GUEST_MEMORY_WARN_SHARE:
        return Check("memory", "warn", text,
                     f"Leave the host at least {int((1 - GUEST_MEMORY_WARN_SHARE) * 100)}% of its "
                     "memory; lower --memory.")
    return Check("memory", "ok", text)


def check_iommu(f: HostFacts) -> Check:
    if f.iommu_enabled:
        return Check("iommu", "ok", "IOMMU enabled (IOMMU groups present)")
    fix = (
        "Enable the SMMU in firmware and boot with iommu.passthrough=0."
        if f.machine in ("aarch64", "arm64")
        else "Enable VT-d/AMD-Vi in firmware and add intel_iommu=on (Intel) or amd_iommu=on (AMD) "
        "to the kernel command line."
    )
    return Check("iommu", "fail", "IOMMU disabled: no IOMMU groups", fix)


def check_groups(f: HostFacts) -> Check:
    gpus = [d for d in _gpus(f) if d.iommu_group is not None]
    if not gpus:
        return Check("iommu-group", "ok", "no display device in an IOMMU group to check")
    bad = [d for d in gpus if d.iommu_group_viable is False]
    if not bad:
        d = gpus[0]
        others = ", ".join(d.iommu_group_members) or "no other device"
        return Check("iommu-group", "ok", f"group {d.iommu_group} of {d.address.bdf} is viable "
                     f"({others})")
    d = bad[0]
    return Check(
        "iommu-group", "fail",
        f"group {d.iommu_group} of {d.address.bdf} also holds {', '.join(d.iommu_group_members)}",
        "Move the card to a slot with its own IOMMU group (check firmware ACS settings).",
    )


def check_vfio_pci(f: HostFacts) -> Check:
    if f.vfio_pci_loaded:
        return Check("vfio-pci", "ok", "vfio-pci driver loaded")
    if f.vfio_pci_available:
        return Check("vfio-pci", "warn", "vfio-pci is available but not loaded",
                     "Run `sudo modprobe vfio-pci` (egpu run --bind loads it too).")
    if f.vfio_pci_available is None:
        return Check("vfio-pci", "warn", "vfio-pci not loaded in the saved tree",
                     "Load it with `sudo modprobe vfio-pci` on that host.")
    return Check("vfio-pci", "fail", "this kernel has no vfio-pci module",
                 "Install a kernel built with VFIO (CONFIG_VFIO_PCI).")


def check_dev_vfio(f: HostFacts) -> Check:
    v = f.dev_vfio
    if v is None:
        return Check("dev-vfio", "warn", "/dev/vfio not checked (reading a saved tree)")
    if not v.container_exists:
        return Check("dev-vfio", "fail", "/dev/vfio/vfio is missing",
                     "Load the VFIO modules: `sudo modprobe vfio-pci`.")
    if not v.container_access:
        return Check("dev-vfio", "fail", "no read/write access to /dev/vfio/vfio",
                     "Run egpu as root or add a udev rule giving your user /dev/vfio.")
    for d in _gpus(f):
        g = d.iommu_group
        if d.passthrough_ready and g is not None and not v.groups.get(g, False):
            return Check("dev-vfio", "fail", f"no read/write access to /dev/vfio/{g}",
                         f"Run `sudo chown $USER /dev/vfio/{g}` or run egpu as root.")
    return Check("dev-vfio", "ok", "/dev/vfio is accessible")


MACOS_CHECKS: Sequence[Callable[[HostFacts], Check]] = (
    check_os, check_engine, check_engine_candidates, check_accelerator, check_dext, check_gpu,
    check_root_ports, check_thunderbolt5, check_bars, check_link, check_memory,
    check_guest_driver,
)
LINUX_CHECKS: Sequence[Callable[[HostFacts], Check]] = (
    check_os, check_engine, check_accelerator, check_iommu, check_vfio_pci, check_dev_vfio,
    check_gpu, check_groups, check_thunderbolt5, check_bars, check_link, check_memory,
)


def run_checks(f: HostFacts) -> list[Check]:
    """Every check that applies to the facts' platform, in a fixed order."""
    checks = MACOS_CHECKS if f.platform == "macos" else LINUX_CHECKS if f.platform == "linux" else (
        check_os, check_engine, check_memory,
    )
    return [c(f) for c in checks]


def blocking(checks: Sequence[Check]) -> bool:
    """True when a failure stops passthrough."""
    return any(c.status == "fail" for c in checks)
