"""``egpu vfio-user serve`` as a real process: serves clients, SIGTERM stops it cleanly."""

from __future__ import annotations

import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from egpu.devices.sample import SAMPLE_VENDOR_ID
from egpu.vfio_user.client import VfioUserClient


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "server never created its socket"
        time.sleep(0.05)


def serve_argv(sock_path: Path, function: str, *options: str) -> list[str]:
    argv = [sys.executable, "-m", "egpu", "vfio-user", "serve", "--socket", str(sock_path),
            "--function", function]
    for option in options:
        argv += ["-o", option]
    return argv


@contextmanager
def serving(argv: Sequence[str]) -> Iterator[subprocess.Popen[bytes]]:
    """A device-server process for the block; killed at its end unless the test stopped it."""
    proc = subprocess.Popen(list(argv), stderr=subprocess.PIPE)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def stop_cleanly(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM ends a server with status 0."""
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def test_serve_sigterm(egpu_home: Path) -> None:
    sock_path = Path(tempfile.mkdtemp(prefix="vu", dir="/tmp")) / "priv" / "fn.sock"
    with serving(serve_argv(sock_path, "sample")) as proc:
        wait_for_socket(sock_path, proc)
        assert stat.S_IMODE(sock_path.stat().st_mode) == 0o600
        assert stat.S_IMODE(sock_path.parent.stat().st_mode) == 0o700
        for _ in range(2):  # a client, then the next one
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(10)
            s.connect(str(sock_path))
            client = VfioUserClient(s)
            client.negotiate()
            assert client.region_read(7, 0, 2) == struct.pack("<H", SAMPLE_VENDOR_ID)
            s.close()
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(sock_path))
        VfioUserClient(s).negotiate()  # a client still connected when SIGTERM comes
        stop_cleanly(proc)
        s.close()
        assert not sock_path.exists()


def test_bad_option_is_a_usage_error(egpu_home: Path) -> None:
    sock_path = Path(tempfile.mkdtemp(prefix="vu", dir="/tmp")) / "fn.sock"
    proc = subprocess.run(
        [sys.executable, "-m", "egpu", "vfio-user", "serve", "--socket", str(sock_path),
         "--function", "sample", "-o", "novalue"], capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2 and "KEY=VALUE" in proc.stderr
    assert not sock_path.exists()


def test_help_lists_every_functions_options(egpu_home: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "egpu", "vfio-user", "serve", "--help"],
                          capture_output=True, text=True, timeout=60, check=True)
    text = " ".join(proc.stdout.split())  # click wraps to the terminal width
    for function in ("display", "nvme", "sample"):
        assert f"Options of --function {function} (-o KEY=VALUE)" in text
    for words in ("vram=SIZE", "screenshot_request=PATH", "backing=PATH", "size=SIZE",
                  "queues=N", "[default: 4; 1 to 64]", "[default: 1G; at least 1M]"):
        assert words in text, proc.stdout


@pytest.mark.parametrize(
    ("function", "option", "words"),
    [
        ("nvme", "colour=red", "unknown nvme option(s): colour (known: backing, size, queues"),
        ("nvme", "size=512K", "nvme option size '512K' is out of range (at least 1M)"),
        ("nvme", "queues=65", "nvme option queues '65' is out of range (1 to 64)"),
        ("display", "vram=lots", "bad display option vram 'lots'"),
        ("display", "multifunction=maybe", "display option multifunction 'maybe' is not a"),
        ("sample", "x=1", "unknown sample option(s): x (known: none)"),
    ],
)
def test_bad_device_option_is_one_line(egpu_home: Path, function: str, option: str,
                                       words: str) -> None:
    sock_path = Path(tempfile.mkdtemp(prefix="vu", dir="/tmp")) / "fn.sock"
    proc = subprocess.run(serve_argv(sock_path, function, option), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and words in err, err
    assert not sock_path.exists()
    assert not (egpu_home / "data" / "devices").exists()


def test_nvme_standalone_gets_a_sparse_backing_in_the_data_dir(egpu_home: Path) -> None:
    sock_path = Path(tempfile.mkdtemp(prefix="vu", dir="/tmp")) / "fn.sock"
    with serving(serve_argv(sock_path, "nvme", "size=8M")) as proc:
        wait_for_socket(sock_path, proc)
        backing = egpu_home / "data" / "devices" / "nvme.img"
        assert backing.stat().st_size == 8 << 20 and backing.stat().st_blocks == 0
        assert stat.S_IMODE(backing.stat().st_mode) == 0o600
        stop_cleanly(proc)


def test_public_socket_dir_is_refused(egpu_home: Path) -> None:
    public = Path(tempfile.mkdtemp(prefix="vu", dir="/tmp"))
    os.chmod(public, 0o755)
    proc = subprocess.run(
        [sys.executable, "-m", "egpu", "vfio-user", "serve", "--socket", str(public / "x.sock"),
         "--function", "sample"], capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1 and "not private" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_serve_display_answers_screenshot_requests(egpu_home: Path) -> None:
    from egpu.devices.display import request_screenshot
    from egpu.process import ProcessRef

    base = Path(tempfile.mkdtemp(prefix="vu", dir="/tmp"))
    sock_path = base / "fn0.sock"
    request = base / "shot.req"
    with serving(serve_argv(sock_path, "display", f"screenshot_request={request}")) as proc:
        wait_for_socket(sock_path, proc)
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(str(sock_path))
        client = VfioUserClient(s)
        client.negotiate()
        assert client.region_read(7, 0, 4) == struct.pack("<HH", 0x1234, 0x1111)  # bochs IDs
        request_screenshot(ProcessRef.of_popen(proc), request, base / "out.png", timeout=30)
        assert (base / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        s.close()
        stop_cleanly(proc)


def test_serve_nvme_with_a_backing_file(egpu_home: Path) -> None:
    base = Path(tempfile.mkdtemp(prefix="vu", dir="/tmp"))
    sock_path = base / "fn1.sock"
    with serving(serve_argv(sock_path, "nvme", f"backing={base / 'disk.img'}", "size=16M")) as proc:
        wait_for_socket(sock_path, proc)
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(str(sock_path))
        client = VfioUserClient(s)
        client.negotiate()
        class_code = client.region_read(7, 9, 3)
        assert class_code == bytes([0x02, 0x08, 0x01])  # NVMe: mass storage, NVM, NVMe
        s.close()
        stop_cleanly(proc)
