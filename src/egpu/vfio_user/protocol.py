"""vfio-user wire format: command numbers, structs and flags, declared once (pure, no I/O).

Source: QEMU docs/interop/vfio-user.rst and linux/vfio.h. All integers are little-endian (the
spec says host order; every platform egpu runs on is little-endian).
"""

from __future__ import annotations

import enum
import errno
import json
import struct
from dataclasses import dataclass

# -- header --------------------------------------------------------------------------------

HEADER = struct.Struct("<HHIII")  # msg_id, command, size (incl. header), flags, errno
HEADER_SIZE = HEADER.size

FLAG_TYPE_MASK = 0xF
TYPE_COMMAND = 0x0
TYPE_REPLY = 0x1
FLAG_NO_REPLY = 1 << 4
FLAG_ERROR = 1 << 5
KNOWN_HEADER_FLAGS = FLAG_TYPE_MASK | FLAG_NO_REPLY | FLAG_ERROR


class Command(enum.IntEnum):
    """vfio-user command numbers."""

    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


@dataclass(frozen=True)
class Header:
    """A decoded message header."""

    msg_id: int
    command: int
    size: int
    flags: int
    error: int = 0

    @property
    def is_reply(self) -> bool:
        """True for a reply message."""
        return self.flags & FLAG_TYPE_MASK == TYPE_REPLY

    @property
    def no_reply(self) -> bool:
        """True when the sender asked for no reply."""
        return bool(self.flags & FLAG_NO_REPLY)

    def pack(self) -> bytes:
        """The 16 header bytes."""
        return HEADER.pack(self.msg_id, self.command, self.size, self.flags, self.error)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> Header:
        """Decode the first 16 bytes of ``data``."""
        return cls(*HEADER.unpack_from(data))


def reply_header(msg_id: int, command: int, payload_size: int) -> bytes:
    """Header bytes of a successful reply carrying ``payload_size`` bytes."""
    return HEADER.pack(msg_id, command, HEADER_SIZE + payload_size, TYPE_REPLY, 0)


def error_header(msg_id: int, command: int, error: int) -> bytes:
    """Header bytes of an error reply (no payload, per the spec)."""
    return HEADER.pack(msg_id, command, HEADER_SIZE, TYPE_REPLY | FLAG_ERROR, error)


def command_header(msg_id: int, command: int, payload_size: int) -> bytes:
    """Header bytes of a server-to-client command (DMA_READ / DMA_WRITE)."""
    return HEADER.pack(msg_id, command, HEADER_SIZE + payload_size, TYPE_COMMAND, 0)


# -- payload structs -------------------------------------------------------------------------

VERSION = struct.Struct("<HH")  # major, minor; then NUL-terminated JSON
DMA_MAP = struct.Struct("<IIQQQ")  # argsz, flags, offset, address, size
DMA_UNMAP = struct.Struct("<IIQQ")  # argsz, flags, address, size
DEVICE_INFO = struct.Struct("<IIII")  # argsz, flags, num_regions, num_irqs
REGION_INFO = struct.Struct("<IIIIQQ")  # argsz, flags, index, cap_offset, size, offset
CAP_HEADER = struct.Struct("<HHI")  # id, version, next
SPARSE_MMAP = struct.Struct("<II")  # nr_areas, reserved
SPARSE_AREA = struct.Struct("<QQ")  # offset, size
REGION_IO_FDS = struct.Struct("<IIII")  # argsz, flags, index, count
IRQ_INFO = struct.Struct("<IIII")  # argsz, flags, index, count
IRQ_SET = struct.Struct("<IIIII")  # argsz, flags, index, start, count
REGION_ACCESS = struct.Struct("<QII")  # offset, region, count
DMA_ACCESS = struct.Struct("<QQ")  # address, count
WRITE_MULTI_COUNT = struct.Struct("<Q")
WRITE_MULTI_ENTRY = struct.Struct("<QII8s")  # offset, region, count, data (<= 8 bytes)
DEVICE_FEATURE = struct.Struct("<II")  # argsz, flags

WRITE_MULTI_MAX_DATA = 8

# VFIO_USER_VERSION
PROTOCOL_MAJOR = 0
PROTOCOL_MINOR = 0
DEFAULT_MAX_MSG_FDS = 1
DEFAULT_MAX_DATA_XFER_SIZE = 1 << 20
DEFAULT_MAX_DMA_MAPS = 65535
DEFAULT_PGSIZES = 4096

# DMA_MAP flags
DMA_FLAG_READ = 1 << 0
DMA_FLAG_WRITE = 1 << 1
DMA_MAP_KNOWN_FLAGS = DMA_FLAG_READ | DMA_FLAG_WRITE

# DMA_UNMAP flags (linux/vfio.h; the dirty-bitmap flag 1 is not supported)
DMA_UNMAP_FLAG_ALL = 1 << 1

# DEVICE_GET_INFO flags (linux/vfio.h)
DEVICE_FLAGS_RESET = 1 << 0
DEVICE_FLAGS_PCI = 1 << 1

# DEVICE_GET_REGION_INFO flags and capabilities
REGION_FLAG_READ = 1 << 0
REGION_FLAG_WRITE = 1 << 1
REGION_FLAG_MMAP = 1 << 2
REGION_FLAG_CAPS = 1 << 3
REGION_CAP_SPARSE_MMAP = 1
REGION_CAP_SPARSE_MMAP_VERSION = 1

# DEVICE_GET_IRQ_INFO flags
IRQ_INFO_EVENTFD = 1 << 0
IRQ_INFO_MASKABLE = 1 << 1
IRQ_INFO_AUTOMASKED = 1 << 2
IRQ_INFO_NORESIZE = 1 << 3

# DEVICE_SET_IRQS flags
IRQ_SET_DATA_NONE = 1 << 0
IRQ_SET_DATA_BOOL = 1 << 1
IRQ_SET_DATA_EVENTFD = 1 << 2
IRQ_SET_ACTION_MASK = 1 << 3
IRQ_SET_ACTION_UNMASK = 1 << 4
IRQ_SET_ACTION_TRIGGER = 1 << 5
IRQ_SET_DATA_MASK = IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL | IRQ_SET_DATA_EVENTFD
IRQ_SET_ACTION_MASK_ALL = IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK | IRQ_SET_ACTION_TRIGGER

# DEVICE_FEATURE flags
FEATURE_INDEX_MASK = 0xFFFF
FEATURE_GET = 1 << 16
FEATURE_SET = 1 << 17
FEATURE_PROBE = 1 << 18
FEATURE_KNOWN_FLAGS = FEATURE_INDEX_MASK | FEATURE_GET | FEATURE_SET | FEATURE_PROBE


class ProtocolError(Exception):
    """A request the server refuses; ``errno`` goes into the error reply."""

    def __init__(self, errno_value: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno_value


class ConnectionFault(Exception):
    """The stream can no longer be trusted (bad framing); the server closes the connection."""


# -- capabilities (VERSION JSON) -------------------------------------------------------------


@dataclass(frozen=True)
class Capabilities:
    """The limits one side of a connection announces in VERSION."""

    max_msg_fds: int = DEFAULT_MAX_MSG_FDS
    max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE
    max_dma_maps: int = DEFAULT_MAX_DMA_MAPS
    pgsizes: int = DEFAULT_PGSIZES
    write_multiple: bool = False

    def to_json(self) -> bytes:
        """The NUL-terminated JSON version data announcing these capabilities."""
        caps = {
            "max_msg_fds": self.max_msg_fds,
            "max_data_xfer_size": self.max_data_xfer_size,
            "max_dma_maps": self.max_dma_maps,
            "pgsizes": self.pgsizes,
            "write_multiple": self.write_multiple,
        }
        return json.dumps({"capabilities": caps}, separators=(",", ":")).encode() + b"\0"


_CAP_LIMIT = 1 << 32


def parse_capabilities(data: bytes) -> Capabilities:
    """Decode a peer's VERSION JSON (optional, NUL-terminated); raises ProtocolError(EINVAL)."""
    text = data.split(b"\0", 1)[0]
    if not text.strip():
        return Capabilities()
    try:
        doc = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ProtocolError(errno.EINVAL, f"VERSION data is not JSON: {e}") from e
    if not isinstance(doc, dict):
        raise ProtocolError(errno.EINVAL, "VERSION data is not a JSON object")
    caps = doc.get("capabilities", {})
    if not isinstance(caps, dict):
        raise ProtocolError(errno.EINVAL, "VERSION capabilities is not an object")

    def number(name: str, default: int, minimum: int) -> int:
        value = caps.get(name, default)
        if type(value) is not int or not minimum <= value < _CAP_LIMIT:
            raise ProtocolError(errno.EINVAL, f"VERSION capability {name} is invalid")
        return value

    write_multiple = caps.get("write_multiple", False)
    if type(write_multiple) is not bool:
        raise ProtocolError(errno.EINVAL, "VERSION capability write_multiple is not a boolean")
    return Capabilities(
        max_msg_fds=number("max_msg_fds", DEFAULT_MAX_MSG_FDS, 0),
        max_data_xfer_size=number("max_data_xfer_size", DEFAULT_MAX_DATA_XFER_SIZE, 1),
        max_dma_maps=number("max_dma_maps", DEFAULT_MAX_DMA_MAPS, 0),
        pgsizes=number("pgsizes", DEFAULT_PGSIZES, 1),
        write_multiple=write_multiple,
    )


# -- replies built from values ----------------------------------------------------------------


def pack_region_info(
    index: int,
    flags: int,
    size: int,
    offset: int,
    areas: tuple[tuple[int, int], ...],
    client_argsz: int,
) -> tuple[bytes, bool]:
    """REGION_INFO reply payload; returns (payload, caps_included).

    With sparse areas the full reply needs room for the capability; when the client's argsz is
    too small, the reply says how much is needed (argsz) without the capability, and the client
    asks again.
    """
    if not areas:
        return REGION_INFO.pack(REGION_INFO.size, flags, index, 0, size, offset), True
    cap = CAP_HEADER.pack(REGION_CAP_SPARSE_MMAP, REGION_CAP_SPARSE_MMAP_VERSION, 0)
    cap += SPARSE_MMAP.pack(len(areas), 0)
    cap += b"".join(SPARSE_AREA.pack(o, s) for o, s in areas)
    needed = REGION_INFO.size + len(cap)
    if client_argsz < needed:
        # No CAPS flag without the capability: QEMU rejects CAPS with cap_offset 0.
        return REGION_INFO.pack(needed, flags, index, 0, size, offset), False
    flags |= REGION_FLAG_CAPS
    return REGION_INFO.pack(needed, flags, index, REGION_INFO.size, size, offset) + cap, True
