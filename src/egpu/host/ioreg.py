"""macOS discovery: parse the IORegistry as ``ioreg -a -l`` prints it (an XML plist).

Facts used (as scottjg/qemu-vfio-apple reads them, contrib/apple-vfio/qemu-vfio-apple/
Passthrough.swift): ``IOPCIDevice`` entries carry ``vendor-id`` and ``device-id``
(little-endian data), ``class-code`` (4 bytes LE: prog-if, sub, base, 0), ``name`` (C-string
data) and ``pcidebug`` ("bus:dev:func" in decimal, optionally followed by "(seg:link)"). A device
is claimed for passthrough when one of its IOService-plane children has ``CFBundleIdentifier``
equal to the DriverKit extension's bundle id or is named ``VFIOUserPCIDriver``.

Other properties read when present: ``IOPCIExpressLinkStatus`` / ``IOPCIExpressLinkCapabilities``
(the PCIe Link Status and Link Capabilities registers), ``IOPCITunnelled`` (behind Thunderbolt),
and the Open Firmware ``reg`` / ``assigned-addresses`` cells (IEEE 1275 PCI binding) that tell
which BARs asked for space and which got it. Every value is untrusted: types and lengths are
checked, and anything malformed is a one-line HostError.
"""

from __future__ import annotations

import plistlib
import re
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from xml.parsers.expat import ExpatError

from egpu.errors import HostError
from egpu.host.address import MAX_BUS, MAX_DEVICE, MAX_FUNCTION, PciAddress
from egpu.host.device import DEFAULT_DEXT_BUNDLE_ID, DEXT_NAME, PciDevice, PcieLink, readiness

PCI_DEVICE_CLASS = "IOPCIDevice"
KEY_CLASS = "IOObjectClass"
KEY_NAME = "IORegistryEntryName"
KEY_CHILDREN = "IORegistryEntryChildren"
KEY_BUNDLE = "CFBundleIdentifier"
KEY_ENTRY_ID = "IORegistryEntryID"
KEY_LINK_STATUS = "IOPCIExpressLinkStatus"
KEY_LINK_CAPS = "IOPCIExpressLinkCapabilities"
KEY_TUNNELLED = "IOPCITunnelled"

IOREG_ARGV = ("ioreg", "-a", "-l", "-w0", "-r", "-c", PCI_DEVICE_CLASS)
IOREG_TIMEOUT_S = 30
MAX_DUMP_BYTES = 256 * 1024 * 1024  # a full registry is a few MiB; refuse absurd files
MAX_DEPTH = 256  # the IOService plane is rarely 40 deep; a deeper tree is not a registry

# PCIe Link Status / Link Capabilities: bits 3:0 speed code, bits 9:4 width (PCIe base spec 7.5.3).
LINK_SPEED_MASK = 0xF
LINK_WIDTH_SHIFT = 4
LINK_WIDTH_MASK = 0x3F
LINK_SPEEDS_GTS = {1: 2.5, 2: 5.0, 3: 8.0, 4: 16.0, 5: 32.0, 6: 64.0}

# IEEE 1275 PCI binding: a phys.hi cell is npt000ss bbbbbbbb dddddfff rrrrrrrr, followed by
# phys.mid, phys.lo, size.hi, size.lo; rrrrrrrr is the config-space offset of the BAR.
OF_CELL = struct.Struct("<5I")
OF_REGISTER_MASK = 0xFF
BAR0_OFFSET = 0x10
BAR_STRIDE = 4
BAR_COUNT = 6

# QEMU option values end at a comma and `--passthrough ROOT/BB:DD` splits at the slash: a root
# name carrying either (never seen in a registry) is treated as unknown rather than passed on.
ROOT_NAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
_PCIDEBUG_RE = re.compile(r"^\s*(\d{1,3}):(\d{1,3}):(\d{1,3})\s*(?:\((\d+):(\d+)\))?\s*$")


@dataclass(frozen=True)
class _Entry:
    props: dict[str, Any]
    tunnelled: bool
    root: str | None  # registry-entry name of the topmost IOPCIDevice ancestor


def load_plist(data: bytes, origin: str) -> Any:
    """Decode an ``ioreg -a`` plist (XML or binary); HostError when it is not one."""
    if len(data) > MAX_DUMP_BYTES:
        raise HostError(f"{origin}: {len(data)} bytes is too large for a registry dump")
    if not data.strip():
        raise HostError(f"{origin}: empty file, expected the output of `ioreg -a -l`")
    try:
        return plistlib.loads(data)
    except (plistlib.InvalidFileException, ExpatError, ValueError, TypeError, OverflowError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise HostError(
            f"{origin}: not a readable plist ({reason}); save one with `ioreg -a -l > FILE`"
        ) from e
    except RecursionError as e:
        raise HostError(f"{origin}: plist nested too deeply to be a registry dump") from e


def _walk(tree: Any, origin: str) -> Iterator[_Entry]:
    """Every IOPCIDevice dict in the tree, with whether an ancestor is Thunderbolt-tunnelled
    and the name of its topmost IOPCIDevice ancestor (its root port)."""
    stack: list[tuple[Any, bool, int, str | None]] = [(tree, False, 0, None)]
    saw_registry = False
    while stack:
        node, tunnelled, depth, root = stack.pop()
        if depth > MAX_DEPTH:
            raise HostError(f"{origin}: registry nested deeper than {MAX_DEPTH} levels")
        if isinstance(node, list):
            stack.extend((n, tunnelled, depth + 1, root) for n in reversed(node))
            continue
        if not isinstance(node, dict):
            continue
        if KEY_CLASS in node or KEY_NAME in node:
            saw_registry = True
        is_pci = node.get(KEY_CLASS) == PCI_DEVICE_CLASS
        below = root
        if is_pci:
            tunnelled = tunnelled or node.get(KEY_TUNNELLED) is True
            yield _Entry(node, tunnelled, root)
            name = node.get(KEY_NAME)
            if below is None and isinstance(name, str) and name:
                below = name
        children = node.get(KEY_CHILDREN, [])
        if not isinstance(children, list):
            raise HostError(f"{origin}: {KEY_CHILDREN} is not an array")
        stack.extend((c, tunnelled, depth + 1, below) for c in reversed(children))
    if not saw_registry:
        raise HostError(
            f"{origin}: no IORegistry entries in this plist (is it from another tool?); "
            "save one with `ioreg -a -l > FILE`"
        )


def _data(props: dict[str, Any], key: str, entry: str, origin: str, *, size: int) -> bytes | None:
    value = props.get(key)
    if value is None:
        return None
    if not isinstance(value, bytes):
        raise HostError(f"{origin}: {entry}: {key} is {type(value).__name__}, expected data")
    if len(value) < size:
        raise HostError(f"{origin}: {entry}: {key} has {len(value)} bytes, expected {size}")
    return value


def _int_le(raw: bytes, size: int) -> int:
    return int.from_bytes(raw[:size], "little")


def _cstring(value: Any) -> str | None:
    if isinstance(value, bytes):
        text = value.split(b"\0", 1)[0].decode("utf-8", "replace")
    elif isinstance(value, str):
        text = value
    else:
        return None
    text = "".join(ch for ch in text if ch.isprintable())
    return text or None


def parse_pcidebug(text: str) -> tuple[int, int, int]:
    """``"bus:dev:func"`` in decimal, optionally ``"(seg:link)"`` after; ValueError if not."""
    m = _PCIDEBUG_RE.match(text)
    if m is None:
        raise ValueError(f"pcidebug {text!r} is not bus:dev:func")
    bus, dev, fn = int(m[1]), int(m[2]), int(m[3])
    if bus > MAX_BUS or dev > MAX_DEVICE or fn > MAX_FUNCTION:
        raise ValueError(f"pcidebug {text!r} is out of PCI range")
    return bus, dev, fn


def _link(props: dict[str, Any], entry: str, origin: str) -> PcieLink | None:
    status, caps = props.get(KEY_LINK_STATUS), props.get(KEY_LINK_CAPS)
    if status is None and caps is None:
        return None
    for key, v in ((KEY_LINK_STATUS, status), (KEY_LINK_CAPS, caps)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**32):
            raise HostError(f"{origin}: {entry}: {key} is not a 32-bit number")

    def split(reg: int | None) -> tuple[float | None, int | None]:
        if reg is None:
            return None, None
        width = (reg >> LINK_WIDTH_SHIFT) & LINK_WIDTH_MASK
        return LINK_SPEEDS_GTS.get(reg & LINK_SPEED_MASK), width or None

    speed, width = split(status)
    max_speed, max_width = split(caps)
    return PcieLink(speed, width, max_speed, max_width)


def _bar_registers(raw: bytes | None, entry: str, key: str, origin: str) -> dict[int, int]:
    """BAR index -> size from Open Firmware cells (``reg`` or ``assigned-addresses``)."""
    if raw is None:
        return {}
    if len(raw) % OF_CELL.size:
        raise HostError(
            f"{origin}: {entry}: {key} is {len(raw)} bytes, not a multiple of {OF_CELL.size}"
        )
    bars: dict[int, int] = {}
    for hi, _mid, _lo, size_hi, size_lo in OF_CELL.iter_unpack(raw):
        offset = hi & OF_REGISTER_MASK
        index, rem = divmod(offset - BAR0_OFFSET, BAR_STRIDE)
        if rem == 0 and 0 <= index < BAR_COUNT:
            bars[index] = (size_hi << 32) | size_lo
    return bars


def _driver(props: dict[str, Any], bundle_id: str) -> tuple[str | None, bool]:
    """The claiming driver's name, and whether it is the passthrough DriverKit extension."""
    first: str | None = None
    for child in props.get(KEY_CHILDREN, []):
        if not isinstance(child, dict) or child.get(KEY_CLASS) == PCI_DEVICE_CLASS:
            continue
        name = child.get(KEY_NAME)
        cls = child.get(KEY_CLASS)
        label = name if isinstance(name, str) and name else cls if isinstance(cls, str) else None
        if child.get(KEY_BUNDLE) == bundle_id or DEXT_NAME in (name, cls):
            return DEXT_NAME, True
        if first is None and label:
            first = label
    return first, False


def _root_name(name: str | None) -> str | None:
    """A root-port name fit for ``host-root=`` and ``ROOT/BB:DD``: printable, no separators."""
    if name is None:
        return None
    clean = "".join(ch for ch in name if ch.isprintable())
    return clean if clean and ROOT_NAME_RE.match(clean) else None


def _device(e: _Entry, bundle_id: str, origin: str) -> PciDevice | None:
    p = e.props
    pcidebug = p.get("pcidebug")
    regname = p.get(KEY_NAME) if isinstance(p.get(KEY_NAME), str) else "IOPCIDevice"
    if pcidebug is None:
        return None  # no bus address to pass through: nothing a user could name
    if not isinstance(pcidebug, str):
        raise HostError(f"{origin}: {regname}: pcidebug is not a string")
    try:
        bus, dev, fn = parse_pcidebug(pcidebug)
    except ValueError as err:
        raise HostError(f"{origin}: {regname}: {err}") from err
    entry = f"{regname} at {bus:02x}:{dev:02x}.{fn:x}"
    vendor = _data(p, "vendor-id", entry, origin, size=2)
    device = _data(p, "device-id", entry, origin, size=2)
    if vendor is None or device is None:
        raise HostError(f"{origin}: {entry}: vendor-id or device-id missing")
    cls = _data(p, "class-code", entry, origin, size=3)
    class_code = _int_le(cls, 4) & 0xFFFFFF if cls is not None else 0
    name = _cstring(p.get("name")) or _cstring(p.get(KEY_NAME)) or "?"
    driver, bound = _driver(p, bundle_id)
    requested = _bar_registers(_data(p, "reg", entry, origin, size=0), entry, "reg", origin)
    assigned = _bar_registers(
        _data(p, "assigned-addresses", entry, origin, size=0), entry, "assigned-addresses", origin
    )
    unassigned = tuple(sorted(i for i, size in requested.items() if size and i not in assigned))
    ready, why = readiness(
        platform="macos", class_code=class_code, driver=driver, bound=bound,
        unassigned_bars=unassigned,
    )
    return PciDevice(
        address=PciAddress(0, bus, dev, fn),
        vendor_id=_int_le(vendor, 2),
        device_id=_int_le(device, 2),
        class_code=class_code,
        name=name,
        driver=driver,
        passthrough_ready=ready,
        why_not=why,
        link=_link(p, entry, origin),
        unassigned_bars=unassigned,
        thunderbolt=e.tunnelled,
        root=_root_name(e.root),
    )


def parse_ioreg(
    data: bytes, *, bundle_id: str = DEFAULT_DEXT_BUNDLE_ID, origin: str = "ioreg"
) -> list[PciDevice]:
    """Every PCI function in an ``ioreg -a -l`` dump, sorted by address, deduplicated."""
    tree = load_plist(data, origin)
    seen: dict[object, PciDevice] = {}
    for entry in _walk(tree, origin):
        d = _device(entry, bundle_id, origin)
        if d is None:
            continue
        # `ioreg -r` may print a nested match twice (in its parent's subtree and on its own):
        # the registry entry id tells copies apart from distinct devices that share a
        # bus:dev.func under different root ports (Apple Silicon has several bus-0 roots).
        rid = entry.props.get(KEY_ENTRY_ID)
        key: object = rid if isinstance(rid, int) else (d.address, d.vendor_id, d.device_id, d.name)
        old = seen.get(key)
        if old is None or (d.root and not old.root) or (
            d.root == old.root
            and ((d.driver and not old.driver) or (d.thunderbolt and not old.thunderbolt))
        ):
            seen[key] = d
    return sorted(seen.values(), key=lambda d: (d.address, d.root or ""))


def read_live_ioreg() -> bytes:
    """Run ``ioreg`` on this Mac and return its plist output."""
    try:
        proc = subprocess.run(
            list(IOREG_ARGV), capture_output=True, timeout=IOREG_TIMEOUT_S,
            stdin=subprocess.DEVNULL, check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise HostError(f"cannot run ioreg: {e}") from e
    if proc.returncode != 0:
        msg = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise HostError(f"ioreg failed: {msg[-1] if msg else f'exit {proc.returncode}'}")
    return proc.stdout
