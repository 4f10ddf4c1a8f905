"""Real QEMU (TCG) with the built-in guest: vfio-user-pci against our server, guest enumerates.

The guest's serial console is a busybox shell on QEMU's stdio; the test types a short script
after the ready marker and reads its answers back.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from egpu.devices.sample import SAMPLE_DEVICE_ID, SAMPLE_VENDOR_ID, SampleFunction
from egpu.dma import DmaRange
from egpu.vfio_user.server import VfioUserServer

pytestmark = pytest.mark.qemu

READY = b"EGPU-GUEST-READY"
PROMPT = b"/ # "
BOOT_TIMEOUT_S = 240

# Lists PCI functions, enables memory decoding of ours, writes then reads a BAR0 scratch
# register through the guest's MMIO path (QEMU -> REGION_WRITE/READ -> our server).
GUEST_SCRIPT = b"""
for d in /sys/bus/pci/devices/*; do echo PCIDEV ${d##*/} $(cat $d/vendor) $(cat $d/device); done
d=$(grep -l 0x5678 /sys/bus/pci/devices/*/device); d=${d%/device}
printf '\\006' | dd of=$d/config bs=1 seek=4 count=1 conv=notrunc 2>/dev/null
base=$(head -1 $d/resource | cut -d' ' -f1)
devmem $((base + 0x100)) 32 0xcafef00d
echo BARVAL $(devmem $((base + 0x100)) 32)
poweroff -f
"""


class RecordingFunction(SampleFunction):
    """The sample function, remembering which guest memory QEMU mapped."""

    def __init__(self) -> None:
        super().__init__()
        self.mapped: list[DmaRange] = []

    def dma_mapped(self, dma_range: DmaRange) -> None:
        self.mapped.append(dma_range)


def machine_args(arch: str) -> list[str]:
    if arch == "aarch64":
        return ["-machine", "virt,memory-backend=mem", "-cpu", "max"]
    return ["-machine", "q35,memory-backend=mem"]


@pytest.mark.parametrize("arch", ["aarch64", "x86_64"])
def test_guest_enumerates_and_reaches_the_device(arch: str, egpu_home: Path) -> None:
    from egpu.engine.qemu import find_engine
    from egpu.guest.assets import ensure_guest

    engine = find_engine()
    guest = ensure_guest(arch)
    sock_dir = Path(tempfile.mkdtemp(prefix="vu", dir="/tmp"))
    device = RecordingFunction()
    server = VfioUserServer(device, sock_dir / "fn0.sock")
    thread = server.start_thread()
    argv = [
        *engine.qemu(arch), *machine_args(arch), "-accel", "tcg", "-m", "512M", "-smp", "1",
        "-object", "memory-backend-memfd,id=mem,size=512M,share=on",
        "-kernel", str(guest.kernel), "-initrd", str(guest.initramfs),
        "-append", f"console={guest.console} quiet", "-nographic", "-nodefaults",
        "-serial", "stdio", "-monitor", "none",
        "-device", '{"driver":"vfio-user-pci","socket":{"type":"unix","path":"%s"}}'
        % (sock_dir / "fn0.sock"),
    ]
    qemu = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env={**os.environ, **engine.env()})
    assert qemu.stdin is not None and qemu.stdout is not None
    os.set_blocking(qemu.stdout.fileno(), False)
    console = b""
    typed = False
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    try:
        while qemu.poll() is None and time.monotonic() < deadline:
            chunk = qemu.stdout.read()
            if chunk:
                console += chunk
            # the shell's prompt after the ready marker: it reads what is typed from here on
            if not typed and PROMPT in console.partition(READY)[2]:
                qemu.stdin.write(GUEST_SCRIPT)
                qemu.stdin.flush()
                typed = True
            time.sleep(0.05)
        console += qemu.stdout.read() or b""
    finally:
        if qemu.poll() is None:
            qemu.kill()
        qemu.wait(30)
        server.stop()
        thread.join(10)
    text = console.decode(errors="replace")
    assert typed, f"guest never became ready:\n{text[-3000:]}"
    found = re.findall(r"PCIDEV (\S+) (0x[0-9a-f]{4}) (0x[0-9a-f]{4})", text)
    assert (f"{SAMPLE_VENDOR_ID:#06x}", f"{SAMPLE_DEVICE_ID:#06x}") in {(v, d) for _, v, d in found}
    assert "BARVAL 0xCAFEF00D" in text, text[-3000:]
    assert device.regs[0x100:0x104] == bytes.fromhex("0df0feca")
    # QEMU shared the guest RAM as fds: the server mmapped it instead of using DMA_READ
    assert any(r.has_fd and r.size >= 256 << 20 for r in device.mapped)
    assert server.memory.ranges() == ()  # dropped when QEMU went away
    assert not (sock_dir / "fn0.sock").exists()
