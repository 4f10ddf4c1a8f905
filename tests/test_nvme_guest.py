"""The virtual eGPU in a real guest: real QEMU (TCG) attaches both functions through
``vfio-user-pci`` at one multifunction slot, served by ``egpu vfio-user serve`` processes, and the
built-in guest's real kernel drivers (nvme, bochs) bind them and run the self-checks.

Beyond the guest's own verdict, the host checks what the guest could not: the data the guest
wrote through the NVMe function is in the backing file, and a screenshot of the display (taken
from the still-running display server after the guest powered off) shows the console.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from egpu.devices.display import request_screenshot
from egpu.engine.qemu import find_engine
from egpu.guest import protocol
from egpu.guest.assets import ensure_guest
from egpu.process import ProcessRef

pytestmark = pytest.mark.qemu

SLOT = "0x5"
NVME_SIZE = "256M"
BOOT_TIMEOUT = 240
MIB = 1 << 20


@dataclass
class Card:
    """The two device servers of one virtual eGPU."""

    dir: Path
    display: subprocess.Popen[bytes]
    nvme: subprocess.Popen[bytes]

    @property
    def backing(self) -> Path:
        return self.dir / "nvme.img"

    @property
    def screenshot_request(self) -> Path:
        return self.dir / "screenshot.request"

    def device_args(self) -> list[str]:
        args = []
        for fn, name in ((0, "display"), (1, "nvme")):
            dev: dict[str, object] = {
                "driver": "vfio-user-pci",
                "socket": {"type": "unix", "path": str(self.dir / f"{name}.sock")},
                "addr": f"{SLOT}.{fn}",
            }
            if fn == 0:
                dev["multifunction"] = True
            args += ["-device", json.dumps(dev)]
        return args


def _serve(d: Path, function: str, *options: str) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "egpu", "vfio-user", "serve", "--socket",
            str(d / f"{function}.sock"), "--function", function]
    for o in options:
        argv += ["-o", o]
    with open(d / f"{function}.log", "wb") as log:
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log)


@pytest.fixture
def card(egpu_home: Path) -> Iterator[Card]:
    d = egpu_home / "card"
    d.mkdir(mode=0o700)
    c = Card(d, _serve(d, "display", f"screenshot_request={d / 'screenshot.request'}"),
             _serve(d, "nvme", f"backing={d / 'nvme.img'}", f"size={NVME_SIZE}"))
    try:
        deadline = time.monotonic() + 30
        while not all((d / f"{n}.sock").exists() for n in ("display", "nvme")):
            for p, n in ((c.display, "display"), (c.nvme, "nvme")):
                assert p.poll() is None, (d / f"{n}.log").read_text()
            assert time.monotonic() < deadline, "device servers did not start"
            time.sleep(0.05)
        yield c
    finally:
        for p in (c.display, c.nvme):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in (c.display, c.nvme):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def boot_selftest(arch: str, card: Card, extra: tuple[str, ...] = ()) -> protocol.SelfTestResult:
    """Boot the built-in guest with the card attached, run its self-test, return the verdict."""
    guest = ensure_guest(arch)
    engine = find_engine()
    append = protocol.kernel_cmdline(guest, selftest=True, cpus=2, memory_mib=512, extra=extra)
    argv = [
        *engine.qemu(arch), "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2",
        "-object", "memory-backend-memfd,id=ram0,size=512M,share=on",
        "-machine", ("virt,highmem=on" if arch == "aarch64" else "q35") + ",memory-backend=ram0",
        "-m", "512M", "-kernel", str(guest.kernel), "-initrd", str(guest.initramfs),
        "-append", append, *card.device_args(),
        "-display", "none", "-nodefaults", "-no-user-config", "-serial", "stdio", "-no-reboot",
    ]
    proc = subprocess.run(argv, env={**os.environ, **engine.env()}, capture_output=True,
                          timeout=BOOT_TIMEOUT, check=False)
    console = proc.stdout.decode(errors="replace")
    result = protocol.parse_selftest(console)
    assert result is not None, f"no self-test result; QEMU said: {proc.stderr.decode()[-2000:]}"
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    return result


def checks_of(result: protocol.SelfTestResult) -> dict[str, tuple[bool, str]]:
    return {c.name: (c.ok, c.detail) for c in result.checks}


def assert_nvme_data_in_backing(card: Card, detail: str, mib: int) -> None:
    """The sha256 the guest reported is what lies in the backing file at 1 MiB."""
    m = re.search(r"sha256=([0-9a-f]{64})", detail)
    assert m, detail
    with open(card.backing, "rb") as f:
        f.seek(1 * MIB)
        assert hashlib.sha256(f.read(mib * MIB)).hexdigest() == m.group(1)


def lit_pixels(path: Path) -> int:
    with Image.open(path) as image:
        grey = image.convert("L")
        return sum(grey.histogram()[1:])


def test_both_functions_bind_and_work_aarch64(card: Card) -> None:
    result = boot_selftest("aarch64", card, ("egpu.nvme_mib=16",))
    checks = checks_of(result)
    assert checks["nvme"][0], checks["nvme"][1]
    assert checks["display"][0], checks["display"][1]
    assert "bochs" in checks["display"][1] and "1024,768" in checks["display"][1]
    assert_nvme_data_in_backing(card, checks["nvme"][1], 16)
    # The guest blanked its display as it powered off: now it shows nothing...
    shot = card.dir / "shot.png"
    request_screenshot(ProcessRef.of_popen(card.display), card.screenshot_request, shot, timeout=20)
    assert lit_pixels(shot) == 0
    # ...but the display server outlives its client and kept the last picture: the console.
    request_screenshot(ProcessRef.of_popen(card.display), card.screenshot_request, shot, timeout=20,
                       last_visible=True)
    with Image.open(shot) as image:
        assert image.size == (1024, 768)
    assert lit_pixels(shot) > 500  # text, not just a cursor
    # The backing file stays sparse: only what the guest wrote (and the kernel probed) is there.
    assert os.stat(card.backing).st_blocks * 512 < 64 * MIB


def test_same_servers_serve_a_second_boot_x86_64(card: Card) -> None:
    first = checks_of(boot_selftest("x86_64", card))
    assert first["nvme"][0] and first["display"][0], first
    # QEMU is gone; the servers keep their device state and accept the next client, whose
    # driver must take the controller and the display over from a previous owner.
    second = checks_of(boot_selftest("x86_64", card))
    assert second["nvme"][0], second["nvme"][1]
    assert second["display"][0], second["display"][1]
    assert_nvme_data_in_backing(card, second["nvme"][1], 8)
    assert card.nvme.poll() is None and card.display.poll() is None
    for name in ("display", "nvme"):
        assert "Traceback" not in (card.dir / f"{name}.log").read_text()


class Console:
    """The built-in guest's serial shell, driven through QEMU's stdio."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.text = ""
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        stream = self.proc.stdout
        assert isinstance(stream, io.BufferedReader)  # read1: whatever has arrived, no waiting
        for chunk in iter(lambda: stream.read1(4096), b""):
            with self._lock:
                self.text += chunk.decode(errors="replace")

    def wait_for(self, pattern: str, after: int = 0, timeout: float = BOOT_TIMEOUT
                 ) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                m = re.compile(pattern, re.S).search(self.text, after)
            if m:
                return m
            assert self.proc.poll() is None, f"QEMU exited: {self.text[-2000:]}"
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {pattern!r}: {self.text[-2000:]}")

    def run(self, command: str, timeout: float = 120) -> str:
        """Run a shell command; returns what it printed between two markers."""
        self.count = getattr(self, "count", 0) + 1
        tag = f"EGPU{self.count}X"
        start = len(self.text)
        assert self.proc.stdin is not None
        # The markers are printed split in two so the echoed command line never matches them.
        self.proc.stdin.write(
            f"echo {tag}''BEGIN; {command}; echo {tag}''END\n".encode())
        self.proc.stdin.flush()
        m = self.wait_for(f"{tag}BEGIN\\s*\\n(.*?){tag}END", start, timeout)
        return m.group(1)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def test_data_and_display_survive_a_guest_reboot_aarch64(card: Card) -> None:
    guest = ensure_guest("aarch64")
    engine = find_engine()
    append = protocol.kernel_cmdline(guest, selftest=False, cpus=2, memory_mib=512)
    argv = [
        *engine.qemu("aarch64"), "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2",
        "-object", "memory-backend-memfd,id=ram0,size=512M,share=on",
        "-machine", "virt,highmem=on,memory-backend=ram0", "-m", "512M",
        "-kernel", str(guest.kernel), "-initrd", str(guest.initramfs), "-append", append,
        *card.device_args(), "-display", "none", "-nodefaults", "-no-user-config",
        "-serial", "stdio",
    ]
    console = Console(argv, {**os.environ, **engine.env()})
    try:
        console.wait_for(protocol.READY_MARKER)
        # 1024 separate 4 KiB writes (O_DIRECT: each one is a command through the device)
        first = console.run(
            "dd if=/dev/urandom of=/tmp/a bs=1M count=4 2>/dev/null;"
            " dd if=/tmp/a of=/dev/nvme0n1 bs=4k seek=512 oflag=direct 2>/dev/null; sync;"
            " sha256sum /tmp/a")
        written = re.search(r"\b([0-9a-f]{64})\b", first)
        assert written, first
        with open(card.backing, "rb") as f:
            f.seek(2 * MIB)
            assert hashlib.sha256(f.read(4 * MIB)).hexdigest() == written.group(1)
        # While the guest runs, the display shows what it draws on its framebuffer console
        # (text, not the blinking cursor alone: that is off half of the time).
        console.run("echo egpu virtual display > /dev/tty1")
        shot = card.dir / "running.png"
        deadline = time.monotonic() + 30
        while True:  # the guest copies its shadow buffer to VRAM from a worker, a bit later
            request_screenshot(ProcessRef.of_popen(card.display), card.screenshot_request, shot,
                               timeout=20)
            if lit_pixels(shot) > 500 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert lit_pixels(shot) > 500
        # A reboot resets both functions (QEMU's system reset reaches the servers); the drivers
        # bind again and find the data where it was.
        mark = len(console.text)
        assert console.proc.stdin is not None
        console.proc.stdin.write(b"reboot -f\n")
        console.proc.stdin.flush()
        console.wait_for(protocol.READY_MARKER, after=mark)
        again = console.run(
            "for i in $(seq 100); do [ -b /dev/nvme0n1 ] && [ -c /dev/fb0 ] && break;"
            " usleep 100000; done; echo 3 > /proc/sys/vm/drop_caches;"
            " dd if=/dev/nvme0n1 bs=4k skip=512 count=1024 iflag=direct 2>/dev/null | sha256sum;"
            " ls /dev/fb0")
        assert written.group(1) in again, again
        assert "/dev/fb0" in again
        console.proc.stdin.write(b"poweroff -f\n")
        console.proc.stdin.flush()
        console.proc.wait(timeout=60)
    finally:
        console.close()
    assert card.nvme.poll() is None and card.display.poll() is None
