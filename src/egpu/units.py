"""Sizes as users write them: the one size parser of the whole program (pure).

The rule: a size is a number (a decimal fraction is fine: ``1.5G``) with an optional binary
unit ``K``, ``M``, ``G`` or ``T`` (1024-based, any case, optionally followed by ``i`` and/or
``B``: ``512M``, ``512MiB``, ``512mb``), or ``B`` for bytes. A bare number is in the unit the
option declares and documents in its help: bytes unless it says otherwise (``--memory`` says
MiB, as QEMU's ``-m`` does). The result is a whole, positive number of bytes.
"""

from __future__ import annotations

import re
from fractions import Fraction

from egpu.errors import UsageError

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
TIB = 1 << 40
BYTE = 1
_UNITS = {"K": KIB, "M": MIB, "G": GIB, "T": TIB}
# re.ASCII: \d must not accept other scripts' digits, which Fraction would then refuse.
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(?:i?B|i)?|(B))?\s*$",
                      re.IGNORECASE | re.ASCII)
_NAMES = {BYTE: "bytes", KIB: "KiB", MIB: "MiB", GIB: "GiB", TIB: "TiB"}
_HINT = "a number with K, M, G or T, e.g. 512M or 4G"


def parse_size(text: str, *, bare_unit: int = BYTE, granule: int = BYTE,
               what: str = "size") -> int:
    """Bytes for ``text`` (see the module rule), a multiple of ``granule``; ``what`` names the
    value in errors (UsageError)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise UsageError(f"bad {what} {text!r}", hint=_HINT)
    number, unit, byte = m.groups()
    scale = _UNITS[unit.upper()] if unit else BYTE if byte else bare_unit
    value = Fraction(number) * scale
    if value.denominator != 1 or value % granule:
        unit_name = _NAMES.get(granule, f"{granule}-byte units")
        raise UsageError(f"{what} {text!r} is not a whole number of {unit_name}")
    if value <= 0:
        raise UsageError(f"bad {what} {text!r}", hint="it must be positive")
    return int(value)


def format_size(size: int) -> str:
    """The shortest exact spelling of ``size`` bytes that :func:`parse_size` reads back."""
    for suffix, unit in reversed(_UNITS.items()):
        if size >= unit and size % unit == 0:
            return f"{size // unit}{suffix}"
    return f"{size}B"
