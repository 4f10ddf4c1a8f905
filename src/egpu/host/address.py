"""PCI addresses: ``[DDDD:]BB:DD[.F]`` as users write them and QEMU's ``host=`` expects them.

Bus, device and function are hex, as in Linux sysfs names and QEMU's ``host=BB:DD.F``. The limits
are the PCI ones: 256 buses, 32 devices per bus, 8 functions per device, 65536 domains.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from egpu.errors import UsageError

MAX_DOMAIN = 0xFFFF
MAX_BUS = 0xFF
MAX_DEVICE = 0x1F
MAX_FUNCTION = 0x7

# both matched with fullmatch: "$" alone would let a trailing newline through
_ADDRESS_RE = re.compile(
    r"(?:(?P<domain>[0-9a-fA-F]{1,4}):)?(?P<bus>[0-9a-fA-F]{1,2}):(?P<device>[0-9a-fA-F]{1,2})"
    r"(?:\.(?P<function>[0-7]))?"
)
# the kernel's own spelling, as sysfs names functions: DDDD:BB:DD.F, lowercase hex
_FULL_ADDRESS_RE = re.compile(r"([0-9a-f]{4}):([0-9a-f]{2}):([0-9a-f]{2})\.([0-7])")


@dataclass(frozen=True, order=True)
class PciAddress:
    """One PCI function: domain, bus, device, function."""

    domain: int
    bus: int
    device: int
    function: int

    def __post_init__(self) -> None:
        for name, value, top in (
            ("domain", self.domain, MAX_DOMAIN),
            ("bus", self.bus, MAX_BUS),
            ("device", self.device, MAX_DEVICE),
            ("function", self.function, MAX_FUNCTION),
        ):
            if not 0 <= value <= top:
                raise ValueError(f"PCI {name} {value} out of range 0..{top}")

    @property
    def slot(self) -> PciSlot:
        return PciSlot(self.domain, self.bus, self.device)

    @property
    def bdf(self) -> str:
        """``BB:DD.F`` in hex, the form QEMU's ``host=`` takes."""
        return f"{self.bus:02x}:{self.device:02x}.{self.function:x}"

    @property
    def full(self) -> str:
        """``DDDD:BB:DD.F``, the form of Linux sysfs names."""
        return f"{self.domain:04x}:{self.bdf}"

    def __str__(self) -> str:
        return self.bdf


@dataclass(frozen=True, order=True)
class PciSlot:
    """One PCI slot (domain, bus, device): every function of a multi-function card."""

    domain: int
    bus: int
    device: int

    def __str__(self) -> str:
        return f"{self.bus:02x}:{self.device:02x}"


@dataclass(frozen=True)
class AddressPattern:
    """What a user typed: a slot or one function, with or without a domain."""

    domain: int | None
    bus: int
    device: int
    function: int | None

    def matches(self, address: PciAddress) -> bool:
        """True when ``address`` is this function, or a function of this slot."""
        return (
            (self.domain is None or self.domain == address.domain)
            and self.bus == address.bus
            and self.device == address.device
            and (self.function is None or self.function == address.function)
        )

    def __str__(self) -> str:
        text = f"{self.bus:02x}:{self.device:02x}"
        if self.domain is not None:
            text = f"{self.domain:04x}:{text}"
        if self.function is not None:
            text += f".{self.function:x}"
        return text


def parse_address_pattern(text: str) -> AddressPattern:
    """Parse ``[DDDD:]BB:DD[.F]`` (hex); UsageError on anything else."""
    m = _ADDRESS_RE.fullmatch(text)
    if m is None:
        raise UsageError(
            f"bad PCI address {text!r}: expected BB:DD, BB:DD.F or DDDD:BB:DD.F (hex)"
        )
    device = int(m["device"], 16)
    if device > MAX_DEVICE:
        raise UsageError(f"bad PCI address {text!r}: device {device:#x} is above {MAX_DEVICE:#x}")
    return AddressPattern(
        domain=int(m["domain"], 16) if m["domain"] else None,
        bus=int(m["bus"], 16),
        device=device,
        function=int(m["function"]) if m["function"] else None,
    )


def parse_address(text: str) -> PciAddress:
    """Parse one function ``[DDDD:]BB:DD.F``; the domain defaults to 0."""
    p = parse_address_pattern(text)
    if p.function is None:
        raise UsageError(f"bad PCI address {text!r}: a function (.F) is required here")
    return PciAddress(p.domain or 0, p.bus, p.device, p.function)


def full_address(text: str) -> PciAddress | None:
    """The function a sysfs name ``DDDD:BB:DD.F`` denotes, or None for anything else."""
    m = _FULL_ADDRESS_RE.fullmatch(text)
    if m is None:
        return None
    try:
        return PciAddress(int(m[1], 16), int(m[2], 16), int(m[3], 16), int(m[4]))
    except ValueError:  # a device number above 0x1f
        return None
