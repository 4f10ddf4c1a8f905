"""What a dynamically linked ELF file needs to run: its loader (PT_INTERP) and its DT_NEEDED
libraries (pure; the System V gABI, "Program Header" and "Dynamic Section").

Only 64-bit little-endian files are read (both guest architectures); anything else, or any
offset outside the file, is a ValueError.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
# e_ident is 16 bytes; e_phoff, e_phentsize and e_phnum follow at fixed offsets (ELF64)
_IDENT = struct.Struct("<4sBB10x")
_PH_FIELDS = struct.Struct("<32xQ14xHH")
# p_type p_flags p_offset p_vaddr p_paddr p_filesz p_memsz p_align
_PHDR = struct.Struct("<IIQQQQQQ")
_DYN = struct.Struct("<qQ")  # d_tag d_val
PT_LOAD = 1
PT_DYNAMIC = 2
PT_INTERP = 3
DT_NULL = 0
DT_NEEDED = 1
DT_STRTAB = 5
MAX_PHNUM = 512  # far above any real file; bounds the walk
MAX_NAME = 4096


@dataclass(frozen=True)
class _Segment:
    kind: int
    offset: int
    vaddr: int
    filesz: int


@dataclass(frozen=True)
class Linkage:
    """The loader path (None for a static file) and the needed sonames, in file order."""

    interpreter: str | None
    needed: tuple[str, ...]


def _segments(data: bytes) -> list[_Segment]:
    if len(data) < _PH_FIELDS.size:
        raise ValueError("not an ELF file (too short)")
    magic, cls, order = _IDENT.unpack_from(data)
    if magic != ELF_MAGIC:
        raise ValueError("not an ELF file")
    if cls != ELFCLASS64 or order != ELFDATA2LSB:
        raise ValueError("not a 64-bit little-endian ELF file")
    phoff, phentsize, phnum = _PH_FIELDS.unpack_from(data)
    if phnum > MAX_PHNUM or (phnum and phentsize < _PHDR.size):
        raise ValueError("ELF program header table is malformed")
    if phoff + phnum * phentsize > len(data):
        raise ValueError("ELF program header table runs past the end of the file")
    out = []
    for i in range(phnum):
        kind, _, offset, vaddr, _, filesz, _, _ = _PHDR.unpack_from(data, phoff + i * phentsize)
        if offset + filesz > len(data):
            raise ValueError("ELF segment runs past the end of the file")
        out.append(_Segment(kind, offset, vaddr, filesz))
    return out


def _string(data: bytes, offset: int) -> str:
    if not 0 <= offset < len(data):
        raise ValueError("ELF string outside the file")
    end = data.find(b"\0", offset, offset + MAX_NAME)
    if end < 0:
        raise ValueError("ELF string is unterminated")
    return data[offset:end].decode("utf-8", "strict")


def linkage(data: bytes) -> Linkage:
    """The loader and DT_NEEDED entries of an ELF file's bytes."""
    segments = _segments(data)
    interp = next((s for s in segments if s.kind == PT_INTERP), None)
    interpreter = _string(data, interp.offset) if interp is not None else None
    dynamic = next((s for s in segments if s.kind == PT_DYNAMIC), None)
    if dynamic is None:
        return Linkage(interpreter, ())
    needed: list[int] = []
    strtab: int | None = None
    for pos in range(dynamic.offset, dynamic.offset + dynamic.filesz - _DYN.size + 1, _DYN.size):
        tag, value = _DYN.unpack_from(data, pos)
        if tag == DT_NULL:
            break
        if tag == DT_NEEDED:
            needed.append(value)
        elif tag == DT_STRTAB:
            strtab = value
    if not needed:
        return Linkage(interpreter, ())
    if strtab is None:
        raise ValueError("ELF dynamic section has DT_NEEDED but no string table")
    # DT_STRTAB is an address: find the loaded segment holding it to get its file offset
    load = next((s for s in segments
                 if s.kind == PT_LOAD and s.vaddr <= strtab < s.vaddr + s.filesz), None)
    if load is None:
        raise ValueError("ELF string table is not in any loaded segment")
    base = load.offset + (strtab - load.vaddr)
    return Linkage(interpreter, tuple(_string(data, base + n) for n in needed))
