"""Assembling the built-in guest from real Debian packages, and its cache."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from egpu.debpkg import MIRROR_ENV
from egpu.errors import GuestError
from egpu.guest import assets, bzimage, cpio, kmod
from egpu.guest.protocol import ARCHES
from egpu.paths import CACHE_ENV
from guest_helpers import shared_cache

UNREACHABLE_MIRROR = "http://127.0.0.1:9/debian"
BUILD_START_TIMEOUT_S = 300  # the index update comes first, from Debian's archive


@pytest.fixture(scope="module", params=ARCHES)
def built(request: pytest.FixtureRequest) -> assets.GuestAssets:
    # the module-scoped fixture runs before the per-test EGPU_HOME one: use the shared cache
    with shared_cache():
        return assets.ensure_guest(request.param)


def members(a: assets.GuestAssets) -> dict[str, cpio.Entry]:
    return {e.name: e for e in cpio.parse(gzip.decompress(a.initramfs.read_bytes()))}


def test_assets_are_complete(built: assets.GuestAssets) -> None:
    assert built.kernel.stat().st_size > 1 << 20
    assert built.kernel_image is not None and built.kernel_image.name == assets.KERNEL_FILE
    if built.arch == "x86_64":
        # direct boot takes the PVH ELF unwrapped from the bzImage, firmware the bzImage
        elf = built.kernel.read_bytes()
        assert bzimage.has_pvh_entry(elf)
        assert built.kernel_image.read_bytes()[0x202:0x206] == b"HdrS"
    else:
        assert built.kernel == built.kernel_image
    with shared_cache():
        planned = assets.planned_guest(built.arch)
    assert planned == dataclasses.replace(built, kernel_version="", modules=())
    assert built.kernel_version.startswith("6.12.")
    assert built.console == {"aarch64": "ttyAMA0", "x86_64": "ttyS0"}[built.arch]
    m = members(built)
    assert stat.S_ISREG(m["init"].mode) and m["init"].mode & 0o111
    assert m["init"].data.startswith(b"#!/bin/sh")
    assert m["bin/busybox"].data[:4] == b"\x7fELF"
    machine = int.from_bytes(m["bin/busybox"].data[18:20], "little")  # ELF e_machine
    assert machine == {"aarch64": 183, "x86_64": 62}[built.arch]
    assert stat.S_ISLNK(m["bin/sh"].mode)
    # the guest agent and exactly what it links, for this architecture
    agent = m[assets.AGENT_BINARY]
    assert agent.mode & 0o111 and int.from_bytes(agent.data[18:20], "little") == machine
    libs = {n.rsplit("/", 1)[-1] for n in m if n.startswith(assets.LIB_DIR[built.arch] + "/")}
    assert {"libc.so.6", "libglib-2.0.so.0"} <= libs and len(libs) < 20
    loader = {"aarch64": "lib/ld-linux-aarch64.so.1",
              "x86_64": "lib64/ld-linux-x86-64.so.2"}[built.arch]
    assert loader in m
    console, null = m["dev/console"], m["dev/null"]
    assert stat.S_ISCHR(console.mode) and (console.rdev_major, console.rdev_minor) == (5, 1)
    assert stat.S_ISCHR(null.mode) and (null.rdev_major, null.rdev_minor) == (1, 3)
    assert any(n.startswith("checks/") and n.endswith(".sh") for n in m)


def test_modules_are_decompressed_and_in_dependency_order(built: assets.GuestAssets) -> None:
    m = members(built)
    stages = [[line.split() for line in m[path].data.decode().splitlines()]
              for path in (assets.GUEST_MODULE_LIST, assets.GUEST_SHARE_MODULE_LIST,
                           assets.GUEST_LATER_MODULE_LIST)]
    listed = [mod for stage in stages for group in stage for mod in group]
    assert sorted(listed) == sorted(built.modules) and len(set(listed)) == len(listed)
    first = {mod for group in stages[0] for mod in group}
    for wanted in ("nvme", "bochs", "virtio_blk", "virtio_net", "virtio_rng", "evdev",
                   "gpio_keys"):
        assert wanted in first
    assert {"ext4", "vfio_pci"} <= set(listed) - first
    # the shared-folder modules have a stage of their own (loaded before the ready marker when
    # the host asks for mounts), which needs only the first stage (init loads it second)
    shares = {mod for group in stages[1] for mod in group}
    assert {"9p", "9pnet_virtio", "9pnet"} <= shares
    assert not shares & {mod for group in stages[2] for mod in group}
    # ext4's soft dependency is the alias crypto-crc32c: resolved to a module, loaded first
    ext4_group = next(g for g in stages[2] if "ext4" in g)
    assert ext4_group.index("crc32c_generic") < ext4_group.index("ext4")
    if built.arch == "x86_64":
        assert "button" in first  # the ACPI power button is modular on amd64
    # groups of a stage load concurrently, one module after the other inside a group
    loaded: set[str] = set()
    for stage in stages:
        for group in stage:
            before = set(loaded)
            for name in group:
                elf = m[f"{assets.GUEST_MODULE_DIR}/{name}.ko"].data
                info = kmod.parse_modinfo(elf, name)  # raises unless an uncompressed module
                assert info.name == name
                for dep in info.depends:
                    assert dep in before, f"{name} needs {dep} loaded first"
                before.add(name)
        loaded |= {mod for group in stage for mod in group}


def test_manifest_records_the_build(built: assets.GuestAssets) -> None:
    manifest = json.loads((built.kernel.parent / assets.MANIFEST).read_text())
    assert manifest["key"] == assets.build_key(built.arch)
    assert manifest["kernel_version"] == built.kernel_version
    assert any(p.startswith("busybox-static_") for p in manifest["packages"])


def test_second_call_is_cached_and_needs_no_network(
        built: assets.GuestAssets, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MIRROR_ENV, UNREACHABLE_MIRROR)
    with shared_cache():
        again = assets.ensure_guest(built.arch)
    assert again == built  # a rebuild would have failed: there is no mirror


def test_unknown_arch_is_a_guest_error() -> None:
    with pytest.raises(GuestError, match="riscv64"):
        assets.ensure_guest("riscv64")


@pytest.mark.network  # asks a mirror on loopback that nobody serves
def test_failed_build_is_one_line_and_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    monkeypatch.setenv(MIRROR_ENV, UNREACHABLE_MIRROR)
    with pytest.raises(GuestError) as info:
        assets.ensure_guest("aarch64")
    assert "\n" not in str(info.value) and "aarch64" in str(info.value)
    # the mirror is asked first: nothing exists for the architecture until packages arrive
    assert not (tmp_path / "guest" / "aarch64").exists()


def test_partial_or_stale_cache_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            built: assets.GuestAssets) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    key = assets.build_key(built.arch)
    d = tmp_path / "guest" / built.arch / key[:assets.KEY_CHARS]
    d.mkdir(parents=True)
    (d / assets.KERNEL_FILE).write_bytes(built.kernel.read_bytes()[:4096])
    # no manifest: an interrupted copy, never a hit
    assert assets._load_cached(built.arch, assets.build_key(built.arch)) is None
    (d / assets.INITRAMFS_FILE).write_bytes(b"x")
    good = {"key": assets.build_key(built.arch), "kernel_version": "6.12.0", "modules": [],
            "kernel": assets.KERNEL_FILE}
    (d / assets.MANIFEST).write_text(json.dumps({**good, "key": "old"}))
    assert assets._load_cached(built.arch, assets.build_key(built.arch)) is None
    (d / assets.MANIFEST).write_text(json.dumps({**good, "kernel": "../../etc/passwd"}))
    assert assets._load_cached(built.arch, assets.build_key(built.arch)) is None
    (d / assets.MANIFEST).write_text(json.dumps(good))
    hit = assets._load_cached(built.arch, assets.build_key(built.arch))
    assert hit is not None and hit.kernel == d / assets.KERNEL_FILE


def test_builds_are_kept_apart_by_key(built: assets.GuestAssets) -> None:
    key = assets.build_key(built.arch)
    assert built.kernel.parent.name == key[:assets.KEY_CHARS]
    assert built.kernel.parent.parent.name == built.arch


def test_only_builds_unused_for_a_while_are_pruned(tmp_path: Path) -> None:
    old, recent, keep = (tmp_path / n for n in ("aaaa", "bbbb", "cccc"))
    for d in (old, recent, keep):
        d.mkdir()
        (d / "vmlinuz").write_bytes(b"k")
    stale_file = tmp_path / "vmlinuz"  # the flat layout of earlier versions
    stale_file.write_bytes(b"k")
    building = tmp_path / ".build-x"
    building.mkdir()
    long_ago = time.time() - assets.SUPERSEDED_GRACE_S - 60
    for p in (old, stale_file, building):
        os.utime(p, (long_ago, long_ago))
    assets._prune_superseded(tmp_path, keep="cccc")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".build-x", "bbbb", "cccc"]


@pytest.mark.download  # the Debian package indexes, into a fresh cache
def test_a_build_killed_midway_leaves_nothing_half_made(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Kill -9 a build while it unpacks, then build again: the result is complete and clean."""
    cache = tmp_path / "cache"
    cache.mkdir()
    with shared_cache() as shared:
        built = assets.ensure_guest("aarch64")
        (cache / "debs").symlink_to(shared / "debs")  # no second download of the packages
    env = {**os.environ, CACHE_ENV: str(cache)}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from egpu.guest.assets import ensure_guest; "
         "ensure_guest('aarch64')"], env=env)
    arch_dir = cache / "guest" / "aarch64"
    deadline = time.monotonic() + BUILD_START_TIMEOUT_S
    try:
        # midway for certain: its build directory exists, half filled
        while not any(arch_dir.glob(".build-*")):
            assert proc.poll() is None, "the build ended before it could be interrupted"
            assert time.monotonic() < deadline, "the build never started unpacking"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    monkeypatch.setenv(CACHE_ENV, str(cache))
    again = assets.ensure_guest("aarch64")
    assert again.kernel.read_bytes() == built.kernel.read_bytes()
    assert gzip.decompress(again.initramfs.read_bytes())[:6] == cpio.MAGIC
    assert [p.name for p in arch_dir.iterdir()] == [again.kernel.parent.name]
