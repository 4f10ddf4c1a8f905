"""Function 0 of the virtual eGPU: a display controller that Linux's ``bochs`` DRM driver binds.

It follows QEMU's "standard VGA" PCI interface (QEMU docs/specs/standard-vga.rst), which is what
drivers/gpu/drm/tiny/bochs.c programs:

- BAR0, prefetchable: the framebuffer (VRAM). It is a memfd given to the client as a
  sparse-mmap area covering the whole BAR, so guest pixel writes go straight to shared memory and
  never reach this process; the server reads the pixels from the same memory to render.
- BAR2, 4 KiB, trapped: 0x000 EDID blob (none here: the driver then offers its default modes),
  0x400 the VGA ioports 0x3c0-0x3df (the driver uses the attribute controller to blank), 0x500 the
  Bochs VBE "DISPI" registers (16-bit, index << 1), 0x600 the QEMU extension registers (size and
  framebuffer endianness).

Threat model: every register value is guest-controlled. Registers are stored masked to their
width; the scanout they describe is validated in one place (:func:`scanout_mode`) and clipped to
the VRAM, so a hostile mode can at worst produce a black or garbled picture, never a read outside
the framebuffer or an enormous allocation.

Screenshots: the server process renders on request (:func:`serve_screenshots`, SIGUSR1 plus a
request file); :func:`request_screenshot` is the client side the ``egpu screenshot`` command uses.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import os
import signal
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from egpu import atomic
from egpu.devices.base import (
    DeviceDescription,
    Interrupts,
    IrqIndex,
    IrqLine,
    MmapArea,
    PciFunction,
    RegionIndex,
)
from egpu.devices.options import DeviceOption, OptionType
from egpu.dma import GuestMemory
from egpu.errors import DeviceServerError, UsageError
from egpu.pci import BarKind, ConfigSpace
from egpu.process import ProcessRef, signal_process

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

# -- PCI identity (QEMU stdvga: the IDs bochs-drm matches) --------------------------------------

VENDOR_ID = 0x1234
DEVICE_ID = 0x1111
CLASS_VGA = 0x030000
REVISION = 2  # >= 2: the driver looks for the QEMU extension registers
VRAM_BAR = RegionIndex.BAR0
MMIO_BAR = RegionIndex.BAR2
MMIO_SIZE = 0x1000
DEFAULT_VRAM = 16 << 20
MIN_VRAM = 1 << 20
MAX_VRAM = 256 << 20
VRAM_UNIT = 64 << 10  # VIDEO_MEMORY_64K counts these

# -- BAR2 layout ---------------------------------------------------------------------------------

EDID_OFFSET, EDID_SIZE = 0x000, 0x400
VGA_OFFSET, VGA_SIZE = 0x400, 0x20  # ioports 0x3c0..0x3df
VGA_PORT_BASE = 0x3C0
DISPI_OFFSET = 0x500
QEXT_OFFSET = 0x600
QEXT_SIZE = 8
QEXT_REG_ENDIAN = 0x604
ENDIAN_LITTLE = 0x1E1E1E1E
ENDIAN_BIG = 0xBEBEBEBE

VGA_ATT_W = 0x3C0  # attribute controller index/data (one port, with a flip-flop)
VGA_MIS_R = 0x3CC
VGA_MIS_W = 0x3C2
VGA_IS1_RC = 0x3DA  # reading it resets the attribute flip-flop
VGA_ATT_PAS = 0x20  # "palette address source": set = the display shows the framebuffer

# -- DISPI registers (bochs vbe.h) -------------------------------------------------------------


class Dispi:
    """DISPI register indices."""

    ID = 0x0
    XRES = 0x1
    YRES = 0x2
    BPP = 0x3
    ENABLE = 0x4
    BANK = 0x5
    VIRT_WIDTH = 0x6
    VIRT_HEIGHT = 0x7
    X_OFFSET = 0x8
    Y_OFFSET = 0x9
    VIDEO_MEMORY_64K = 0xA
    COUNT = 0xB


DISPI_ID0 = 0xB0C0
DISPI_ID5 = 0xB0C5
DISPI_ENABLED = 0x01
DISPI_GETCAPS = 0x02
DISPI_LFB_ENABLED = 0x40
DISPI_NOCLEARMEM = 0x80
MAX_XRES = 16000
MAX_YRES = 12000
MAX_BPP = 32
SUPPORTED_BPP = (8, 15, 16, 24, 32)
BLANK_SIZE = (640, 480)


@dataclass(frozen=True)
class ScanoutMode:
    """What the display shows: ``width`` x ``height`` pixels of ``bpp`` starting at ``start``.

    ``pitch`` is the bytes from one line to the next; ``visible`` is False while blanked.
    """

    width: int
    height: int
    bpp: int
    pitch: int
    start: int
    big_endian: bool = False
    visible: bool = True


def scanout_mode(regs: tuple[int, ...], big_endian: bool, visible: bool) -> ScanoutMode | None:
    """The scanout the DISPI registers describe, or None when disabled or nonsensical."""
    if not regs[Dispi.ENABLE] & DISPI_ENABLED:
        return None
    bpp = regs[Dispi.BPP]
    width, height = regs[Dispi.XRES], regs[Dispi.YRES]
    if bpp not in SUPPORTED_BPP or not 0 < width <= MAX_XRES or not 0 < height <= MAX_YRES:
        return None
    bytes_pp = (bpp + 7) // 8
    virt_width = max(regs[Dispi.VIRT_WIDTH], width)
    pitch = virt_width * bytes_pp
    start = regs[Dispi.Y_OFFSET] * pitch + regs[Dispi.X_OFFSET] * bytes_pp
    return ScanoutMode(width, height, bpp, pitch, start, big_endian, visible)


_RAW_MODES = {32: ("BGRX", "XRGB"), 24: ("BGR", "RGB"), 16: ("BGR;16", "BGR;16"),
              15: ("BGR;15", "BGR;15")}


def render(vram: bytes | bytearray | memoryview | mmap.mmap, mode: ScanoutMode | None
           ) -> Image.Image:
    """The RGB picture of ``mode`` in ``vram`` (black when off or blanked; clipped to VRAM)."""
    # Pillow only where pictures are made: CLI commands that import this module rarely do
    from PIL import Image

    if mode is None:
        return Image.new("RGB", BLANK_SIZE)
    if not mode.visible:
        return Image.new("RGB", (mode.width, mode.height))
    bytes_pp = (mode.bpp + 7) // 8
    span = mode.pitch * (mode.height - 1) + mode.width * bytes_pp
    size = len(vram)
    # Copy what lies inside the VRAM (a snapshot: the guest keeps drawing) and pad the rest.
    end = min(mode.start + span, size)
    data = bytes(vram[mode.start:end]) if mode.start < size else b""
    data = data.ljust(span, b"\0")
    if mode.bpp == 8:
        # No palette is emulated (the bochs driver never uses 8 bpp): show indices as grey.
        grey = Image.frombuffer("L", (mode.width, mode.height), data, "raw", "L", mode.pitch, 1)
        return grey.convert("RGB")
    raw = _RAW_MODES[mode.bpp][1 if mode.big_endian else 0]
    image = Image.frombuffer("RGB", (mode.width, mode.height), data, "raw", raw, mode.pitch, 1)
    return image.copy()  # detach from ``data``


class DisplayRegisters:
    """The trapped register BAR: VGA ioports, DISPI and QEMU extension registers. Pure state."""

    def __init__(self, vram_size: int) -> None:
        self.vram_size = vram_size
        self.reset()

    def reset(self) -> None:
        """Power-on values: disabled, little-endian, blanked."""
        self.dispi = [0] * Dispi.COUNT
        self.dispi[Dispi.ID] = DISPI_ID5
        self.dispi[Dispi.BPP] = 8
        self.vga = bytearray(VGA_SIZE)
        self.attr_flip = False  # False: the next 0x3c0 write is an index
        self.attr_index = 0
        self.endian = ENDIAN_LITTLE
        self.clear_requests = 0  # ENABLE writes that asked for a cleared framebuffer

    # -- reads --------------------------------------------------------------------------------

    def read(self, offset: int, count: int) -> bytes:
        """``count`` bytes at ``offset`` of the register BAR (range already checked)."""
        return bytes(self._read_byte(offset + i) for i in range(count))

    def _read_byte(self, offset: int) -> int:
        if VGA_OFFSET <= offset < VGA_OFFSET + VGA_SIZE:
            port = VGA_PORT_BASE + offset - VGA_OFFSET
            if port == VGA_IS1_RC:
                self.attr_flip = False
                return 0
            if port == VGA_ATT_W:
                return self.attr_index
            if port == VGA_MIS_R:
                return self.vga[VGA_MIS_W - VGA_PORT_BASE]
            return self.vga[port - VGA_PORT_BASE]
        if DISPI_OFFSET <= offset < DISPI_OFFSET + 2 * Dispi.COUNT:
            value = self.dispi_read((offset - DISPI_OFFSET) >> 1)
            return value >> 8 if offset & 1 else value & 0xFF
        if QEXT_OFFSET <= offset < QEXT_OFFSET + QEXT_SIZE:
            word = QEXT_SIZE if offset < QEXT_REG_ENDIAN else self.endian
            return word >> (8 * (offset & 3)) & 0xFF
        return 0  # EDID (none) and unassigned space

    def dispi_read(self, index: int) -> int:
        """A DISPI register as the guest reads it."""
        if index == Dispi.VIDEO_MEMORY_64K:
            return self.vram_size // VRAM_UNIT
        if self.dispi[Dispi.ENABLE] & DISPI_GETCAPS:
            caps = {Dispi.XRES: MAX_XRES, Dispi.YRES: MAX_YRES, Dispi.BPP: MAX_BPP}
            if index in caps:
                return caps[index]
        return self.dispi[index]

    # -- writes -------------------------------------------------------------------------------

    def write(self, offset: int, data: bytes) -> None:
        """Apply a write of any width; DISPI registers take whole 16-bit values."""
        i = 0
        while i < len(data):
            pos = offset + i
            if DISPI_OFFSET <= pos < DISPI_OFFSET + 2 * Dispi.COUNT:
                index = (pos - DISPI_OFFSET) >> 1
                current = self.dispi[index]
                if pos & 1 == 0 and i + 1 < len(data):
                    value = data[i] | data[i + 1] << 8
                    i += 2
                elif pos & 1:
                    value = (current & 0xFF) | data[i] << 8
                    i += 1
                else:
                    value = (current & 0xFF00) | data[i]
                    i += 1
                self.dispi_write(index, value)
                continue
            if VGA_OFFSET <= pos < VGA_OFFSET + VGA_SIZE:
                self._vga_write(VGA_PORT_BASE + pos - VGA_OFFSET, data[i])
            elif pos == QEXT_REG_ENDIAN and len(data) - i >= 4:
                value = int.from_bytes(data[i:i + 4], "little")
                if value in (ENDIAN_LITTLE, ENDIAN_BIG):
                    self.endian = value
                else:
                    log.debug("display: ignored endianness value %#x", value)
                i += 4
                continue
            i += 1  # EDID, the read-only size register and unassigned space ignore writes

    def _vga_write(self, port: int, value: int) -> None:
        if port == VGA_ATT_W:
            # One port for index and data, alternating; only the index's PAS bit matters here.
            if not self.attr_flip:
                self.attr_index = value & 0x3F
            self.attr_flip = not self.attr_flip
            return
        self.vga[port - VGA_PORT_BASE] = value

    def dispi_write(self, index: int, value: int) -> None:
        """Store a DISPI register with the side effects of bochs/QEMU."""
        value &= 0xFFFF
        if index == Dispi.ID:
            if DISPI_ID0 <= value <= DISPI_ID5:
                self.dispi[Dispi.ID] = value
        elif index == Dispi.BPP:
            self.dispi[Dispi.BPP] = value or 8
        elif index == Dispi.ENABLE:
            was_enabled = self.dispi[Dispi.ENABLE] & DISPI_ENABLED
            self.dispi[Dispi.ENABLE] = value
            if value & DISPI_ENABLED and not was_enabled:
                # Entering a mode resets the virtual screen to the visible one (as QEMU does).
                bytes_pp = (self.dispi[Dispi.BPP] + 7) // 8
                xres = self.dispi[Dispi.XRES]
                self.dispi[Dispi.VIRT_WIDTH] = xres
                line = max(xres * bytes_pp, 1)
                self.dispi[Dispi.VIRT_HEIGHT] = min(self.vram_size // line, 0xFFFF)
                self.dispi[Dispi.X_OFFSET] = self.dispi[Dispi.Y_OFFSET] = 0
                if not value & DISPI_NOCLEARMEM:
                    self.clear_requests += 1
        elif index == Dispi.VIDEO_MEMORY_64K:
            pass  # read-only
        else:
            self.dispi[index] = value

    # -- state --------------------------------------------------------------------------------

    @property
    def visible(self) -> bool:
        """The attribute controller's PAS bit: False while the driver has blanked the screen."""
        return bool(self.attr_index & VGA_ATT_PAS)

    def mode(self) -> ScanoutMode | None:
        """The current scanout (see :func:`scanout_mode`)."""
        return scanout_mode(tuple(self.dispi), self.endian == ENDIAN_BIG, self.visible)


def check_vram_size(size: int) -> None:
    """A BAR is a power of two; the driver wants the whole console in it."""
    if not MIN_VRAM <= size <= MAX_VRAM or size & (size - 1):
        raise UsageError(f"VRAM size {size} must be a power of two of 1 MiB .. 256 MiB")


class Framebuffer:
    """VRAM in a memfd: the client mmaps it (guest writes land here), the server renders it."""

    def __init__(self, size: int) -> None:
        check_vram_size(size)
        self.size = size
        self.fd = os.memfd_create("egpu-vram", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self.map = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED)
        except OSError as e:
            os.close(self.fd)
            raise DeviceServerError(f"cannot allocate {size} bytes of VRAM: {e}") from e

    def clear(self) -> None:
        """Zero the whole VRAM."""
        self.map[:] = bytes(self.size)

    def close(self) -> None:
        """Release the mapping and the fd (idempotent)."""
        if self.fd >= 0:
            self.map.close()
            os.close(self.fd)
            self.fd = -1


class DisplayFunction(PciFunction):
    """The display as a vfio-user PCI function: BAR0 shared VRAM, BAR2 trapped registers."""

    def __init__(self, vram_size: int = DEFAULT_VRAM, *, multifunction: bool = True,
                 screenshot_request: Path | None = None) -> None:
        check_vram_size(vram_size)
        config = ConfigSpace(vendor_id=VENDOR_ID, device_id=DEVICE_ID, class_code=CLASS_VGA,
                             revision=REVISION, subsystem_vendor_id=0x1AF4, subsystem_id=0x1100,
                             multifunction=multifunction, interrupt_pin=0)
        config.add_bar(VRAM_BAR, vram_size, BarKind.MEM32, prefetchable=True)
        config.add_bar(MMIO_BAR, MMIO_SIZE, BarKind.MEM32)
        super().__init__(config)
        self.framebuffer = Framebuffer(vram_size)
        self.registers = DisplayRegisters(vram_size)
        self.screenshot_request = screenshot_request
        # Re-entrant: the screenshot signal handler runs on the server's thread, possibly while it
        # is inside a register write.
        self._lock = threading.RLock()
        self._last_visible: Image.Image | None = None

    def describe(self) -> DeviceDescription:
        """Config space, the mmappable VRAM BAR and the register BAR; ERR/REQ lines only."""
        fb = self.framebuffer
        return DeviceDescription(
            regions=(self.config_region(),
                     *self.bar_regions({VRAM_BAR: (fb.fd, (MmapArea(0, fb.size),))})),
            # ERR and REQ let QEMU set up its error-recovery and request notifiers (it warns
            # when a device has none); the display raises no interrupt.
            irqs=(IrqLine(IrqIndex.ERR, 1), IrqLine(IrqIndex.REQ, 1)),
        )

    def attach(self, memory: GuestMemory, interrupts: Interrupts) -> None:
        """Also start answering screenshot requests when a request path was configured."""
        super().attach(memory, interrupts)
        if self.screenshot_request is not None:
            serve_screenshots(self, self.screenshot_request)

    def bar_read(self, index: int, offset: int, count: int) -> bytes:
        """VRAM (when the client did not mmap it) or registers."""
        if index == VRAM_BAR:
            return bytes(self.framebuffer.map[offset:offset + count])
        if index == MMIO_BAR:
            with self._lock:
                return self.registers.read(offset, count)
        return bytes(count)

    def bar_write(self, index: int, offset: int, data: bytes) -> None:
        """VRAM (when the client did not mmap it) or registers."""
        if index == VRAM_BAR:
            self.framebuffer.map[offset:offset + len(data)] = data
        elif index == MMIO_BAR:
            with self._lock:
                clears = self.registers.clear_requests
                shown = self.registers.mode()
                self.registers.write(offset, data)
                self._remember_if_hidden(shown)
                if self.registers.clear_requests != clears:
                    self.framebuffer.clear()

    def _remember_if_hidden(self, shown: ScanoutMode | None) -> None:
        # A guest that shuts down blanks its display first (bochs' CRTC disable): keep the last
        # picture it showed so the host can still see what was drawn (a self-test's console).
        if shown is None or not shown.visible:
            return
        now = self.registers.mode()
        if now is None or not now.visible:
            self._last_visible = render(self.framebuffer.map, shown)

    def reset(self) -> None:
        """Device reset: registers to power-on values (VRAM content stays, as on hardware)."""
        super().reset()
        with self._lock:
            shown = self.registers.mode()
            self.registers.reset()
            self._remember_if_hidden(shown)

    def mode(self) -> ScanoutMode | None:
        """The current scanout."""
        with self._lock:
            return self.registers.mode()

    def screenshot(self, last_visible: bool = False) -> Image.Image:
        """What the guest shows now, as an RGB image.

        With ``last_visible``, a display that is off or blanked gives instead the last picture it
        showed before that (when there was one): what a guest drew before it shut down.
        """
        with self._lock:
            mode = self.registers.mode()
            if last_visible and (mode is None or not mode.visible) and self._last_visible:
                return self._last_visible.copy()
            return render(self.framebuffer.map, mode)

    def write_screenshot(self, path: Path, last_visible: bool = False) -> None:
        """Write the picture (see :meth:`screenshot`) as PNG to ``path``, atomically.

        Only a regular file is replaced: renaming over a device node, FIFO or socket (say
        /dev/null, as root) would put a PNG where the system expects that node.
        """
        if not replaceable(path):
            raise DeviceServerError(f"screenshot path {path} is not a regular file")
        try:
            with atomic.replacing(path, mode=SCREENSHOT_MODE) as f:
                self.screenshot(last_visible).save(f, format="PNG")
                if not replaceable(path):  # it appeared meanwhile
                    raise DeviceServerError(f"screenshot path {path} is not a regular file")
        except OSError as e:
            raise DeviceServerError(f"cannot write screenshot {path}: {e.strerror}") from e


def replaceable(path: Path) -> bool:
    """Whether a screenshot may be written to ``path``: nothing there yet, or a regular file."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except FileNotFoundError:
        return True
    except OSError:
        return False


VRAM = DeviceOption("vram", OptionType.SIZE, DEFAULT_VRAM, "video memory (BAR0), a power of two",
                    minimum=MIN_VRAM, maximum=MAX_VRAM)
MULTIFUNCTION = DeviceOption("multifunction", OptionType.BOOL, True,
                             "set the multifunction bit of the PCI header (function 0 of a card)")
SCREENSHOT_REQUEST = DeviceOption(
    "screenshot_request", OptionType.PATH, None,
    "request file through which `egpu screenshot` asks this server for a PNG")
OPTIONS = (VRAM, MULTIFUNCTION, SCREENSHOT_REQUEST)


def create(vram: int = DEFAULT_VRAM, multifunction: bool = True,
           screenshot_request: Path | None = None) -> DisplayFunction:
    """Build the display function from parsed :data:`OPTIONS`."""
    return DisplayFunction(vram, multifunction=multifunction,
                           screenshot_request=screenshot_request)


# -- screenshot requests between processes -------------------------------------------------------
#
# Protocol: the client writes the absolute output path into ``<request>`` (atomically; a second
# line ``last-visible`` asks for :meth:`DisplayFunction.screenshot`'s last_visible), then sends
# SCREENSHOT_SIGNAL to the server. The server renders to that path and replaces ``<request>``'s
# sibling ``<request>.done`` with "ok" or "error: <message>", then removes ``<request>``. A lock
# file ``<request>.lock`` serialises clients. Signals are coalesced by the kernel, which is fine:
# one pending request file means one screenshot.

SCREENSHOT_SIGNAL = signal.SIGUSR1
SCREENSHOT_MODE = 0o644  # what a file written under the usual umask (022) gets
SCREENSHOT_POLL = 0.02
LAST_VISIBLE = "last-visible"
REQUEST_LINE_END = b"\n"


def _done_path(request: Path) -> Path:
    return request.with_name(request.name + ".done")


def answer_screenshot_request(function: DisplayFunction, request: Path) -> None:
    """Serve the pending request at ``request`` (called from the signal handler)."""
    try:
        # bytes split at "\n" only: a file name may hold any other byte (str.splitlines
        # also splits at \x1c, \x85, ...; a path need not be UTF-8)
        lines = request.read_bytes().split(REQUEST_LINE_END)
    except OSError:
        return  # no request pending (a stray signal)
    try:
        target = Path(os.fsdecode(lines[0]))
        last_visible = LAST_VISIBLE.encode() in lines[1:]
        if not target.is_absolute():
            raise DeviceServerError(f"screenshot path {target} is not absolute")
        function.write_screenshot(target, last_visible=last_visible)
        answer = "ok"
    except DeviceServerError as e:
        answer = f"error: {e}"
    done = _done_path(request)
    tmp = done.with_name(done.name + ".tmp")
    try:
        # the message may quote a file name that is not UTF-8
        tmp.write_text(answer + "\n", encoding="utf-8", errors="backslashreplace")
        os.replace(tmp, done)
        request.unlink()
    except OSError as e:
        log.warning("display: cannot answer screenshot request %s: %s", request, e)


def serve_screenshots(function: DisplayFunction, request: Path) -> None:
    """Install the SCREENSHOT_SIGNAL handler for ``request`` (must run in the main thread)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        answer_screenshot_request(function, request)

    try:
        signal.signal(SCREENSHOT_SIGNAL, handler)
    except ValueError:
        log.warning("display: screenshots unavailable (server not in the main thread)")


def request_screenshot(server: ProcessRef | None, request: Path, output: Path,
                       timeout: float = 10.0, *, last_visible: bool = False) -> None:
    """Ask the display server ``server`` (verified first) to write a PNG to ``output``; waits.

    ``last_visible``: when the guest display is off or blanked now (a guest that powered off),
    get the last picture it showed instead of black.
    """
    output = output.resolve()
    name = os.fsencode(output)
    if REQUEST_LINE_END in name:
        raise UsageError(f"screenshot path {str(output)!r} holds a line break")
    lock_path = request.with_name(request.name + ".lock")
    try:
        lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise DeviceServerError(f"cannot open {lock_path}: {e.strerror}") from e
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        done = _done_path(request)
        with contextlib.suppress(FileNotFoundError):
            done.unlink()
        tmp = request.with_name(request.name + ".tmp")
        flag = LAST_VISIBLE.encode() if last_visible else b""
        tmp.write_bytes(name + REQUEST_LINE_END + flag + REQUEST_LINE_END)
        os.replace(tmp, request)
        if not signal_process(server, SCREENSHOT_SIGNAL):
            request.unlink()
            pid = f" (pid {server.pid})" if server else ""
            raise DeviceServerError(f"the display server{pid} is not running")
        deadline = time.monotonic() + timeout
        while not done.exists():
            if time.monotonic() > deadline:
                with contextlib.suppress(FileNotFoundError):
                    request.unlink()
                raise DeviceServerError("the display server did not answer the screenshot "
                                        f"request within {timeout:g} s")
            time.sleep(SCREENSHOT_POLL)
        answer = done.read_text(encoding="utf-8", errors="replace").strip()
        done.unlink()
        if answer != "ok":
            raise DeviceServerError(answer.removeprefix("error: "))
    finally:
        os.close(lock_fd)


def is_blank(image: Image.Image) -> bool:
    """True when every pixel has the same colour (nothing drawn)."""
    extrema = image.getextrema()
    return all(low == high for low, high in extrema)  # type: ignore[misc]

