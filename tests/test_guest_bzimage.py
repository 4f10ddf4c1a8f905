"""Unwrapping a bzImage for PVH direct boot, on images built from the documented header."""

from __future__ import annotations

import contextlib
import gzip
import lzma
import struct

import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from egpu.guest import bzimage


def elf_with_notes(notes: list[tuple[bytes, int, bytes]], machine: int = 62) -> bytes:
    """An ELF64 executable with one PT_NOTE segment holding the given (name, type, desc)."""
    blob = b""
    for name, ntype, desc in notes:
        blob += struct.pack("<III", len(name), len(desc), ntype)
        blob += name + b"\0" * (-len(name) % 4) + desc + b"\0" * (-len(desc) % 4)
    phoff = 64
    note_off = phoff + 56
    ident = b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9
    head = struct.pack("<16sHHIQQQIHHHHHH", ident, 2, machine, 1, 0, phoff, 0, 0, 64, 56, 1,
                       64, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 4, 4, note_off, 0, 0, len(blob), len(blob), 4)
    return head + phdr + blob


PVH_ELF = elf_with_notes([(b"GNU\0", 3, b"\x01" * 20),
                          (b"Xen\0", bzimage.XEN_ELFNOTE_PHYS32_ENTRY, b"\0\0\x10\x01")])


def make_bzimage(payload: bytes, setup_sects: int = 4, version: int = 0x20F) -> bytes:
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects if setup_sects != 4 else 0  # 0 means 4
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    offset = 0x100  # some decompressor code comes first in a real one
    struct.pack_into("<II", setup, 0x248, offset, len(payload))
    return bytes(setup) + b"\x90" * offset + payload + b"\0" * 64


@pytest.mark.parametrize("compress", [
    lambda d: zstandard.ZstdCompressor().compress(d) + struct.pack("<I", len(d)),
    lambda d: gzip.compress(d),
    lambda d: lzma.compress(d, format=lzma.FORMAT_XZ),
])
def test_extract_vmlinux_for_each_compression(compress: object) -> None:
    assert callable(compress)
    image = make_bzimage(compress(PVH_ELF))
    assert bzimage.extract_vmlinux(image) == PVH_ELF


def test_extract_honours_setup_sects() -> None:
    image = make_bzimage(gzip.compress(PVH_ELF), setup_sects=30)
    assert bzimage.extract_vmlinux(image) == PVH_ELF


@pytest.mark.parametrize("image, why", [
    (b"MZ" + b"\0" * 2000, "not an x86 bzImage"),
    (make_bzimage(gzip.compress(PVH_ELF), version=0x206), "boot protocol"),
    (make_bzimage(b"\x00\x01\x02\x03" * 10), "unsupported"),
    (make_bzimage(gzip.compress(b"not an elf")), "not a kernel ELF"),
    (make_bzimage(gzip.compress(PVH_ELF))[:700], "past the end"),
    (make_bzimage(b"\x1f\x8b" + b"\xff" * 30), "cannot decompress"),
])
def test_bad_images_are_value_errors(image: bytes, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        bzimage.extract_vmlinux(image)


def test_pvh_note_detection() -> None:
    assert bzimage.has_pvh_entry(PVH_ELF)
    assert not bzimage.has_pvh_entry(elf_with_notes([(b"GNU\0", 3, b"\x01" * 20)]))
    assert not bzimage.has_pvh_entry(elf_with_notes([(b"Xen\0", 17, b"1234")]))
    assert not bzimage.has_pvh_entry(
        elf_with_notes([(b"Xen\0", bzimage.XEN_ELFNOTE_PHYS32_ENTRY, b"1234")], machine=183))
    assert not bzimage.has_pvh_entry(b"\x7fELF")


@given(st.binary(max_size=3000))
def test_garbage_never_raises_anything_else(blob: bytes) -> None:
    bzimage.has_pvh_entry(blob)
    with contextlib.suppress(ValueError):
        bzimage.extract_vmlinux(blob)


@given(st.integers(0, len(PVH_ELF) - 1), st.binary(min_size=1, max_size=8))
def test_corrupted_elf_never_raises(at: int, junk: bytes) -> None:
    elf = bytearray(PVH_ELF)
    elf[at:at + len(junk)] = junk
    assert isinstance(bzimage.has_pvh_entry(bytes(elf)), bool)
