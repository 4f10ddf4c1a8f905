"""QEMU pieces for real passthrough: GPU path ``apple`` (macOS hvf + vfio-apple-pci) and GPU
path ``vfio`` (Linux kvm + vfio-pci). Pure: functions in, a PassthroughPlan out, which
``PassthroughPlan.apply`` folds into the VmSpec that egpu.engine.argv turns into argv.

``apple`` follows the command scottjg/qemu-vfio-apple's launcher builds
(contrib/apple-vfio/qemu-vfio-apple/VMLauncher.swift and Passthrough.swift): hvf with
TSO, ``-cpu host``, preallocated private RAM, ``virt`` with highmem, UEFI via pflash, and one
``vfio-apple-pci`` per function with its ``apple-dma-pci`` companion and no option ROM. Each
card gets its own guest slot (0x1e, then 0x1d, ...), ``host-root=`` names its root port, and
the options come from what the engine's build of the device has (AppleDeviceBuild):
``dma-companion`` is always written out, since its default differs between versions.

``vfio`` hands the kernel's VFIO devices to QEMU: every function of the IOMMU groups involved
goes together, behind one PCIe root port.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from egpu.engine.argv import Accel, MemoryBackend, VmSpec
from egpu.engine.qemu import APPLE_DEVICE, EngineInfo
from egpu.engine.qemu_options import OptionValue, option_string
from egpu.engine.safety import HostGuard, host_guard
from egpu.errors import EngineError, HostError, UsageError
from egpu.host.address import PciAddress, parse_address_pattern
from egpu.host.device import DEXT_NAME, PciDevice
from egpu.host.facts import Discovery
from egpu.host.slots import (
    AUDIO_REFUSED,
    Selection,
    function_label,
    resolve_passthrough,
    slot_key,
    slot_label,
    split_root,
)

PassthroughPath = Literal["apple", "vfio"]
GpuPath = Literal["apple", "vfio", "user", "none"]
GPU_PATH_CHOICES = ("auto", "apple", "vfio", "user", "none")
DEFAULT_GPU_PATH = "auto"  # apple on macOS, vfio on Linux with a ready GPU, else user

# scottjg/qemu-vfio-apple's launcher places the card at guest slot 0x1e (VMLauncher.swift): high
# enough to stay clear of the slots QEMU's virt board hands out to -device entries without an
# addr (which count up from 1).
APPLE_GUEST_SLOT = 0x1E
MAX_APPLE_CARDS = 4  # guest slots 0x1e down to 0x1b: still clear of the ones counted up from 1
# vfio-apple-pci properties that differ between launcher versions
PROP_HOST = "host"
PROP_COMPANION = "dma-companion"
PROP_HOST_ROOT = "host-root"
PROP_BOUNCE = "dma-bounce-size"
VFIO_DEVICE = "vfio-pci"
VFIO_ROOT_PORT_ID = "egpu-rp0"
# scottjg/qemu-vfio-apple's desktop image wants USB keyboard and tablet (its launcher always
# adds them, VMLauncher.swift); harmless when headless.
USB_INPUT = (
    ("-device", "qemu-xhci,id=egpu-xhci"),
    ("-device", "usb-kbd,bus=egpu-xhci.0"),
    ("-device", "usb-tablet,bus=egpu-xhci.0"),
)


@dataclass(frozen=True)
class PassthroughPlan:
    """What a passthrough GPU path sets on a VmSpec (accelerator, CPU, RAM, devices)."""

    path: PassthroughPath
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
            raise UsageError(f"GPU path {self.path} boots through UEFI: the VM needs firmware")
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
            "path": self.path,
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


@dataclass(frozen=True)
class AppleDeviceBuild:
    """The engine's ``vfio-apple-pci``: which properties it has, and a label for errors."""

    properties: frozenset[str]
    label: str

    @classmethod
    def of(cls, info: EngineInfo) -> AppleDeviceBuild:
        """From a probe; EngineError when the engine has no vfio-apple-pci at all."""
        if not info.has_device(APPLE_DEVICE):
            raise EngineError(f"{info.label} has no {APPLE_DEVICE}",
                              hint="use the qemu-vfio-apple host app's QEMU (--qemu PATH.app)")
        return cls(info.property_names(APPLE_DEVICE), info.label)

    def require(self, prop: str, why: str) -> None:
        if prop not in self.properties:
            raise EngineError(f"{self.label}: its {APPLE_DEVICE} has no {prop} option ({why})",
                              hint="update the qemu-vfio-apple host app")


# What egpu assumes when no engine was probed (a dry run elsewhere): the current launcher.
CURRENT_APPLE_BUILD = AppleDeviceBuild(
    frozenset({PROP_HOST, PROP_COMPANION, PROP_HOST_ROOT, PROP_BOUNCE}),
    "the current qemu-vfio-apple build (assumed)",
)


def apple_device_args(
    functions: Sequence[PciDevice], *, slot: int = APPLE_GUEST_SLOT,
    build: AppleDeviceBuild = CURRENT_APPLE_BUILD, dma_bounce_size: int | None = None,
) -> tuple[tuple[str, ...], ...]:
    """One ``-device vfio-apple-pci,...`` per function, each card at its own guest slot
    (``slot``, then downwards), in (root, address) order."""
    for d in functions:
        if d.is_audio:
            raise UsageError(f"{function_label(d)} cannot be passed through: {AUDIO_REFUSED}")
    cards: dict[tuple[str, object], list[PciDevice]] = {}
    for d in sorted(functions, key=lambda d: (d.root or "", d.address)):
        cards.setdefault(slot_key(d), []).append(d)
    if not cards:
        raise UsageError("no PCI function to pass through")
    if len(cards) > MAX_APPLE_CARDS:
        raise UsageError(f"egpu passes at most {MAX_APPLE_CARDS} cards; got {len(cards)}")
    build.require(PROP_HOST, "it names the host function")
    build.require(PROP_COMPANION, "its default differs between versions, so egpu sets it")
    use_root = PROP_HOST_ROOT in build.properties
    addresses = [d.address.bdf for d in functions]
    if not use_root and len(set(addresses)) < len(addresses):
        # without host-root the build cannot tell two cards at the same address apart
        shared = sorted({slot_label(d.root, d.address.slot) for d in functions})
        build.require(PROP_HOST_ROOT, f"{', '.join(shared)} share a bus address")
    if dma_bounce_size is not None:
        build.require(PROP_BOUNCE, "--dma-bounce-size asks for it")
    out = []
    for i, card in enumerate(cards.values()):
        mapped = _guest_functions(card)
        several = len(mapped) > 1
        for d, fn in mapped:
            opts: dict[str, OptionValue] = {PROP_HOST: d.address.bdf}
            if use_root and d.root:
                opts[PROP_HOST_ROOT] = d.root
            opts.update({"addr": f"{slot - i:#04x}.{fn}", PROP_COMPANION: True, "rombar": 0})
            if dma_bounce_size is not None:
                opts[PROP_BOUNCE] = dma_bounce_size
            if several and fn == 0:
                opts["multifunction"] = True
            out.append(("-device", option_string(APPLE_DEVICE, opts)))
    return tuple(out)


def apple_plan(
    functions: Sequence[PciDevice], *, tso: bool = True, usb_input: bool = True,
    slot: int = APPLE_GUEST_SLOT, build: AppleDeviceBuild = CURRENT_APPLE_BUILD,
    dma_bounce_size: int | None = None,
) -> PassthroughPlan:
    """GPU path ``apple``: hvf (TSO unless ``tso`` is False), host CPU, preallocated RAM, UEFI."""
    devices = apple_device_args(
        functions, slot=slot, build=build, dma_bounce_size=dma_bounce_size,
    ) if functions else ()
    return PassthroughPlan(
        path="apple",
        accel="hvf",
        # TSO makes the guest's memory ordering x86-like (ACTLR_EL1.EnTSO, macOS 15+; set at
        # vCPU init, as scottjg/qemu-vfio-apple's VMLauncher.swift explains), which
        # x86 emulation in the guest (FEX) relies on; --no-tso turns it off.
        accel_options=("tso=on",) if tso else (),
        cpu_model="host",
        # DMA maps through the DriverKit extension must stay resident: preallocate, private.
        memory_backend="prealloc",
        machine_options=(),
        devices=(*devices, *(USB_INPUT if usb_input else ())),
        functions=tuple(d.address.full for d in sorted(
            functions, key=lambda d: (d.root or "", d.address))),
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
    """GPU path ``vfio``: kvm, host CPU, the selected functions and their IOMMU group mates.

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
        path="vfio",
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
    """What ``run`` does about a GPU: the GPU path, the functions, and the plan for the argv."""

    path: GpuPath
    selection: Selection
    plan: PassthroughPlan | None = None  # None for GPU paths user and none
    notices: tuple[str, ...] = ()
    guard: HostGuard | None = None  # apple with a GPU: power assertion and QoS while it runs
    tso: bool = True
    dma_bounce_size: int | None = None  # apple: bytes of the guest's restricted-dma-pool
    # apple: every function claimed for passthrough when the run was planned (function_label),
    # so a GPU bound later can be told apart (hot-plug needs a restart); None: not known
    bound_at_start: tuple[str, ...] | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "path": self.path,
            "selection": self.selection.to_json(),
            "plan": self.plan.to_json() if self.plan else None,
            "notices": list(self.notices),
            "host_guard": self.guard.to_json() if self.guard else None,
        }

    def for_engine(self, info: EngineInfo) -> RunPassthrough:
        """The plan rebuilt for the probed engine's vfio-apple-pci (other GPU paths: unchanged)."""
        if self.path != "apple" or self.plan is None or not self.selection.functions:
            return self
        plan = apple_plan(self.selection.functions, tso=self.tso,
                          build=AppleDeviceBuild.of(info), dma_bounce_size=self.dma_bounce_size)
        return replace(self, plan=plan)


def _assumed(spec: str | None, path: str) -> tuple[PciDevice, ...]:
    """Functions named on the command line, taken on trust for a dry run on another OS."""
    if spec is None or spec.lower() in ("", "auto"):
        flag = "--ioreg FILE" if path == "apple" else "--sysfs DIR"
        raise UsageError(
            f"GPU path {path} cannot look for devices on this host; "
            f"name them with --passthrough BB:DD.F or give {flag}"
        )
    root, address = split_root(spec.strip()) if path == "apple" else (None, spec)
    p = parse_address_pattern(address)
    fn = p.function or 0
    return (PciDevice(
        address=PciAddress(p.domain or 0, p.bus, p.device, fn), vendor_id=0, device_id=0,
        class_code=0x030000, name="(assumed)", passthrough_ready=True,
        driver=DEXT_NAME if path == "apple" else VFIO_DEVICE, root=root,
    ),)


def resolve_run(
    gpu_path: str,
    passthrough: str | None,
    discovery: Discovery,
    *,
    tso: bool = True,
    bind: bool = False,
    include_audio: bool = False,
    allow_sleep: bool = False,
    dma_bounce_size: int | None = None,
) -> RunPassthrough:
    """Resolve ``--gpu`` and ``--passthrough`` against discovered devices (pure).

    auto picks apple on macOS and vfio on Linux when a ready (or, with ``bind``, rebindable)
    display device exists, else the virtual eGPU (user). When the discovery does not match
    the GPU path's OS (a dry run elsewhere), named functions are taken on trust. The apple plan
    assumes the current vfio-apple-pci until ``RunPassthrough.for_engine`` sees the real one.
    """
    if dma_bounce_size is not None and gpu_path not in ("auto", "apple"):
        raise UsageError("--dma-bounce-size is an option of GPU path apple")
    if gpu_path not in GPU_PATH_CHOICES:
        raise UsageError(
            f"unknown GPU path {gpu_path!r}; use one of: {', '.join(GPU_PATH_CHOICES)}"
        )
    spec = (passthrough or "auto").lower()
    if gpu_path == "none" or (gpu_path == "auto" and spec == "none"):
        if spec not in ("auto", "none"):
            raise UsageError("--gpu none passes no device; drop --passthrough")
        return RunPassthrough("none", Selection("none"))
    if gpu_path == "user" or (gpu_path == "auto" and spec == "virtual"):
        if spec not in ("auto", "virtual"):
            raise UsageError("--gpu user serves the virtual eGPU; use --passthrough virtual")
        return RunPassthrough("user", Selection("virtual", auto=spec == "auto"))
    if gpu_path == "auto":
        want: PassthroughPath = "apple" if discovery.platform == "macos" else "vfio"
        sel = resolve_passthrough(spec, discovery.devices, rebind=bind,
                                  include_audio=include_audio, fallback="virtual",
                                  apple=want == "apple")
        if sel.kind == "virtual":
            return RunPassthrough("user", sel, None, sel.notices)
        return _plan(want, sel, discovery, tso=tso, bind=bind, allow_sleep=allow_sleep,
                     dma_bounce_size=dma_bounce_size)
    chosen: PassthroughPath = "apple" if gpu_path == "apple" else "vfio"
    native = "macos" if chosen == "apple" else "linux"
    if spec == "virtual":
        raise UsageError(f"--gpu {chosen} passes real devices; use --gpu user for virtual")
    if discovery.platform != native:
        if spec == "none":
            sel = Selection("none")
        else:
            sel = Selection("devices", _assumed(passthrough, chosen),
                            (f"assuming {passthrough} exists (no {native} discovery here)",))
    else:
        sel = resolve_passthrough(spec, discovery.devices, rebind=bind,
                                  include_audio=include_audio, fallback="none",
                                  apple=chosen == "apple")
    return _plan(chosen, sel, discovery, tso=tso, bind=bind, allow_sleep=allow_sleep,
                 dma_bounce_size=dma_bounce_size)


def _plan(
    path: PassthroughPath, sel: Selection, discovery: Discovery, *, tso: bool, bind: bool,
    allow_sleep: bool = False, dma_bounce_size: int | None = None,
) -> RunPassthrough:
    if path == "apple":
        bound = (tuple(function_label(d) for d in discovery.devices if d.passthrough_ready)
                 if discovery.platform == "macos" else None)
        plan = apple_plan(sel.functions, tso=tso, dma_bounce_size=dma_bounce_size)
        notices = sel.notices
        if sel.functions and allow_sleep:
            notices += ("--allow-sleep: the Mac may sleep while the GPU is in use, which is "
                        "reported to wedge it",)
        return RunPassthrough("apple", sel, plan, notices,
                              guard=host_guard(sel.functions, allow_sleep=allow_sleep),
                              tso=tso, dma_bounce_size=dma_bounce_size, bound_at_start=bound)
    if not sel.functions:
        if sel.auto:
            raise HostError(
                "GPU path vfio found no display device to pass through; `egpu doctor` says why"
            )
        plan = _vfio_bare(())  # --passthrough none: a kvm VM without a GPU
    elif discovery.platform != "linux":
        plan = _vfio_bare(sel.functions)  # a dry run elsewhere: no groups to check
    else:
        plan = vfio_plan(sel.functions, discovery.devices, bind=bind)
    return RunPassthrough("vfio", sel, plan, sel.notices + plan.notices)


def _vfio_bare(functions: Sequence[PciDevice]) -> PassthroughPlan:
    return PassthroughPlan(
        path="vfio", accel="kvm", accel_options=(), cpu_model="host", memory_backend="plain",
        machine_options=(), devices=vfio_device_args(functions) if functions else (),
        functions=tuple(d.address.full for d in functions), needs_firmware=False,
    )
