"""The display function: DISPI/VGA register semantics as the bochs driver uses them, rendering,
hostile register values, and the screenshot request protocol."""

from __future__ import annotations

import os
import signal
import struct
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from egpu.devices import create_device
from egpu.devices.base import IrqIndex, RegionIndex
from egpu.devices.display import (
    DISPI_ENABLED,
    DISPI_LFB_ENABLED,
    DISPI_OFFSET,
    ENDIAN_BIG,
    MMIO_BAR,
    MMIO_SIZE,
    QEXT_OFFSET,
    SCREENSHOT_SIGNAL,
    VGA_OFFSET,
    Dispi,
    DisplayFunction,
    DisplayRegisters,
    ScanoutMode,
    is_blank,
    render,
    request_screenshot,
    serve_screenshots,
)
from egpu.errors import DeviceServerError, UsageError
from egpu.process import ProcessRef

VRAM = 16 << 20


def dispi_write(fn: DisplayFunction, index: int, value: int) -> None:
    fn.bar_write(MMIO_BAR, DISPI_OFFSET + 2 * index, struct.pack("<H", value))


def dispi_read(fn: DisplayFunction, index: int) -> int:
    value: int = struct.unpack("<H", fn.bar_read(MMIO_BAR, DISPI_OFFSET + 2 * index, 2))[0]
    return value


def vga_write(fn: DisplayFunction, port: int, value: int) -> None:
    fn.bar_write(MMIO_BAR, VGA_OFFSET + port - 0x3C0, bytes([value]))


def vga_read(fn: DisplayFunction, port: int) -> int:
    return fn.bar_read(MMIO_BAR, VGA_OFFSET + port - 0x3C0, 1)[0]


def bochs_modeset(fn: DisplayFunction, width: int, height: int) -> None:
    """What bochs.c does: bochs_hw_setmode, bochs_hw_setbase(0), unblank."""
    dispi_write(fn, Dispi.ENABLE, 0)
    dispi_write(fn, Dispi.BPP, 32)
    dispi_write(fn, Dispi.XRES, width)
    dispi_write(fn, Dispi.YRES, height)
    dispi_write(fn, Dispi.BANK, 0)
    dispi_write(fn, Dispi.VIRT_WIDTH, width)
    dispi_write(fn, Dispi.VIRT_HEIGHT, (VRAM // (width * 4)) & 0xFFFF)  # u16 in bochs.c too
    dispi_write(fn, Dispi.X_OFFSET, 0)
    dispi_write(fn, Dispi.Y_OFFSET, 0)
    dispi_write(fn, Dispi.ENABLE, DISPI_ENABLED | DISPI_LFB_ENABLED)
    vga_write(fn, 0x3C2, 0x01)  # VGA_MIS_W colour
    vga_read(fn, 0x3DA)  # reset the attribute flip-flop
    vga_write(fn, 0x3C0, 0x20)  # unblank


@pytest.fixture
def fn() -> Iterator[DisplayFunction]:
    f = DisplayFunction(VRAM)
    yield f
    f.framebuffer.close()


def test_identity_and_probe_registers(fn: DisplayFunction) -> None:
    cfg = fn.config
    assert (cfg.u16(0), cfg.u16(2)) == (0x1234, 0x1111)
    assert cfg.u32(0x08) >> 8 == 0x030000 and cfg.u8(0x08) >= 2
    assert cfg.bars[0].size == VRAM and cfg.bars[0].prefetchable
    assert cfg.bars[2].size == MMIO_SIZE
    assert dispi_read(fn, Dispi.ID) & 0xFFF0 == 0xB0C0
    assert dispi_read(fn, Dispi.VIDEO_MEMORY_64K) * 64 * 1024 == VRAM  # must equal the BAR
    assert struct.unpack("<I", fn.bar_read(MMIO_BAR, QEXT_OFFSET, 4))[0] == 8
    assert fn.bar_read(MMIO_BAR, 0, 8) == bytes(8)  # no EDID header: default modes


def test_description_shares_the_framebuffer(fn: DisplayFunction) -> None:
    desc = fn.describe()
    vram = desc.region(RegionIndex.BAR0)
    regs = desc.region(RegionIndex.BAR2)
    assert vram is not None and vram.shm_fd == fn.framebuffer.fd
    assert vram.sparse_areas()[0].offset == 0 and vram.sparse_areas()[0].size == VRAM
    assert regs is not None and not regs.mappable
    assert desc.irq_count(IrqIndex.MSIX) == 0 and desc.irq_count(IrqIndex.INTX) == 0


def test_bochs_modeset_gives_the_scanout(fn: DisplayFunction) -> None:
    assert fn.mode() is None
    bochs_modeset(fn, 1024, 768)
    assert fn.mode() == ScanoutMode(1024, 768, 32, 4096, 0)
    # bochs_hw_setbase with a y offset (page flip) and the big-endian format
    dispi_write(fn, Dispi.Y_OFFSET, 768)
    fn.bar_write(MMIO_BAR, QEXT_OFFSET + 4, struct.pack("<I", ENDIAN_BIG))
    assert fn.mode() == ScanoutMode(1024, 768, 32, 4096, 768 * 4096, big_endian=True)


def test_blanking_through_the_attribute_controller(fn: DisplayFunction) -> None:
    bochs_modeset(fn, 640, 480)
    vga_read(fn, 0x3DA)
    vga_write(fn, 0x3C0, 0x00)  # blank
    mode = fn.mode()
    assert mode is not None and not mode.visible
    vga_write(fn, 0x3C0, 0x55)  # a data write (flip-flop) does not unblank
    mode = fn.mode()
    assert mode is not None and not mode.visible
    vga_read(fn, 0x3DA)
    vga_write(fn, 0x3C0, 0x20)
    mode = fn.mode()
    assert mode is not None and mode.visible


def test_enable_clears_vram_unless_asked_not_to(fn: DisplayFunction) -> None:
    fn.framebuffer.map[0:4] = b"\xff" * 4
    dispi_write(fn, Dispi.ENABLE, DISPI_ENABLED | 0x80)  # NOCLEARMEM
    assert fn.framebuffer.map[0:4] == b"\xff" * 4
    dispi_write(fn, Dispi.ENABLE, 0)
    dispi_write(fn, Dispi.ENABLE, DISPI_ENABLED)
    assert fn.framebuffer.map[0:4] == bytes(4)


def test_getcaps_and_read_only_registers(fn: DisplayFunction) -> None:
    dispi_write(fn, Dispi.ENABLE, 0x02)
    assert dispi_read(fn, Dispi.XRES) == 16000 and dispi_read(fn, Dispi.BPP) == 32
    dispi_write(fn, Dispi.VIDEO_MEMORY_64K, 1)
    assert dispi_read(fn, Dispi.VIDEO_MEMORY_64K) == VRAM >> 16
    dispi_write(fn, Dispi.ID, 0x1234)
    assert dispi_read(fn, Dispi.ID) == 0xB0C5


def test_render_32bpp_both_byte_orders(fn: DisplayFunction) -> None:
    bochs_modeset(fn, 4, 2)
    # pixel (0,0) red, (1,0) green, (0,1) blue in XRGB8888 little-endian: bytes B, G, R, X
    fb = fn.framebuffer.map
    fb[0:4] = bytes([0, 0, 255, 0])
    fb[4:8] = bytes([0, 255, 0, 0])
    fb[16:20] = bytes([255, 0, 0, 0])
    image = fn.screenshot()
    assert image.size == (4, 2)
    assert image.getpixel((0, 0)) == (255, 0, 0)
    assert image.getpixel((1, 0)) == (0, 255, 0)
    assert image.getpixel((0, 1)) == (0, 0, 255)
    big = render(fb, ScanoutMode(4, 2, 32, 16, 0, big_endian=True))
    assert big.getpixel((0, 0)) == (0, 255, 0)  # bytes X R G B: R=0, G=255, B=0


def test_render_other_depths_pitch_and_offset() -> None:
    vram = bytearray(4096)
    struct.pack_into("<HH", vram, 100, 0xF800, 0x001F)  # 565 red, blue at line 1 (pitch 96)
    image = render(vram, ScanoutMode(2, 2, 16, 96, 4))
    assert image.getpixel((0, 1)) == (255, 0, 0)
    assert image.getpixel((1, 1)) == (0, 0, 255)
    vram[0:3] = bytes([1, 2, 3])
    assert render(vram, ScanoutMode(1, 1, 24, 3, 0)).getpixel((0, 0)) == (3, 2, 1)
    assert render(vram, ScanoutMode(1, 1, 8, 1, 0)).getpixel((0, 0)) == (1, 1, 1)


def test_render_clips_to_vram_and_blank_states() -> None:
    vram = b"\xff" * 64
    image = render(vram, ScanoutMode(4, 4, 32, 16, 32))  # half the lines lie past the end
    assert image.getpixel((0, 1)) == (255, 255, 255)
    assert image.getpixel((0, 2)) == (0, 0, 0)
    assert is_blank(render(vram, None))
    assert is_blank(render(vram, ScanoutMode(4, 4, 32, 16, 0, visible=False)))
    assert not is_blank(image)


@given(writes=st.lists(st.tuples(st.integers(0, MMIO_SIZE - 1), st.binary(min_size=1,
                                                                           max_size=8)),
                       max_size=30))
def test_hostile_register_writes_keep_the_scanout_sane(writes: list[tuple[int, bytes]]) -> None:
    regs = DisplayRegisters(1 << 20)
    for offset, data in writes:
        regs.write(offset, data[: MMIO_SIZE - offset])
        regs.read(offset, min(8, MMIO_SIZE - offset))
    assert all(0 <= v <= 0xFFFF for v in regs.dispi)
    mode = regs.mode()
    vram = bytes(1 << 20)
    image = render(vram, mode)
    if mode is not None:
        assert mode.width <= 16000 and mode.height <= 12000
        assert image.size == (mode.width, mode.height)


def test_create_options() -> None:
    f = create_device("display", {"vram": "8M"})
    assert isinstance(f, DisplayFunction)
    try:
        assert f.framebuffer.size == 8 << 20
    finally:
        f.framebuffer.close()
    with pytest.raises(UsageError, match="power of two"):
        create_device("display", {"vram": "3M"})
    with pytest.raises(UsageError, match="out of range"):
        create_device("display", {"vram": "512M"})
    with pytest.raises(UsageError, match=r"unknown display option\(s\): depth"):
        create_device("display", {"depth": "3"})


def test_screenshot_request_round_trip(fn: DisplayFunction, tmp_path: Path) -> None:
    bochs_modeset(fn, 64, 48)
    fn.framebuffer.map[0:4 * 64] = bytes([0, 0, 255, 0]) * 64  # a red first line
    request = tmp_path / "screenshot.request"
    previous = signal.getsignal(SCREENSHOT_SIGNAL)
    try:
        serve_screenshots(fn, request)
        out = tmp_path / "shot.png"
        request_screenshot(ProcessRef.current(), request, out, timeout=5)
        with Image.open(out) as image:
            assert image.size == (64, 48)
            assert image.convert("RGB").getpixel((10, 0)) == (255, 0, 0)
            assert not is_blank(image.convert("RGB"))
        assert not request.exists()
        with pytest.raises(DeviceServerError, match=r"not absolute|cannot write"):
            request_screenshot(ProcessRef.current(), request, tmp_path / "missing-dir" / "x.png",
                               timeout=5)
    finally:
        signal.signal(SCREENSHOT_SIGNAL, previous)


def test_screenshot_request_to_a_dead_server(tmp_path: Path) -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    server = ProcessRef.of(pid, ProcessRef.current().program)
    os.waitpid(pid, 0)
    with pytest.raises(DeviceServerError, match="not running"):
        request_screenshot(server, tmp_path / "r", tmp_path / "o.png", timeout=1)


def test_screenshot_request_never_signals_an_unproven_process(tmp_path: Path) -> None:
    # this very process, but recorded with another start time (a reused pid): never signalled
    me = ProcessRef.current()
    received: list[int] = []
    previous = signal.signal(SCREENSHOT_SIGNAL, lambda signum, frame: received.append(signum))
    try:
        for server in (None, replace(me, started=me.started - 100), replace(me, program="x"),
                       replace(me, pid=-1), replace(me, pid=1)):
            with pytest.raises(DeviceServerError, match="not running"):
                request_screenshot(server, tmp_path / "r", tmp_path / "o.png", timeout=1)
            assert not (tmp_path / "r").exists()
        assert received == []
    finally:
        signal.signal(SCREENSHOT_SIGNAL, previous)


def test_last_visible_picture_survives_blanking_and_reset(fn: DisplayFunction) -> None:
    bochs_modeset(fn, 8, 8)
    fn.framebuffer.map[0:4] = bytes([255, 255, 255, 0])
    vga_read(fn, 0x3DA)
    vga_write(fn, 0x3C0, 0x00)  # the guest blanks as it shuts down
    assert is_blank(fn.screenshot())
    kept = fn.screenshot(last_visible=True)
    assert kept.size == (8, 8) and kept.getpixel((0, 0)) == (255, 255, 255)
    fn.framebuffer.map[0:4] = bytes(4)  # later VRAM changes do not alter the kept picture
    fn.reset()
    assert fn.screenshot(last_visible=True).getpixel((0, 0)) == (255, 255, 255)
    bochs_modeset(fn, 8, 8)  # visible again: last_visible means the live picture
    assert is_blank(fn.screenshot(last_visible=True))
