"""Module metadata from .modinfo and the load order built from it."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from egpu.guest import kmod


def make_elf(modinfo: list[str], extra_sections: int = 1) -> bytes:
    """A minimal little-endian ELF64 relocatable with a .modinfo section (System V gABI)."""
    shstrtab = b"\0.modinfo\0.shstrtab\0.text\0"
    info = b"".join(s.encode() + b"\0" for s in modinfo)
    body = bytearray(64)  # the ELF header, filled in below
    info_off = len(body)
    body += info
    shstr_off = len(body)
    body += shstrtab
    body += b"\0" * (-len(body) % 8)
    shoff = len(body)
    shdr = struct.Struct("<IIQQQQIIQQ")
    sections = [shdr.pack(0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
                shdr.pack(1, 1, 0, 0, info_off, len(info), 0, 0, 1, 0),
                shdr.pack(10, 3, 0, 0, shstr_off, len(shstrtab), 0, 0, 1, 0)]
    sections += [shdr.pack(20, 1, 0, 0, 0, 0, 0, 0, 1, 0)] * extra_sections
    for s in sections:
        body += s
    ident = b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9
    struct.pack_into("<16sHHIQQQIHHHHHH", body, 0, ident, 1, 183, 1, 0, 0, shoff, 0, 64,
                     0, 0, 64, len(sections), 2)
    return bytes(body)


def test_parse_modinfo_reads_depends_softdeps_and_name() -> None:
    elf = make_elf(["license=GPL", "softdep=pre: crypto-crc32c post: foo",
                    "depends=jbd2,mbcache,crc16", "name=ext4", "vermagic=6.12", "alias=fs-ext4"])
    info = kmod.parse_modinfo(elf, "fallback")
    # soft dependencies may be aliases: kept as written
    assert info == kmod.ModInfo("ext4", ("jbd2", "mbcache", "crc16"), ("crypto-crc32c",),
                                ("fs-ext4",))


def test_parse_modinfo_canonicalises_and_falls_back_to_the_file_name() -> None:
    info = kmod.parse_modinfo(make_elf(["depends=", "alias=x"]), "virtio_rng")
    assert info == kmod.ModInfo("virtio_rng", (), (), ("x",))
    assert kmod.parse_modinfo(make_elf(["depends=nvme-core"]), "nvme").depends == ("nvme_core",)


def test_module_name_from_path() -> None:
    assert kmod.module_name_from_path("kernel/drivers/char/hw_random/virtio-rng.ko.xz") == \
        "virtio_rng"
    assert kmod.module_name_from_path("nvme.ko") == "nvme"
    with pytest.raises(ValueError):
        kmod.module_name_from_path("README")


def test_not_a_module_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="ELF"):
        kmod.parse_modinfo(b"hello", "x")
    elf = make_elf(["name=x"])
    with pytest.raises(ValueError):
        kmod.parse_modinfo(elf[:100], "x")


@given(st.binary(max_size=512))
def test_garbage_raises_only_value_error(blob: bytes) -> None:
    with contextlib.suppress(ValueError):
        kmod.parse_modinfo(blob, "x")


@given(st.integers(0, 400), st.binary(min_size=1, max_size=8))
def test_corrupted_module_raises_only_value_error(at: int, junk: bytes) -> None:
    elf = bytearray(make_elf(["depends=a", "name=m"]))
    at %= len(elf)
    elf[at:at + len(junk)] = junk
    with contextlib.suppress(ValueError):
        kmod.parse_modinfo(bytes(elf), "x")


def mods(**deps: str) -> dict[str, kmod.ModInfo]:
    return {name: kmod.ModInfo(name, tuple(d for d in dd.split(",") if d), ())
            for name, dd in deps.items()}


def test_load_order_puts_dependencies_first_once_and_skips_builtins() -> None:
    available = mods(nvme="nvme_core", nvme_core="nvme_auth", nvme_auth="", bochs="drm,ttm",
                     ttm="drm", drm="")
    order = kmod.load_order(["bochs", "nvme", "nvme-core", "virtio_console"], available,
                            frozenset({"virtio_console"}))
    assert order == ["drm", "ttm", "bochs", "nvme_auth", "nvme_core", "nvme"]


def test_missing_hard_dependency_is_named() -> None:
    with pytest.raises(ValueError, match=r"crc16 .*needed by ext4"):
        kmod.load_order(["ext4"], mods(ext4="crc16"), frozenset())
    with pytest.raises(ValueError, match="nosuch"):
        kmod.load_order(["nosuch"], {}, frozenset())


def test_soft_dependencies_are_loaded_first_when_present_and_ignored_otherwise() -> None:
    available = {"ext4": kmod.ModInfo("ext4", (), ("crc32c", "absent")),
                 "crc32c": kmod.ModInfo("crc32c", (), ("ext4",))}
    assert kmod.load_order(["ext4"], available, frozenset()) == ["crc32c", "ext4"]


def test_hard_cycle_is_reported() -> None:
    with pytest.raises(ValueError, match="cycle"):
        kmod.load_order(["a"], mods(a="b", b="a"), frozenset())


@given(st.dictionaries(st.integers(0, 15), st.sets(st.integers(0, 15), max_size=4), max_size=16),
       st.sets(st.integers(0, 15)))
def test_order_respects_every_edge_of_a_random_dag(edges: dict[int, set[int]],
                                                   wanted: set[int]) -> None:
    # only edges to lower numbers: a DAG
    available = {f"m{i}": kmod.ModInfo(f"m{i}", tuple(f"m{d}" for d in sorted(ds) if d < i), ())
                 for i, ds in edges.items()}
    for i in range(16):
        available.setdefault(f"m{i}", kmod.ModInfo(f"m{i}", (), ()))
    order = kmod.load_order([f"m{w}" for w in sorted(wanted)], available, frozenset())
    assert len(order) == len(set(order))
    pos = {m: k for k, m in enumerate(order)}
    for m in order:
        for d in available[m].depends:
            assert pos[d] < pos[m]
    assert {f"m{w}" for w in wanted} <= set(order)


def test_load_groups_splits_independent_chains_and_keeps_order() -> None:
    available = mods(nvme="nvme_core", nvme_core="", bochs="drm", drm="", evdev="",
                     ttm="drm")
    order = kmod.load_order(["nvme", "bochs", "evdev", "ttm"], available, frozenset())
    groups = kmod.load_groups(order, available)
    assert groups == [["nvme_core", "nvme"], ["drm", "bochs", "ttm"], ["evdev"]]


@given(st.dictionaries(st.integers(0, 15), st.sets(st.integers(0, 15), max_size=3), max_size=16))
def test_load_groups_partition_the_order_without_cross_dependencies(
        edges: dict[int, set[int]]) -> None:
    available = {f"m{i}": kmod.ModInfo(f"m{i}", tuple(f"m{d}" for d in sorted(ds) if d < i), ())
                 for i, ds in edges.items()}
    for i in range(16):
        available.setdefault(f"m{i}", kmod.ModInfo(f"m{i}", (), ()))
    order = kmod.load_order(sorted(available), available, frozenset())
    groups = kmod.load_groups(order, available)
    assert sorted(m for g in groups for m in g) == sorted(order)
    where = {m: k for k, g in enumerate(groups) for m in g}
    for g in groups:
        assert g == [m for m in order if m in set(g)]
        for m in g:
            assert all(where[d] == where[m] for d in available[m].depends)
