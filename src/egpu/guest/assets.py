"""Assemble and cache the built-in guest: a Debian kernel and a busybox initramfs.

Cache layout (``dirs().guest``)::

    apt/                       private apt root (trixie, arm64 + amd64), used only to build
    .lock                      held while building
    <arch>/<key>/vmlinuz       the Debian kernel image (EFI stub: for firmware and bootloaders)
    <arch>/<key>/vmlinux       x86_64 only: the ELF inside vmlinuz, booted directly by QEMU (PVH)
    <arch>/<key>/initramfs.gz  busybox-static, the init, the checks, the modules
    <arch>/<key>/manifest.json build key, kernel version, module load order, source packages

``<key>`` is the start of :func:`build_key`, a digest of everything shipped from this package
(init, checks, module list): changing any of them builds anew, and a cache hit needs no
network. A build happens in ``<arch>/.build-*`` and is renamed to ``<key>`` only when
complete. A new build never replaces files a starting QEMU may be about to open: older
builds are removed only once they have been superseded for a while.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import lzma
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from egpu.errors import EgpuError, GuestError
from egpu.guest import bzimage, cpio, elf, kmod
from egpu.guest.protocol import ARCHES, console_for
from egpu.paths import dirs
from egpu.progress import Progress, SilentProgress

if TYPE_CHECKING:
    from egpu import debpkg

DEBIAN_ARCH = {"aarch64": "arm64", "x86_64": "amd64"}
SUITES = ("trixie",)
BUSYBOX_PACKAGE = "busybox-static"
# The QEMU guest agent (vm/agent.py talks to it): the binary, the libraries it links (DT_NEEDED,
# followed through the closure) and the dynamic loader, nothing else of its packages.
AGENT_PACKAGE = "qemu-guest-agent"
AGENT_BINARY = "usr/sbin/qemu-ga"
# Debian's multiarch library directories (merged /usr), where the loader looks by default
LIB_DIR = {"aarch64": "usr/lib/aarch64-linux-gnu", "x86_64": "usr/lib/x86_64-linux-gnu"}
MAX_LIBRARIES = 64  # far above qemu-ga's closure (about 15); a loop in the tree stops here
OS_RELEASE = 'NAME="egpu built-in guest"\nID=egpu\nPRETTY_NAME="egpu built-in guest (busybox)"\n'
# Modules the guest loads, for this and later work; their dependency closure comes along.
# Entries built into a kernel are skipped (on Debian 6.12: virtio_console on both, the ACPI
# button on arm64). Those in AFTER_READY load right after the ready marker (before any check),
# since no device of the built-in guest needs them at boot: about 0.7 s less to ready under TCG.
GUEST_MODULES = (
    "virtio_blk", "virtio_net", "virtio_rng", "virtio_console",
    "nvme",                      # the virtual eGPU's DMA function
    "bochs",                     # the virtual eGPU's display function (DRM, TTM, fbdev)
    "evdev",                     # /dev/input/event* for the power-button reader
    "gpio_keys",                 # aarch64 virt: the power key is a GPIO line of the PL061
    "button",                    # x86_64: the ACPI power button
    "ext4",                      # a root filesystem for later full-image boots
    "vfio_pci",                  # passthrough inside the guest (nested tests)
    "virtio_gpu",                # a VM's own screen (run --display): DRM, with fbcon on it
    "9p", "9pnet_virtio",        # run --mount: shared folders over virtio-9p
    "isofs",                     # reading a full image's cloud-init seed (ISO 9660) in tests
)
# Shared-folder modules have a list of their own: loaded before the ready marker when the host
# asks for mounts (so a ready guest has them mounted), after it like the rest otherwise.
SHARE_MODULES = frozenset({"9p", "9pnet_virtio"})
AFTER_READY = frozenset({"ext4", "vfio_pci", "virtio_gpu", "isofs"}) | SHARE_MODULES
# Bump when the initramfs layout changes in a way the key below cannot see.
BUILD_FORMAT = 7
# the build key covers these sources: changing how the guest is assembled rebuilds it
BUILDER_SOURCES = ("assets.py", "kmod.py", "cpio.py", "bzimage.py", "elf.py")
KEY_CHARS = 16
# A build not asked for in this long is deleted when another one lands. Every cache hit
# refreshes its time, so a VM or a test still using an older build keeps its files.
SUPERSEDED_GRACE_S = 3600
MANIFEST = "manifest.json"
KERNEL_FILE = "vmlinuz"
PVH_KERNEL_FILE = "vmlinux"
INITRAMFS_FILE = "initramfs.gz"
INIT_SCRIPT = "init.sh"
CHECKS_DIR = "checks"
# where things go inside the initramfs
GUEST_MODULE_DIR = "lib/modules"
GUEST_MODULE_LIST = "etc/egpu/modules"
GUEST_LATER_MODULE_LIST = "etc/egpu/modules.later"
GUEST_SHARE_MODULE_LIST = "etc/egpu/modules.shares"
GUEST_CHECKS_DIR = "checks"
# Linux device numbers (Documentation/admin-guide/devices.txt)
DEV_CONSOLE = (5, 1)
DEV_NULL = (1, 3)
CRYPTO_ALIAS_PREFIX = "crypto-"
_IMAGE_PACKAGE = re.compile(r"linux-image-\d[\w.+~-]*")  # fullmatch


@dataclass(frozen=True)
class GuestAssets:
    """A built guest: what to give QEMU's ``-kernel``/``-initrd``, its console, its contents.

    ``kernel`` is the fastest file for QEMU's direct kernel boot (on x86_64 the PVH ELF);
    ``kernel_image`` is the distribution's image, for firmware (UEFI) and bootloader boots.
    """

    arch: str
    kernel: Path
    initramfs: Path
    console: str
    kernel_version: str
    modules: tuple[str, ...]
    kernel_image: Path | None = None


def _build_dir(arch: str, key: str) -> Path:
    return dirs().guest / arch / key[:KEY_CHARS]


def planned_guest(arch: str) -> GuestAssets:
    """Where the guest's files are or will be, without building anything (for dry runs)."""
    d = _build_dir(arch, build_key(arch))
    kernel = PVH_KERNEL_FILE if arch == "x86_64" else KERNEL_FILE
    return GuestAssets(arch, d / kernel, d / INITRAMFS_FILE, console_for(arch), "", (),
                       d / KERNEL_FILE)


def _guest_files() -> dict[str, bytes]:
    """The files shipped from this package into the initramfs, by their path there."""
    root = resources.files("egpu.guest")
    out = {"init": root.joinpath(INIT_SCRIPT).read_bytes()}
    for item in sorted(root.joinpath(CHECKS_DIR).iterdir(), key=lambda p: p.name):
        if item.name.endswith(".sh"):
            out[f"{GUEST_CHECKS_DIR}/{item.name}"] = item.read_bytes()
    return out


def build_key(arch: str) -> str:
    """A digest of everything that decides the build apart from the Debian packages: the
    files shipped into the guest and the code that assembles them."""
    h = hashlib.sha256(f"{BUILD_FORMAT}\0{arch}\0".encode())
    root = resources.files("egpu.guest")
    builder = {f"builder/{m}": root.joinpath(m).read_bytes() for m in BUILDER_SOURCES}
    for name, data in {**builder, **_guest_files()}.items():
        h.update(f"\0{name}\0{len(data)}\0".encode() + data)
    return h.hexdigest()


def _load_cached(arch: str, key: str) -> GuestAssets | None:
    d = _build_dir(arch, key)
    try:
        m = json.loads((d / MANIFEST).read_text())
        if m.get("key") != key:
            return None
        kernel = str(m["kernel"])
        if kernel not in (KERNEL_FILE, PVH_KERNEL_FILE):
            return None
        assets = GuestAssets(arch, d / kernel, d / INITRAMFS_FILE, console_for(arch),
                             str(m["kernel_version"]), tuple(str(x) for x in m["modules"]),
                             d / KERNEL_FILE)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    files = (assets.kernel, assets.initramfs, assets.kernel_image)
    if not all(f is not None and f.is_file() for f in files):
        return None
    with contextlib.suppress(OSError):
        os.utime(d)  # last used: see _prune_superseded
    return assets


def ensure_guest(arch: str, progress: Progress | None = None) -> GuestAssets:
    """The built-in guest for ``arch``, built from Debian packages on first use, then cached."""
    if arch not in ARCHES:
        raise GuestError(f"unknown guest architecture {arch!r} (use {' or '.join(ARCHES)})")
    key = build_key(arch)
    if (cached := _load_cached(arch, key)) is not None:
        return cached
    base = dirs().guest
    from filelock import FileLock  # brings asyncio: only for a build, never for a cached guest

    try:
        base.mkdir(parents=True, exist_ok=True)
        with FileLock(str(base / ".lock")):
            # another process may have built it while we waited
            if (cached := _load_cached(arch, key)) is not None:
                return cached
            _build(arch, key, progress or SilentProgress())
    except EgpuError as e:
        raise GuestError(f"cannot build the {arch} guest: {e.message}", hint=e.hint) from e
    except (OSError, ValueError, lzma.LZMAError) as e:
        raise GuestError(f"cannot build the {arch} guest: {e}") from e
    assets = _load_cached(arch, key)
    if assets is None:
        raise GuestError(f"the {arch} guest build left no usable assets in "
                         f"{_build_dir(arch, key)}")
    return assets


def _kernel_image_package(archive: debpkg.DebianArchive, debarch: str) -> str:
    """See through ``linux-image-<arch>`` to the versioned image package it depends on."""
    from egpu.debpkg import MIRROR_ENV

    try:
        deps = archive.depends(f"linux-image-{debarch}:{debarch}")
    except EgpuError as e:
        # apt-get update reports an unreachable mirror only as a warning; this is where it shows
        raise GuestError(f"linux-image-{debarch} is not in the Debian {'/'.join(SUITES)} index",
                         hint=f"check access to the Debian mirror (or set {MIRROR_ENV})",
                         ) from e
    for dep in deps:
        name = dep.split(":", 1)[0].strip("<> ")
        if _IMAGE_PACKAGE.fullmatch(name):
            return name
    raise GuestError(f"linux-image-{debarch} names no kernel image package")


def _build(arch: str, key: str, progress: Progress) -> None:
    # the Debian client (httpx) only for a build: a cached guest loads without it
    from egpu import debpkg

    base = dirs().guest
    debarch = DEBIAN_ARCH[arch]
    others = [a for a in DEBIAN_ARCH.values() if a != debarch]
    archive = debpkg.DebianArchive(base / "apt", SUITES, [debarch, *others])
    progress.note(f"assembling the {arch} guest from Debian {'/'.join(SUITES)} packages")
    archive.update(debpkg.find_mirror())
    image = _kernel_image_package(archive, debarch)
    files = archive.resolve_only([f"{image}:{debarch}", f"{BUSYBOX_PACKAGE}:{debarch}"])
    # the agent's whole package closure is downloaded; only the ELF files it needs are kept
    agent_files = archive.resolve([f"{AGENT_PACKAGE}:{debarch}"])
    debs = debpkg.download(files, dirs().debs, progress)
    agent_debs = debpkg.download(agent_files, dirs().debs, progress)
    arch_dir = base / arch
    arch_dir.mkdir(exist_ok=True)
    # we hold the lock: build directories left by an interrupted run are garbage
    for stale in arch_dir.glob(".build-*"):
        shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=arch_dir))
    try:
        tree = work / "tree"
        for deb in debs:
            debpkg.extract(deb, tree)
        agent_tree = work / "agent"
        for deb in agent_debs:
            debpkg.extract(deb, agent_tree)
        out = work / "out"
        out.mkdir()
        manifest = _assemble(arch, tree, out, agent_tree)
        manifest.update(key=key, packages=[f.filename for f in (*files, *agent_files)])
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        final = _build_dir(arch, key)
        if final.exists():  # an unusable leftover under the same key (checked by the caller)
            shutil.rmtree(final)
        os.rename(out, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _prune_superseded(arch_dir, keep=final.name)


def _prune_superseded(arch_dir: Path, keep: str) -> None:
    """Delete older builds that nothing has asked for in a while."""
    now = time.time()
    for old in arch_dir.iterdir():
        if old.name == keep or old.name.startswith("."):
            continue
        try:
            if now - old.stat().st_mtime > SUPERSEDED_GRACE_S:
                shutil.rmtree(old) if old.is_dir() else old.unlink()
        except OSError:
            continue


class _ModuleTree(Mapping[str, kmod.ModInfo]):
    """Modules of an extracted kernel package, decompressed and parsed only when asked for."""

    def __init__(self, root: Path) -> None:
        self.paths = {kmod.module_name_from_path(p.name): p
                      for p in root.rglob("*.ko*") if p.name.endswith(kmod.MODULE_SUFFIXES)}
        self._data: dict[str, bytes] = {}
        self._info: dict[str, kmod.ModInfo] = {}

    def data(self, name: str) -> bytes:
        if name not in self._data:
            path = self.paths[name]
            raw = path.read_bytes()
            self._data[name] = lzma.decompress(raw) if path.name.endswith(".xz") else raw
        return self._data[name]

    def _parse(self, name: str) -> kmod.ModInfo:
        return kmod.parse_modinfo(self.data(name), name)

    def __getitem__(self, name: str) -> kmod.ModInfo:
        if name not in self._info:
            if name not in self.paths:
                raise KeyError(name)
            info = self._parse(name)
            pre = tuple(m for soft in info.softdeps_pre for m in self.resolve(soft))
            self._info[name] = dataclasses.replace(info, softdeps_pre=pre)
        return self._info[name]

    def resolve(self, name: str) -> list[str]:
        """Module names for a soft dependency, which may be an alias.

        Without modules.alias (depmod writes it; Debian's packages ship none), an alias is
        looked up among the modules whose name starts with it, less a "crypto-" prefix
        (ext4's crypto-crc32c -> crc32c_generic, crc32c_intel): the form crypto drivers use,
        and cheap, since only those few modules are decompressed.
        """
        if kmod.canonical(name) in self.paths:
            return [kmod.canonical(name)]
        stem = kmod.canonical(name.removeprefix(CRYPTO_ALIAS_PREFIX))
        return sorted(m for m in self.paths
                      if m.startswith(stem) and name in self._parse(m).aliases)

    def __iter__(self) -> Iterator[str]:
        return iter(self.paths)

    def __len__(self) -> int:
        return len(self.paths)


def _tree_file(tree: Path, path: str) -> bytes:
    """A file of an extracted package tree by its path there, symlinks followed inside it."""
    target = (tree / path.lstrip("/")).resolve()
    if not target.is_relative_to(tree.resolve()) or not target.is_file():
        raise GuestError(f"{AGENT_PACKAGE}'s closure has no {path}")
    return target.read_bytes()


def agent_files(arch: str, tree: Path) -> dict[str, bytes]:
    """qemu-ga, its libraries (by soname, in the multiarch directory) and the loader, by the
    path each takes in the initramfs."""
    lib_dir = LIB_DIR[arch]
    binary = _tree_file(tree, AGENT_BINARY)
    out = {AGENT_BINARY: binary}
    try:
        interpreter = elf.linkage(binary).interpreter
        pending = list(elf.linkage(binary).needed)
        while pending:
            soname = pending.pop()
            path = f"{lib_dir}/{soname}"
            if path in out or "/" in soname:
                continue
            if len(out) > MAX_LIBRARIES:
                raise GuestError(f"{AGENT_BINARY} needs more than {MAX_LIBRARIES} libraries")
            out[path] = _tree_file(tree, path)
            pending += elf.linkage(out[path]).needed
    except ValueError as e:
        raise GuestError(f"cannot read the guest agent's ELF files: {e}") from e
    if interpreter is None:
        raise GuestError(f"{AGENT_BINARY} names no dynamic loader")
    # merged /usr: the package ships /lib/... as /usr/lib/..., the initramfs has no /lib link
    loader = interpreter.lstrip("/")
    usr_loader = f"usr/{loader}"
    out[loader] = _tree_file(tree, usr_loader if (tree / usr_loader).exists() else loader)
    return out


def _assemble(arch: str, tree: Path, out: Path, agent_tree: Path) -> dict[str, object]:
    """Write vmlinuz and initramfs.gz into ``out`` from an extracted package tree."""
    kernels = sorted((tree / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise GuestError(f"expected one kernel in the image package, found {len(kernels)}")
    version = kernels[0].name.removeprefix("vmlinuz-")
    moddir = tree / "usr/lib/modules" / version
    builtin = frozenset(
        kmod.module_name_from_path(ln.strip())
        for ln in (moddir / "modules.builtin").read_text().splitlines() if ln.strip())
    modules = _ModuleTree(moddir / "kernel")
    try:
        order = kmod.load_order(GUEST_MODULES, modules, builtin)
        first = kmod.load_order([m for m in GUEST_MODULES if m not in AFTER_READY], modules,
                                builtin)
        # the share modules' closure beyond the first stage: loadable right after it
        shares = [m for m in kmod.load_order(
            [*first, *(m for m in GUEST_MODULES if m in SHARE_MODULES)], modules, builtin)
            if m not in first]
    except ValueError as e:
        raise GuestError(str(e)) from e
    busybox = tree / "usr/bin/busybox"
    if not busybox.is_file():
        raise GuestError(f"{BUSYBOX_PACKAGE} has no usr/bin/busybox")

    entries: list[cpio.Entry] = [cpio.directory(d) for d in (
        "bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "run",
        "root", "etc", "etc/egpu", "lib", GUEST_MODULE_DIR, GUEST_CHECKS_DIR)]
    entries += [
        cpio.char_device("dev/console", *DEV_CONSOLE),
        cpio.char_device("dev/null", *DEV_NULL, perm=0o666),
        cpio.regular("bin/busybox", busybox.read_bytes(), perm=0o755),
        cpio.symlink("bin/sh", "busybox"),
    ]
    for name, data in _guest_files().items():
        entries.append(cpio.regular(name, data, perm=0o755))
    agent = agent_files(arch, agent_tree)
    have = {e.name for e in entries}
    for path in sorted(agent):
        parts = path.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent not in have:
                entries.append(cpio.directory(parent))
                have.add(parent)
        # the loader is also libc's DT_NEEDED soname: one copy, the other path a link to it
        twin = f"{LIB_DIR[arch]}/{path.rsplit('/', 1)[-1]}"
        if twin != path and agent.get(twin) == agent[path]:
            entries.append(cpio.symlink(path, "/" + twin))
        else:
            entries.append(cpio.regular(path, agent[path], perm=0o755))
    entries.append(cpio.regular("etc/os-release", OS_RELEASE.encode()))
    for name in order:
        entries.append(cpio.regular(f"{GUEST_MODULE_DIR}/{name}.ko", modules.data(name)))
    # one line per group of modules that depend on each other; groups load concurrently
    later = [m for m in order if m not in first and m not in shares]
    for path, stage in ((GUEST_MODULE_LIST, first), (GUEST_SHARE_MODULE_LIST, shares),
                        (GUEST_LATER_MODULE_LIST, later)):
        groups = kmod.load_groups(stage, modules)
        entries.append(cpio.regular(path, "".join(" ".join(g) + "\n" for g in groups).encode()))
    entries.append(cpio.regular("etc/egpu/kernel-version", f"{version}\n".encode()))

    shutil.copyfile(kernels[0], out / KERNEL_FILE)
    kernel = KERNEL_FILE
    if arch == "x86_64":
        try:
            elf = bzimage.extract_vmlinux(kernels[0].read_bytes())
        except ValueError as e:
            raise GuestError(f"cannot unwrap the x86_64 kernel: {e}") from e
        if bzimage.has_pvh_entry(elf):
            (out / PVH_KERNEL_FILE).write_bytes(elf)
            kernel = PVH_KERNEL_FILE
    (out / INITRAMFS_FILE).write_bytes(cpio.gzip_archive(entries))
    return {"arch": arch, "kernel_version": version, "kernel": kernel, "modules": order,
            "modules_after_ready": later, "modules_for_shares": shares}
