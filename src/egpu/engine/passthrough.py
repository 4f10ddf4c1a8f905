"""QEMU pieces for real passthrough: engine ``apple`` (macOS hvf + vfio-apple-pci) and engine
``vfio`` (Linux kvm + vfio-pci). Pure: functions in, a PassthroughPlan out, which
``PassthroughPlan.apply`` folds into the VmSpec that egpu.engine.argv turns into argv.

``apple`` follows the reference launcher's command (REFERENCE.md section 4): hvf with TSO,
``-cpu host``, preallocated private RAM, ``virt`` with highmem, UEFI via pflash, and one
``vfio-apple-pci`` per function at guest slot 0x1e with its ``apple-dma-pci`` companion
(``dma-companion=on``) and no option ROM. ``vfio`` hands the kernel's VFIO devices to QEMU: every
function of the IOMMU groups involved goes together, behind one PCIe root port.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from egpu.engine.argv import Accel, MemoryBackend, VmSpec
from egpu.engine.qemu_options import OptionValue, option_string
from egpu.errors import HostError, UsageError
from egpu.host.address import PciAddress, parse_address_pattern
from egpu.host.device import DEXT_NAME, PciDevice
from egpu.host.facts import Discovery
from egpu.host.slots import Selection, resolve_passthrough

PassthroughEngine = Literal["apple", "vfio"]
EngineName = Literal["apple", "vfio", "user", "none"]
ENGINE_CHOICES = ("auto", "apple", "vfio", "user", "none")

# The reference places the card at guest slot 0x1e: high enough to stay clear of the slots
# QEMU's virt board hands out to -device entries without an addr (which count up from 1).
APPLE_GUEST_SLOT = 0x1E
APPLE_DEVICE = "vfio-apple-pci"
VFIO_DEVICE = "vfio-pci"
VFIO_ROOT_PORT_ID = "egpu-rp0"
# The reference's desktop image wants USB keyboard and tablet; harmless when headless.
USB_INPUT = (
    ("-device", "qemu-xhci,id=egpu-xhci"),
    ("-device", "usb-kbd,bus=egpu-xhci.0"),
    ("-device", "usb-tablet,bus=egpu-xhci.0"),
)


@dataclass(frozen=True)
class PassthroughPlan:
    """What a passthrough engine sets on a VmSpec (accelerator, CPU, RAM, devices)."""

    engine: PassthroughEngine
    accel: Accel
    accel_options: tuple[str, ...]
    cpu_model: str
    memory_backend: MemoryBackend
    machine_options: tuple[str, ...]
    devices: tuple[tuple[str, ...], ...]
    functions: tuple[str, ...]  # host addresses passed, DDDD:BB:DD.F
    needs_firmware: bool  # UEFI through pflash (VmSpec.firmware must be set)
    notices: tuple[str, ...] = ()

    def apply(self, spec: VmSpec) -> VmSpec:
        """The spec with this plan's accelerator, CPU, memory backend and devices."""
        if self.needs_firmware and spec.firmware is None:
            raise UsageError(f"engine {self.engine} boots through UEFI: the VM needs firmware")
        return replace(
            spec,
            accel=self.accel,
            accel_options=self.accel_options,
            cpu_model=self.cpu_model,
            memory_backend=self.memory_backend,
            machine_options=spec.machine_options + self.machine_options,
            devices=spec.devices + self.devices,
        )

    def to_json(self) -> dict[str, object]:
        return {
            "engine": self.engine,
            "accel": ",".join((self.accel, *self.accel_options)),
            "functions": list(self.functions),
            "devices": [list(d) for d in self.devices],
            "notices": list(self.notices),
        }


def _guest_functions(functions: Sequence[PciDevice]) -> list[tuple[PciDevice, int]]:
    """Host functions sorted, each with its guest function number.

    Host numbers are kept when function 0 goes (drivers expect the card's layout, e.g. NVIDIA
    audio at .1); otherwise they are renumbered from 0, because a guest only scans a slot whose
    function 0 exists.
    """
    ordered = sorted(functions, key=lambda d: d.address)
    if not ordered:
        raise UsageError("no PCI function to pass through")
    slots = {d.address.slot for d in ordered}
    if len(slots) > 1:
        raise UsageError(
            "passthrough takes the functions of one slot; got "
            + ", ".join(sorted(str(s) for s in slots))
        )
    if len({d.address.function for d in ordered}) != len(ordered):
        raise UsageError("the same PCI function was given twice")
    if ordered[0].address.function == 0:
        return [(d, d.address.function) for d in ordered]
    return [(d, i) for i, d in enumerate(ordered)]


def apple_device_args(
    functions: Sequence[PciDevice], *, slot: int = APPLE_GUEST_SLOT
) -> tuple[tuple[str, ...], ...]:
    """One ``-device vfio-apple-pci,...`` per function, all at guest ``slot``."""
    mapped = _guest_functions(functions)
    several = len(mapped) > 1
    out = []
    for d, fn in mapped:
        opts: dict[str, OptionValue] = {
            "host": d.address.bdf, "addr": f"{slot:#04x}.{fn}", "dma-companion": True,
            "rombar": 0,
        }
        if several and fn == 0:
            opts["multifunction"] = True
        out.append(("-device", option_string(APPLE_DEVICE, opts)))
    return tuple(out)


def apple_plan(
    functions: Sequence[PciDevice], *, tso: bool = True, usb_input: bool = True,
    slot: int = APPLE_GUEST_SLOT,
) -> PassthroughPlan:
    """Engine ``apple``: hvf (TSO unless ``tso`` is False), host CPU, preallocated RAM, UEFI."""
    devices = apple_device_args(functions, slot=slot) if functions else ()
    return PassthroughPlan(
        engine="apple",
        accel="hvf",
        # TSO makes the guest's memory ordering x86-like (ACTLR_EL1.EnTSO, macOS 15+), which
        # x86 emulation in the guest (FEX) relies on; --no-tso turns it off.
        accel_options=("tso=on",) if tso else (),
        cpu_model="host",
        # DMA maps through the DriverKit extension must stay resident: preallocate, private.
        memory_backend="prealloc",
        machine_options=(),
        devices=(*devices, *(USB_INPUT if usb_input else ())),
        functions=tuple(d.address.full for d in sorted(functions, key=lambda d: d.address)),
        needs_firmware=True,
    )


def vfio_group_closure(
    selected: Sequence[PciDevice], devices: Sequence[PciDevice]
) -> tuple[tuple[PciDevice, ...], tuple[str, ...]]:
    """Every function that must go with ``selected`` (their IOMMU groups, bridges excepted),
    and notices for the ones added; HostError when a group cannot go to a VM."""
    by_full = {d.address.full: d for d in devices}
    chosen: dict[str, PciDevice] = {d.address.full: d for d in selected}
    notices = []
    for d in selected:
        if d.iommu_group is None:
            raise HostError(
                f"{d.address.bdf} has no IOMMU group: enable the IOMMU (see `egpu doctor`)"
            )
        if d.iommu_group_viable is False:
            raise HostError(
                f"IOMMU group {d.iommu_group} of {d.address.bdf} is not viable: it also holds "
                f"{', '.join(d.iommu_group_members)}; move the card to another slot"
            )
        for member in d.iommu_group_members:
            m = by_full.get(member)
            if m is None:
                raise HostError(f"IOMMU group {d.iommu_group} names {member}, which sysfs lacks")
            if m.is_bridge or member in chosen:
                continue
            if m.address.slot != d.address.slot:
                raise HostError(
                    f"IOMMU group {d.iommu_group} of {d.address.bdf} also holds {m.address.full} "
                    "of another slot; egpu passes only whole cards"
                )
            chosen[member] = m
            notices.append(f"adding {m.address.bdf} ({m.kind}): same IOMMU group as "
                           f"{d.address.bdf}")
    return tuple(sorted(chosen.values(), key=lambda d: d.address)), tuple(notices)


def vfio_device_args(functions: Sequence[PciDevice]) -> tuple[tuple[str, ...], ...]:
    """A PCIe root port, and one ``-device vfio-pci,...`` per function behind it."""
    mapped = _guest_functions(functions)
    several = len(mapped) > 1
    # A root port gives the guest driver a PCIe link to read, as on bare metal.
    out: list[tuple[str, ...]] = [
        ("-device", f"pcie-root-port,id={VFIO_ROOT_PORT_ID},chassis=1,slot=1"),
    ]
    for d, fn in mapped:
        opts: dict[str, OptionValue] = {
            "host": d.address.full, "bus": VFIO_ROOT_PORT_ID, "addr": f"0x0.{fn}"}
        if several and fn == 0:
            opts["multifunction"] = True
        out.append(("-device", option_string(VFIO_DEVICE, opts)))
    return tuple(out)


def vfio_plan(
    selected: Sequence[PciDevice], devices: Sequence[PciDevice], *, bind: bool = False
) -> PassthroughPlan:
    """Engine ``vfio``: kvm, host CPU, the selected functions and their IOMMU group mates.

    Without ``bind`` every function must already be on vfio-pci; with it, the caller rebinds
    ``plan.functions`` (egpu.host.vfio_bind) before starting QEMU.
    """
    functions, notices = vfio_group_closure(selected, devices)
    if not bind:
        for d in functions:
            if d.driver != VFIO_DEVICE:
                raise HostError(
                    f"{d.address.bdf} is bound to {d.driver or 'no driver'}, not vfio-pci; "
                    "pass --bind to rebind it while the VM runs"
                )
    return PassthroughPlan(
        engine="vfio",
        accel="kvm",
        accel_options=(),
        cpu_model="host",
        # VFIO pins all guest RAM for DMA anyway; a plain backend is enough.
        memory_backend="plain",
        machine_options=(),
        devices=vfio_device_args(functions),
        functions=tuple(d.address.full for d in functions),
        needs_firmware=False,
        notices=notices,
    )


@dataclass(frozen=True)
class RunPassthrough:
    """What ``run`` does about a GPU: the engine, the functions, and the plan for the argv."""

    engine: EngineName
    selection: Selection
    plan: PassthroughPlan | None = None  # None for engines user and none
    notices: tuple[str, ...] = ()

    def to_json(self) -> dict[str, object]:
        return {
            "engine": self.engine,
            "selection": self.selection.to_json(),
            "plan": self.plan.to_json() if self.plan else None,
            "notices": list(self.notices),
        }


def _assumed(spec: str | None, engine: str) -> tuple[PciDevice, ...]:
    """Functions named on the command line, taken on trust for a dry run on another OS."""
    if spec is None or spec.lower() in ("", "auto"):
        flag = "--ioreg FILE" if engine == "apple" else "--sysfs DIR"
        raise UsageError(
            f"engine {engine} cannot look for devices on this host; "
            f"name them with --passthrough BB:DD.F or give {flag}"
        )
    p = parse_address_pattern(spec)
    fn = p.function or 0
    return (PciDevice(
        address=PciAddress(p.domain or 0, p.bus, p.device, fn), vendor_id=0, device_id=0,
        class_code=0x030000, name="(assumed)", passthrough_ready=True,
        driver=DEXT_NAME if engine == "apple" else VFIO_DEVICE,
    ),)


def resolve_run(
    engine: str,
    passthrough: str | None,
    discovery: Discovery,
    *,
    tso: bool = True,
    bind: bool = False,
    include_audio: bool = False,
) -> RunPassthrough:
    """Resolve ``--engine`` and ``--passthrough`` against discovered devices (pure).

    auto picks apple on macOS and vfio on Linux when a ready (or, with ``bind``, rebindable)
    display device exists, else the virtual eGPU (user). When the discovery does not match
    the engine's OS (a dry run elsewhere), named functions are taken on trust.
    """
    if engine not in ENGINE_CHOICES:
        raise UsageError(f"unknown engine {engine!r}; use one of: {', '.join(ENGINE_CHOICES)}")
    spec = (passthrough or "auto").lower()
    if engine == "none" or (engine == "auto" and spec == "none"):
        if spec not in ("auto", "none"):
            raise UsageError("--engine none passes no device; drop --passthrough")
        return RunPassthrough("none", Selection("none"))
    if engine == "user" or (engine == "auto" and spec == "virtual"):
        if spec not in ("auto", "virtual"):
            raise UsageError("--engine user serves the virtual eGPU; use --passthrough virtual")
        return RunPassthrough("user", Selection("virtual", auto=spec == "auto"))
    if engine == "auto":
        want: PassthroughEngine = "apple" if discovery.platform == "macos" else "vfio"
        sel = resolve_passthrough(spec, discovery.devices, rebind=bind,
                                  include_audio=include_audio, fallback="virtual")
        if sel.kind == "virtual":
            return RunPassthrough("user", sel, None, sel.notices)
        return _plan(want, sel, discovery, tso=tso, bind=bind)
    chosen: PassthroughEngine = "apple" if engine == "apple" else "vfio"
    native = "macos" if chosen == "apple" else "linux"
    if spec == "virtual":
        raise UsageError(f"--engine {chosen} passes real devices; use --engine user for virtual")
    if discovery.platform != native:
        if spec == "none":
            sel = Selection("none")
        else:
            sel = Selection("devices", _assumed(passthrough, chosen),
                            (f"assuming {passthrough} exists (no {native} discovery here)",))
    else:
        sel = resolve_passthrough(spec, discovery.devices, rebind=bind,
                                  include_audio=include_audio, fallback="none")
    return _plan(chosen, sel, discovery, tso=tso, bind=bind)


def _plan(
    engine: PassthroughEngine, sel: Selection, discovery: Discovery, *, tso: bool, bind: bool
) -> RunPassthrough:
    if engine == "apple":
        plan = apple_plan(sel.functions, tso=tso)
        return RunPassthrough("apple", sel, plan, sel.notices)
    if not sel.functions:
        if sel.auto:
            raise HostError(
                "engine vfio found no display device to pass through; `egpu doctor` says why"
            )
        plan = _vfio_bare(())  # --passthrough none: a kvm VM without a GPU
    elif discovery.platform != "linux":
        plan = _vfio_bare(sel.functions)  # a dry run elsewhere: no groups to check
    else:
        plan = vfio_plan(sel.functions, discovery.devices, bind=bind)
    return RunPassthrough("vfio", sel, plan, sel.notices + plan.notices)


def _vfio_bare(functions: Sequence[PciDevice]) -> PassthroughPlan:
    return PassthroughPlan(
        engine="vfio", accel="kvm", accel_options=(), cpu_model="host", memory_backend="plain",
        machine_options=(), devices=vfio_device_args(functions) if functions else (),
        functions=tuple(d.address.full for d in functions), needs_firmware=False,
    )
