"""guest/elf.py: the loader and DT_NEEDED libraries of real ELF files; malformed ones refused."""

from __future__ import annotations

import contextlib
import struct
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from egpu.guest import elf

# this interpreter: a real dynamically linked ELF of the host
PYTHON = Path(sys.executable).resolve()


def test_a_real_executable_names_its_loader_and_libc() -> None:
    linkage = elf.linkage(PYTHON.read_bytes())
    assert linkage.interpreter is not None and linkage.interpreter.startswith("/lib")
    assert "ld-linux" in linkage.interpreter
    assert "libc.so.6" in linkage.needed


def test_libc_needs_only_the_loader() -> None:
    libc = next(p for d in ("/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu", "/lib64", "/lib")
                if (p := Path(d) / "libc.so.6").exists())
    needed = elf.linkage(libc.resolve().read_bytes()).needed
    assert len(needed) == 1 and needed[0].startswith("ld-linux")


def _header(cls: int = elf.ELFCLASS64, order: int = elf.ELFDATA2LSB, phoff: int = 64,
            phentsize: int = 56, phnum: int = 0) -> bytes:
    ident = elf.ELF_MAGIC + bytes([cls, order]) + bytes(10)
    return ident + bytes(16) + struct.pack("<Q", phoff) + bytes(14) + struct.pack(
        "<HH", phentsize, phnum) + bytes(6)


def test_a_file_without_segments_is_static() -> None:
    assert elf.linkage(_header()) == elf.Linkage(None, ())


@pytest.mark.parametrize(("data", "message"), [
    (b"\x7fEL", "too short"),
    (b"#!/bin/sh\n" + bytes(100), "not an ELF"),
    (_header(cls=1), "64-bit little-endian"),
    (_header(order=2), "64-bit little-endian"),
    (_header(phnum=4), "past the end"),
    (_header(phnum=1, phentsize=8), "malformed"),
    (_header(phnum=elf.MAX_PHNUM + 1), "malformed"),
    # one PT_INTERP segment whose bytes run past the file
    (_header(phnum=1) + struct.pack("<IIQQQQQQ", elf.PT_INTERP, 0, 120, 0, 0, 1000, 0, 0),
     "segment runs past"),
    # a PT_INTERP with no terminating NUL
    (_header(phnum=1) + struct.pack("<IIQQQQQQ", elf.PT_INTERP, 0, 120, 0, 0, 8, 0, 0)
     + b"/lib/ld-", "unterminated"),
])
def test_malformed_files_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        elf.linkage(data)


@given(st.binary(max_size=512))
def test_any_bytes_give_a_linkage_or_a_value_error(data: bytes) -> None:
    with contextlib.suppress(ValueError):
        elf.linkage(_header(phnum=2) + data)
