"""Kernel module metadata without kmod: read ``.modinfo`` from module ELF files, order loads.

Debian's kernel packages ship no modules.dep (their postinst runs depmod), so the dependency
graph is rebuilt from each module's own ``depends=`` and ``softdep=pre:`` tags, which is what
depmod reads too. Pure: bytes and names in, values out.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
# e_ident (16) .. e_shoff at 0x28; e_shentsize, e_shnum, e_shstrndx at 0x3A
_EHDR_SHOFF = struct.Struct("<Q")
_EHDR_SHOFF_AT = 0x28
_EHDR_SH = struct.Struct("<HHH")
_EHDR_SH_AT = 0x3A
_EHDR_SIZE = 0x40
# Elf64_Shdr: name, type, flags, addr, offset, size, link, info, addralign, entsize
_SHDR = struct.Struct("<IIQQQQIIQQ")
MODINFO_SECTION = b".modinfo"
MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


@dataclass(frozen=True)
class ModInfo:
    """What a module says about itself: its name, hard dependencies, pre-load soft deps
    (which may name an alias, e.g. ext4's "crc32c"), and the aliases it answers to."""

    name: str
    depends: tuple[str, ...]
    softdeps_pre: tuple[str, ...]
    aliases: tuple[str, ...] = ()


def canonical(name: str) -> str:
    """Module names treat '-' and '_' alike; the kernel reports '_'."""
    return name.replace("-", "_")


def module_name_from_path(path: str) -> str:
    """``kernel/drivers/char/hw_random/virtio-rng.ko.xz`` -> ``virtio_rng``."""
    base = path.rsplit("/", 1)[-1]
    for suffix in MODULE_SUFFIXES:
        if base.endswith(suffix):
            return canonical(base[: -len(suffix)])
    raise ValueError(f"not a kernel module file name: {path}")


def _modinfo_section(elf: bytes) -> bytes:
    if len(elf) < _EHDR_SIZE or elf[:4] != ELF_MAGIC or elf[4] != ELFCLASS64 \
            or elf[5] != ELFDATA2LSB:
        raise ValueError("not a little-endian ELF64 file")
    (shoff,) = _EHDR_SHOFF.unpack_from(elf, _EHDR_SHOFF_AT)
    shentsize, shnum, shstrndx = _EHDR_SH.unpack_from(elf, _EHDR_SH_AT)
    if shentsize != _SHDR.size or shstrndx >= shnum or shoff + shnum * shentsize > len(elf):
        raise ValueError("bad ELF section header table")
    headers = [_SHDR.unpack_from(elf, shoff + i * shentsize) for i in range(shnum)]
    strtab_off, strtab_size = headers[shstrndx][4], headers[shstrndx][5]
    strtab = elf[strtab_off:strtab_off + strtab_size]
    for h in headers:
        name_end = strtab.find(b"\0", h[0])
        if name_end < 0:
            continue
        if strtab[h[0]:name_end] == MODINFO_SECTION:
            off, size = h[4], h[5]
            if off + size > len(elf):
                raise ValueError(".modinfo runs past the end of the file")
            return elf[off:off + size]
    raise ValueError("no .modinfo section")


def parse_modinfo(elf: bytes, fallback_name: str) -> ModInfo:
    """Parse a module's ``.modinfo`` tags (NUL-separated ``key=value`` strings)."""
    tags: dict[str, list[str]] = {}
    for item in _modinfo_section(elf).split(b"\0"):
        key, sep, value = item.decode(errors="replace").partition("=")
        if sep:
            tags.setdefault(key, []).append(value)
    depends = tuple(canonical(d) for v in tags.get("depends", []) for d in v.split(",") if d)
    pre: list[str] = []
    for soft in tags.get("softdep", []):
        # "pre: a b post: c" -- only "pre" modules must be loaded first
        words = soft.split()
        in_pre = False
        for w in words:
            if w.endswith(":"):
                in_pre = w == "pre:"
            elif in_pre:
                pre.append(w)  # a module name or an alias: not canonicalised
    name = canonical(tags.get("name", [fallback_name])[0])
    return ModInfo(name, depends, tuple(pre), tuple(tags.get("alias", [])))


def load_order(wanted: Iterable[str], available: Mapping[str, ModInfo],
               builtin: frozenset[str]) -> list[str]:
    """Modules to load for ``wanted``, dependencies first; builtin modules are skipped.

    A wanted or hard-dependency module that is neither built in nor available raises
    ValueError (a typo or a kernel config change); a missing soft dependency is ignored,
    as modprobe does.
    """
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, hard: bool, chain: tuple[str, ...]) -> None:
        if name in builtin or state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            if not hard:
                return  # a soft dependency may point back up the chain; modprobe ignores it
            raise ValueError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        info = available.get(name)
        if info is None:
            if hard:
                raise ValueError(f"kernel module {name} is neither built in nor packaged"
                                 + (f" (needed by {chain[-1]})" if chain else ""))
            return
        state[name] = "visiting"
        for pre in info.softdeps_pre:
            visit(pre, False, (*chain, name))
        for dep in info.depends:
            visit(dep, True, (*chain, name))
        state[name] = "done"
        order.append(name)

    for w in wanted:
        visit(canonical(w), True, ())
    return order


def load_groups(order: Sequence[str], available: Mapping[str, ModInfo]) -> list[list[str]]:
    """Split a load order into groups that share no dependency, each still in order.

    Groups can be loaded concurrently (the guest has several vCPUs and module loading is
    CPU-bound under TCG); inside a group, one module after the other.
    """
    parent = {m: m for m in order}

    def find(m: str) -> str:
        while parent[m] != m:
            parent[m] = parent[parent[m]]
            m = parent[m]
        return m

    for m in order:
        info = available[m]
        for d in (*info.depends, *info.softdeps_pre):
            if d in parent:
                parent[find(d)] = find(m)
    groups: dict[str, list[str]] = {}
    for m in order:
        groups.setdefault(find(m), []).append(m)
    return list(groups.values())
