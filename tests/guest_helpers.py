"""Boot the built-in guest directly under QEMU (TCG) for the guest layer's tests.

One place decides which QEMU runs (the engine layer's ``find_engine``) so the guest tests do
not depend on the VM layer above them.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs
import pytest
from qemu.qmp import QMPClient

from egpu.engine.qemu import Engine, find_engine
from egpu.guest.assets import GuestAssets
from egpu.guest.protocol import BASE_CHECKS, kernel_cmdline
from egpu.paths import CACHE_ENV

MACHINES = {"aarch64": ["-M", "virt", "-cpu", "max"], "x86_64": ["-M", "q35", "-cpu", "max"]}
BOOT_TIMEOUT_S = 120  # generous: the 2 cores are shared with the rest of the suite
PUMP_DRAIN_S = 10.0  # QEMU has exited: what is left in the pipe takes no longer than this


@dataclass
class GuestRun:
    """A running guest: its QEMU process, its console text so far, its QMP socket."""

    proc: subprocess.Popen[bytes]
    qmp_socket: Path
    _buf: bytearray = field(default_factory=bytearray)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    started: float = field(default_factory=time.monotonic)
    pump: threading.Thread | None = None  # reads the console until QEMU closes it

    def _pump(self) -> None:
        stream = self.proc.stdout
        assert isinstance(stream, io.BufferedReader)  # read1: whatever has arrived, no waiting
        while chunk := stream.read1(4096):
            with self._lock:
                self._buf += chunk

    @property
    def console(self) -> str:
        with self._lock:
            return self._buf.decode(errors="replace")

    def wait_console(self, pred: Callable[[str], object], timeout: float = BOOT_TIMEOUT_S) -> str:
        """Wait until ``pred(console)`` is truthy; fail with the console if QEMU exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.console
            if pred(text):
                return text
            if self.proc.poll() is not None:
                if self.pump is not None:
                    self.pump.join(PUMP_DRAIN_S)  # it ends at the pipe's EOF: all is read
                text = self.console
                if pred(text):
                    return text
                raise AssertionError(f"QEMU exited {self.proc.returncode}; console:\n{text}")
            time.sleep(0.05)
        raise AssertionError(f"timed out; console:\n{self.console}")

    def type(self, text: str) -> None:
        """Type on the guest's serial console."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def wait_exit(self, timeout: float = BOOT_TIMEOUT_S) -> int:
        return self.proc.wait(timeout)

    def qmp(self, command: str) -> object:
        """Run one QMP command with the qemu.qmp library."""
        async def go() -> object:
            client = QMPClient("egpu-test")
            await client.connect(str(self.qmp_socket))
            try:
                return await client.execute(command)
            finally:
                await client.disconnect()
        return asyncio.run(go())


def qemu_argv(engine: Engine, assets: GuestAssets, tmp: Path, *, cpus: int, memory_mib: int,
              cmdline: str, extra: Sequence[str] = ()) -> list[str]:
    return [
        *engine.qemu(assets.arch), *MACHINES[assets.arch], "-accel", "tcg",
        "-smp", str(cpus), "-m", str(memory_mib),
        "-kernel", str(assets.kernel), "-initrd", str(assets.initramfs), "-append", cmdline,
        "-nodefaults", "-display", "none", "-serial", "stdio",
        "-qmp", f"unix:{tmp / 'qmp.sock'},server=on,wait=off",
        "-no-reboot", *extra,
    ]


@contextmanager
def boot(assets: GuestAssets, tmp: Path, *, cpus: int = 2, memory_mib: int = 512,
         selftest: bool = False, checks: Sequence[str] | None = BASE_CHECKS,
         claim_cpus: int | None = None,
         claim_memory_mib: int | None = None, extra: Sequence[str] = ()) -> Iterator[GuestRun]:
    """Boot the guest; ``claim_*`` put different expectations on its command line than the
    machine really has (to see a check fail). QEMU is killed on the way out if still running."""
    cmdline = kernel_cmdline(assets, selftest=selftest, cpus=claim_cpus or cpus,
                             memory_mib=claim_memory_mib or memory_mib, checks=checks)
    engine = find_engine()
    argv = qemu_argv(engine, assets, tmp, cpus=cpus, memory_mib=memory_mib, cmdline=cmdline,
                     extra=extra)
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT,
                            env={**os.environ, **engine.env()})
    run = GuestRun(proc, tmp / "qmp.sock")
    run.pump = threading.Thread(target=run._pump, daemon=True)
    run.pump.start()
    try:
        yield run
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        run.pump.join(PUMP_DRAIN_S)


@contextmanager
def shared_cache() -> Iterator[Path]:
    """Point EGPU_CACHE at the suite's shared cache (as tests/conftest.py does per test), for
    fixtures wider than one test."""
    cache = Path(os.environ.get(CACHE_ENV) or platformdirs.user_cache_dir("egpu"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(cache))
        yield cache


def shell_command(vm: Path, command: bytes, expect: str, timeout: float = 60) -> None:
    """Type a command into the guest's console shell and wait for ``expect`` in its output.

    The shell asks the terminal for its size (ESC[6n) at its first prompt, so an empty line
    first gets a second, settled prompt; then the command goes in small pieces, as a person
    types, because the UART's receive FIFO is 16 bytes.
    """
    log = vm / "serial.log"
    deadline = time.monotonic() + timeout
    conn: socket.socket | None = None

    def wait_for(text: str, count: int = 1) -> None:
        while log.read_text(errors="replace").count(text) < count:
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-1500:]
            # QEMU writes the guest's output to us as well as to the log: unread, it fills the
            # socket (many tiny writes) and the guest's UART stalls mid-line
            with contextlib.suppress(BlockingIOError):
                while conn is not None and conn.recv(65536):
                    pass
            time.sleep(0.2)

    wait_for("/ # ")
    prompts = log.read_text(errors="replace").count("/ # ")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(vm / "console.sock"))
        conn = s
        s.sendall(b"\n")
        s.setblocking(False)
        wait_for("/ # ", prompts + 1)
        for i in range(0, len(command), 8):
            piece = command[i:i + 8]
            while piece:
                with contextlib.suppress(BlockingIOError):
                    piece = piece[s.send(piece):]
            time.sleep(0.02)
        # connected until the answer is there: QEMU drops what its UART FIFO has not taken
        # when the client hangs up, and a slow guest may not have taken it all yet
        wait_for(expect)
