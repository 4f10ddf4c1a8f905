"""Which functions go to the VM: resolve ``--passthrough`` against discovered devices (pure).

``BB:DD`` takes every claimed function of the slot, ``BB:DD.F`` that function only, ``none`` no
GPU, ``virtual`` the virtual eGPU, and auto (no value, or ``auto``) the first slot holding a
claimed display-class function (base class 0x03, so data-center GPUs of class 0x0302 count).
Auto leaves audio functions (base class 0x04, the card's HDMI/DP audio) out with a notice, as
the reference launcher does; name them explicitly to take them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from egpu.errors import NotFoundError, UsageError
from egpu.host.address import PciSlot, parse_address_pattern
from egpu.host.device import PciDevice

SelectionKind = Literal["devices", "none", "virtual"]
AUTO = "auto"
NONE = "none"
VIRTUAL = "virtual"


@dataclass(frozen=True)
class Selection:
    """The outcome: passed functions (function 0 first), or no GPU, or the virtual eGPU."""

    kind: SelectionKind
    functions: tuple[PciDevice, ...] = ()
    notices: tuple[str, ...] = field(default=())
    auto: bool = False  # chosen automatically rather than named

    @property
    def slot(self) -> PciSlot | None:
        return self.functions[0].address.slot if self.functions else None

    def to_json(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "auto": self.auto,
            "slot": str(self.slot) if self.slot else None,
            "functions": [d.address.bdf for d in self.functions],
            "notices": list(self.notices),
        }


def usable(d: PciDevice, *, rebind: bool = False) -> bool:
    """Ready as discovered, or (``rebind``) ready once rebound to vfio-pci."""
    return d.passthrough_ready or (rebind and d.rebindable)


def resolve_passthrough(
    spec: str | None,
    devices: Sequence[PciDevice],
    *,
    rebind: bool = False,
    include_audio: bool = False,
    fallback: SelectionKind = "virtual",
) -> Selection:
    """Resolve a ``--passthrough`` value; ``fallback`` is what auto gives when nothing fits."""
    text = (spec or AUTO).lower()
    ok: Callable[[PciDevice], bool] = lambda d: usable(d, rebind=rebind)  # noqa: E731
    if text == NONE:
        return Selection("none")
    if text == VIRTUAL:
        return Selection("virtual")
    if text == AUTO:
        return _auto(devices, ok, include_audio=include_audio, fallback=fallback)
    pattern = parse_address_pattern(text)
    matched = [d for d in devices if pattern.matches(d.address)]
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
        if not ok(d):
            raise UsageError(f"{d.address.bdf} cannot be passed through: {d.why_not}")
        return Selection("devices", (d,))
    chosen = tuple(sorted((d for d in matched if ok(d)), key=lambda d: d.address))
    if not chosen:
        reasons = "; ".join(f"{d.address.bdf}: {d.why_not}" for d in matched)
        raise UsageError(f"no function of slot {pattern} can be passed through ({reasons})")
    return Selection("devices", chosen)


def _auto(
    devices: Sequence[PciDevice],
    ok: Callable[[PciDevice], bool],
    *,
    include_audio: bool,
    fallback: SelectionKind,
) -> Selection:
    slots: dict[PciSlot, list[PciDevice]] = {}
    for d in sorted(devices, key=lambda d: d.address):
        if ok(d):
            slots.setdefault(d.address.slot, []).append(d)
    for slot, functions in slots.items():
        if not any(f.is_display for f in functions):
            continue
        notices = []
        taken = []
        for f in functions:
            if f.is_audio and not include_audio:
                notices.append(
                    f"skipping audio function {f.address.bdf} ({f.name}); "
                    f"pass --passthrough {f.address.bdf} or {slot} to take it"
                )
            else:
                taken.append(f)
        return Selection("devices", tuple(taken), tuple(notices), auto=True)
    note = "no passthrough-ready display device found"
    if fallback == VIRTUAL:
        note += "; using the virtual eGPU"
    return Selection(fallback, (), (note,), auto=True)
