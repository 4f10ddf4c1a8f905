"""Which functions go to the VM: resolve ``--passthrough`` against discovered devices (pure).

``BB:DD`` takes every claimed function of the slot, ``BB:DD.F`` that function only, ``none`` no
GPU, ``virtual`` the virtual eGPU, and auto (no value, or ``auto``) the first slot holding a
claimed display-class function (base class 0x03, so data-center GPUs of class 0x0302 count).
Auto leaves audio functions (base class 0x04, the card's HDMI/DP audio) out with a notice, as
scottjg/qemu-vfio-apple's launcher does (contrib/apple-vfio/qemu-vfio-apple/Passthrough.swift);
name them explicitly to take them.

On a Mac (``apple``) slots are keyed by (root port, bus, device): Apple Silicon has no PCI
segments and numbers every Thunderbolt root port's buses from the same start, so two eGPUs can
both sit at 01:00. ``ROOT/BB:DD[.F]`` names one; a plain ``BB:DD[.F]`` must be unambiguous.
Auto takes every claimed slot with a display function (two eGPUs: both), and audio functions
are refused even when named: the driver extension will not attach them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from egpu.errors import NotFoundError, UsageError
from egpu.host.address import AddressPattern, PciSlot, parse_address_pattern
from egpu.host.device import DEXT_NAME, PciDevice

SelectionKind = Literal["devices", "none", "virtual"]
AUTO = "auto"
NONE = "none"
VIRTUAL = "virtual"
ROOT_SEPARATOR = "/"
# Why the GPU path apple never passes audio: the current VFIOUserPCIDriver refuses to attach
# class-0x04 functions because they "triggered DART assertions"
# (scottjg/qemu-vfio-apple, VFIOUserPCIDriver/VFIOUserPCIDriver.cpp).
AUDIO_REFUSED = (
    f"the {DEXT_NAME} driver extension refuses to attach audio functions (class 0x04): "
    "they triggered DART assertions"
)

SlotKey = tuple[str, PciSlot]  # (root port name or "", slot)


def slot_key(d: PciDevice) -> SlotKey:
    """The key two functions share exactly when they are on the same card."""
    return (d.root or "", d.address.slot)


def slot_label(root: str | None, slot: PciSlot) -> str:
    """``ROOT/BB:DD`` when the root port is known, else ``BB:DD``."""
    return f"{root}{ROOT_SEPARATOR}{slot}" if root else str(slot)


def function_label(d: PciDevice) -> str:
    """``ROOT/BB:DD.F`` when the root port is known, else ``BB:DD.F``."""
    return f"{d.root}{ROOT_SEPARATOR}{d.address.bdf}" if d.root else d.address.bdf


@dataclass(frozen=True)
class Selection:
    """The outcome: passed functions (per slot, function 0 first), or no GPU, or virtual."""

    kind: SelectionKind
    functions: tuple[PciDevice, ...] = ()
    notices: tuple[str, ...] = field(default=())
    auto: bool = False  # chosen automatically rather than named

    @property
    def slot(self) -> PciSlot | None:
        return self.functions[0].address.slot if self.functions else None

    @property
    def slots(self) -> tuple[tuple[PciDevice, ...], ...]:
        """The functions grouped by card, in (root, address) order."""
        groups: dict[SlotKey, list[PciDevice]] = {}
        for d in sorted(self.functions, key=lambda d: (d.root or "", d.address)):
            groups.setdefault(slot_key(d), []).append(d)
        return tuple(tuple(g) for g in groups.values())

    def to_json(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "auto": self.auto,
            "slot": str(self.slot) if self.slot else None,
            "slots": [slot_label(g[0].root, g[0].address.slot) for g in self.slots],
            "functions": [d.address.bdf for d in self.functions],
            "roots": [d.root for d in self.functions],
            "notices": list(self.notices),
        }


def usable(d: PciDevice, *, rebind: bool = False) -> bool:
    """Ready as discovered, or (``rebind``) ready once rebound to vfio-pci."""
    return d.passthrough_ready or (rebind and d.rebindable)


def split_root(text: str) -> tuple[str | None, str]:
    """``ROOT/BB:DD[.F]`` -> (ROOT, rest); a plain address has no root."""
    if ROOT_SEPARATOR not in text:
        return None, text
    root, _, rest = text.rpartition(ROOT_SEPARATOR)
    if not root.strip():
        raise UsageError(f"bad --passthrough {text!r}: expected ROOT/BB:DD[.F]")
    return root.strip(), rest


def _by_root(
    pattern: AddressPattern, root: str | None, devices: Sequence[PciDevice],
    ok: Callable[[PciDevice], bool], written: str,
) -> list[PciDevice]:
    """The devices a pattern names; UsageError when a plain address fits several root ports."""
    matched = [d for d in devices if pattern.matches(d.address)]
    if root is not None:
        matched = [d for d in matched if (d.root or "").lower() == root.lower()]
        if not matched:
            known = sorted({d.root for d in devices if d.root})
            raise NotFoundError(
                f"no PCI device at {root}{ROOT_SEPARATOR}{pattern}; root ports here: "
                f"{', '.join(known) or 'none known (the dump has no nesting)'}"
            )
        return matched
    roots = {d.root for d in matched}
    if len(roots) > 1:
        # only roots with something to pass count: a Wi-Fi chip at 01:00 behind another root
        # port does not make a card at 01:00 ambiguous
        claimed = {d.root for d in matched if ok(d)}
        if len(claimed) == 1:
            return [d for d in matched if d.root in claimed]
        choices = ", ".join(sorted(
            slot_label(r, PciSlot(0, pattern.bus, pattern.device))
            + (f".{pattern.function:x}" if pattern.function is not None else "")
            for r in (claimed or roots) if r
        ))
        raise UsageError(f"{written} exists behind several root ports; name one: {choices}")
    return matched


def resolve_passthrough(
    spec: str | None,
    devices: Sequence[PciDevice],
    *,
    rebind: bool = False,
    include_audio: bool = False,
    fallback: SelectionKind = "virtual",
    apple: bool = False,
) -> Selection:
    """Resolve a ``--passthrough`` value; ``fallback`` is what auto gives when nothing fits.

    ``apple``: every display slot for auto, and audio functions refused (see module doc).
    """
    written = spec or AUTO
    text = written.lower()
    ok: Callable[[PciDevice], bool] = lambda d: usable(d, rebind=rebind)  # noqa: E731
    if text == NONE:
        return Selection("none")
    if text == VIRTUAL:
        return Selection("virtual")
    if text == AUTO:
        return _auto(devices, ok, include_audio=include_audio and not apple, fallback=fallback,
                     every_slot=apple)
    root, address = split_root(written)
    pattern = parse_address_pattern(address)
    matched = _by_root(pattern, root, devices, ok, written)
    if not matched:
        raise NotFoundError(f"no PCI device at {pattern}; `egpu devices` lists what this host has")
    domains = {d.address.domain for d in matched}
    if len(domains) > 1:
        listed = ", ".join(f"{x:04x}" for x in sorted(domains))
        raise UsageError(
            f"{pattern} exists in several PCI domains ({listed}); write DDDD:{pattern}"
        )
    if pattern.function is not None:
        d = matched[0]
        if apple and d.is_audio:
            raise UsageError(f"{function_label(d)} cannot be passed through: {AUDIO_REFUSED}")
        if not ok(d):
            raise UsageError(f"{d.address.bdf} cannot be passed through: {d.why_not}")
        return Selection("devices", (d,))
    notices: list[str] = []
    if apple:
        for d in matched:
            if d.is_audio and ok(d):
                notices.append(f"leaving out audio function {function_label(d)}: {AUDIO_REFUSED}")
        matched = [d for d in matched if not d.is_audio]
    chosen = tuple(sorted((d for d in matched if ok(d)), key=lambda d: d.address))
    if not chosen:
        reasons = "; ".join(f"{d.address.bdf}: {d.why_not}" for d in matched) or AUDIO_REFUSED
        raise UsageError(f"no function of slot {pattern} can be passed through ({reasons})")
    return Selection("devices", chosen, tuple(notices))


def _auto(
    devices: Sequence[PciDevice],
    ok: Callable[[PciDevice], bool],
    *,
    include_audio: bool,
    fallback: SelectionKind,
    every_slot: bool,
) -> Selection:
    slots: dict[SlotKey, list[PciDevice]] = {}
    for d in sorted(devices, key=lambda d: (d.root or "", d.address)):
        if ok(d):
            slots.setdefault(slot_key(d), []).append(d)
    notices: list[str] = []
    taken: list[PciDevice] = []
    for functions in slots.values():
        if not any(f.is_display for f in functions):
            continue
        slot = slot_label(functions[0].root, functions[0].address.slot)
        for f in functions:
            if f.is_audio and not include_audio:
                how = (AUDIO_REFUSED if every_slot else
                       f"pass --passthrough {f.address.bdf} or {slot} to take it")
                notices.append(f"skipping audio function {function_label(f)} ({f.name}); {how}")
            else:
                taken.append(f)
        if not every_slot:
            break
    if taken:
        return Selection("devices", tuple(taken), tuple(notices), auto=True)
    note = "no passthrough-ready display device found"
    if fallback == VIRTUAL:
        note += "; using the virtual eGPU"
    return Selection(fallback, (), (note,), auto=True)


def bound_since_start(
    devices: Sequence[PciDevice], bound_at_start: Sequence[str]
) -> tuple[PciDevice, ...]:
    """GPUs claimed for passthrough now that were not when a VM started (``function_label``s).

    Passthrough is fixed at boot: such a GPU reaches the VM only after a restart.
    """
    before = set(bound_at_start)
    return tuple(d for d in devices
                 if d.is_display and d.passthrough_ready and function_label(d) not in before)
