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
        debs = debpkg.download(files, dirs().debs, progress)
        staging = base / "root.partial"
        shutil.rmtree(staging, ignore_errors=True)
        progress.start("unpacking engine", len(debs))
        for deb in debs:
            debpkg.extract(deb, staging)
            progress.advance(1)
        progress.finish()
        relink_absolute(staging)
        (staging / MARKER).write_text(json.dumps(
            {"packages": [f.filename for f in files], "suites": list(SUITES)}, indent=1))
        root = engine_root()
        shutil.rmtree(root, ignore_errors=True)
        os.replace(staging, root)
        engine = private_engine()
        assert engine is not None
        return engine
