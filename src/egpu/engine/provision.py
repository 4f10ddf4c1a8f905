"""Provision the private engine: QEMU from Debian trixie-backports, unpacked into egpu's cache.

Nothing is installed on the host. The packages and their whole dependency closure (C library
included) are unpacked into one root that runs through its own loader (egpu.engine.qemu).
The root is built beside its final place and renamed in only when complete, so an interrupted
run leaves either the old engine or none; downloads resume (egpu.debpkg).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

from filelock import FileLock

from egpu import debpkg
from egpu.engine.qemu import MARKER, Engine, engine_root, host_machine, private_engine
from egpu.errors import EngineError
from egpu.paths import dirs
from egpu.progress import Progress, SilentProgress

SUITES = ("trixie", "trixie-backports")
TARGET_RELEASE = "trixie-backports"
PACKAGES = (
    "qemu-system-arm",
    "qemu-system-x86",
    "qemu-utils",
    "qemu-efi-aarch64",
    "ovmf",
)
_DEB_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}
# Window UIs (GTK, SDL) are loadable QEMU modules in their own package, with about 115 MB of
# libraries: fetched only when a VM asks for a window, into a root of their own.
UI_PACKAGES = ("qemu-system-gui",)
# the package whose version the UI modules must match: QEMU refuses modules of another build
COMMON_PACKAGE = "qemu-system-common"
DEB_NAME_PARTS = 3  # NAME_VERSION_ARCH.deb


def relink_absolute(root: Path) -> None:
    """Point absolute symlinks inside an unpacked root back into the root, not the host."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if not p.is_symlink():
                continue
            target = os.readlink(p)
            if target.startswith("/"):
                p.unlink()
                p.symlink_to(os.path.relpath(root / target.lstrip("/"), p.parent))


def _unpack_root(files: list[debpkg.DebFile], root: Path, what: str, progress: Progress) -> None:
    """Download ``files`` and unpack them into ``root``: built beside it, renamed in whole."""
    debs = debpkg.download(files, dirs().debs, progress)
    staging = root.with_name(f"{root.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    progress.start(f"unpacking {what}", len(debs))
    for deb in debs:
        debpkg.extract(deb, staging)
        progress.advance(1)
    progress.finish()
    relink_absolute(staging)
    (staging / MARKER).write_text(json.dumps(
        {"packages": [f.filename for f in files], "suites": list(SUITES)}, indent=1))
    shutil.rmtree(root, ignore_errors=True)
    os.replace(staging, root)


def provision(progress: Progress | None = None) -> Engine:
    """Download and unpack the private engine (idempotent; safe to interrupt and rerun)."""
    progress = progress or SilentProgress()
    machine = host_machine()
    if machine not in _DEB_ARCH:
        raise EngineError(f"no private engine for a {machine} host; install QEMU >= 10.1 yourself")
    base = dirs().engine
    base.mkdir(parents=True, exist_ok=True)
    with FileLock(str(base / ".lock")):
        existing = private_engine()
        if existing is not None:
            return existing
        progress.note("provisioning QEMU from Debian trixie-backports (once)")
        archive = debpkg.DebianArchive(base / "apt", SUITES, (_DEB_ARCH[machine],))
        archive.update(debpkg.find_mirror())
        files = archive.resolve(PACKAGES, target=TARGET_RELEASE)
        if not files:
            raise EngineError("apt resolved no packages for the engine")
        _unpack_root(files, engine_root(), "engine", progress)
        engine = private_engine()
        assert engine is not None
        return engine


def ui_root() -> Path:
    """Where the private engine's window UIs are unpacked."""
    return dirs().engine / "ui-root"


def _recorded_packages(marker: Path) -> list[str]:
    """The package files a complete private root records; [] when it records none."""
    try:
        packages = json.loads(marker.read_text())["packages"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [p for p in packages if isinstance(p, str)] if isinstance(packages, list) else []


def _built_version(filenames: list[str], package: str) -> str | None:
    """The version in ``package``'s NAME_VERSION_ARCH.deb among ``filenames``."""
    for name in filenames:
        parts = name.split("_")
        if len(parts) == DEB_NAME_PARTS and parts[0] == package:
            return parts[1]
    return None


def provision_ui(engine: Engine, progress: Progress | None = None) -> Engine:
    """The private engine with its window UIs, unpacked once beside it (idempotent).

    The UI root holds the same QEMU build's modules as the engine, from the same index; if
    Debian moved on since the engine was provisioned the two would not match, and that is said.
    """
    if engine.root is None:
        return engine  # a QEMU on PATH or an app bundle brings its own UIs (or has none)
    progress = progress or SilentProgress()
    root = ui_root()
    base = dirs().engine
    with FileLock(str(base / ".lock")):
        wanted = _built_version(_recorded_packages(engine.root / MARKER), COMMON_PACKAGE)
        if (root / MARKER).exists() and _built_version(
                _recorded_packages(root / MARKER), COMMON_PACKAGE) == wanted:
            return replace(engine, ui_root=root)
        progress.note("provisioning QEMU's window UIs from Debian trixie-backports (once)")
        machine = host_machine()
        archive = debpkg.DebianArchive(base / "apt", SUITES, (_DEB_ARCH[machine],))
        # the lists the engine was resolved from, unless they are gone
        if not (base / "apt/var/lib/apt/lists").is_dir():
            archive.update(debpkg.find_mirror())
        # one package's record first: a mismatch is told before the whole closure is resolved
        gui = archive.resolve_only([f"{p}/{TARGET_RELEASE}" for p in UI_PACKAGES])
        found = _built_version([f.filename for f in gui], UI_PACKAGES[0])
        if wanted is None or found != wanted:
            raise EngineError(
                f"Debian's QEMU UI modules ({found}) do not match the private engine ({wanted})",
                hint=f"remove {engine.root} so that egpu provisions the engine anew")
        files = archive.resolve(UI_PACKAGES, target=TARGET_RELEASE)
        _unpack_root(files, root, "window UIs", progress)
    return replace(engine, ui_root=root)
