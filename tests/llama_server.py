"""A real llama-server on the host for ``egpu bench llm`` tests: Debian forky's llama.cpp-tools.

The same package the ``ai`` image profile installs in a guest (``llama.cpp-tools``, which ships
``llama-server`` and depends on libllama0 and libggml0 with its CPU backend) is resolved with
its whole library closure by egpu's private apt root (``egpu.debpkg``: signed indexes, SHA256
per file), unpacked (never installed) into ``cache/tests/llama-server`` and run through the
root's own loader with ``--library-path``, as the private engine runs QEMU.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from filelock import FileLock

from egpu import debpkg
from egpu.engine.provision import relink_absolute
from egpu.engine.qemu import host_machine
from egpu.paths import dirs

SUITES = ("forky",)
PACKAGES = ("llama.cpp-tools",)
DEB_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}
LOADERS = {  # the loader inside the root, and the multiarch triplet of its libraries
    "x86_64": ("usr/lib64/ld-linux-x86-64.so.2", "x86_64-linux-gnu"),
    "aarch64": ("usr/lib/ld-linux-aarch64.so.1", "aarch64-linux-gnu"),
}
MARKER = ".egpu-llama.json"
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0
POLL_S = 0.1


def root_dir() -> Path:
    return dirs().cache / "tests" / "llama-server"


def ensure_root() -> Path:
    """The unpacked root (downloaded and built once, renamed in only when complete)."""
    base = root_dir()
    root = base / "root"
    if (root / MARKER).exists():
        return root
    base.mkdir(parents=True, exist_ok=True)
    with FileLock(str(base / ".lock")):
        if (root / MARKER).exists():
            return root
        archive = debpkg.DebianArchive(base / "apt", SUITES, (DEB_ARCH[host_machine()],))
        archive.update(debpkg.find_mirror())
        files = archive.resolve(PACKAGES)
        debs = debpkg.download(files, dirs().debs)
        staging = base / "root.partial"
        shutil.rmtree(staging, ignore_errors=True)
        for deb in debs:
            debpkg.extract(deb, staging)
        relink_absolute(staging)
        (staging / MARKER).write_text(json.dumps({"packages": [f.filename for f in files]}))
        shutil.rmtree(root, ignore_errors=True)
        os.replace(staging, root)
    return root


def is_cached() -> bool:
    return (root_dir() / "root" / MARKER).exists()


def server_argv(root: Path) -> list[str]:
    """The argv prefix that runs the root's llama-server through the root's loader."""
    loader, triplet = LOADERS[host_machine()]
    libs = ":".join(str(root / d) for d in (f"usr/lib/{triplet}", f"lib/{triplet}",
                                             f"usr/lib/{triplet}/llama"))
    return [str(root / loader), "--library-path", libs, str(root / "usr/bin/llama-server")]


# libggml0 dlopens its CPU backend from a directory compiled in as an absolute path, which is
# the host's, not this root's; GGML_BACKEND_PATH names one to load. The baseline build of each
# architecture runs on any CPU of it (the tuned variants refuse a CPU without their features).
BASELINE_BACKENDS = ("libggml-cpu-x64.so", "libggml-cpu-armv8.0_1.so", "libggml-cpu.so")


def cpu_backend(root: Path) -> Path | None:
    """The root's baseline CPU backend of ggml, if it ships them apart."""
    found = {p.name: p for p in root.rglob("libggml-cpu*.so")}
    for name in BASELINE_BACKENDS:
        if name in found:
            return found[name]
    return min(found.values()) if found else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def running(model: Path, log: Path) -> Iterator[str]:
    """llama-server on 127.0.0.1 with ``model``; yields its base URL, stops it after."""
    root = ensure_root()
    port = free_port()
    argv = [*server_argv(root), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
            "-c", "8192", "-t", "1", "--no-webui"]
    env = {**os.environ}
    if (backend := cpu_backend(root)) is not None:
        env["GGML_BACKEND_PATH"] = str(backend)
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited {proc.returncode}: "
                                   f"{log.read_text(errors='replace')[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == httpx.codes.OK:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"llama-server not ready: {log.read_text()[-2000:]}")
            time.sleep(POLL_S)  # polling a condition with a deadline, not synchronising
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
