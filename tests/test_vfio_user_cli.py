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
from pathlib import Path

from egpu.vfio_user.client import VfioUserClient
from egpu.vfio_user.sample_device import SAMPLE_VENDOR_ID


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "server never created its socket"
        time.sleep(0.05)


def test_serve_sigterm(egpu_home: Path) -> None:
    sock_path = Path(tempfile.mkdtemp(prefix="vu", dir="/tmp")) / "priv" / "fn.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "egpu", "vfio-user", "serve", "--socket", str(sock_path),
         "--function", "sample"], stderr=subprocess.PIPE,
    )
    try:
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
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        s.close()
        assert not sock_path.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_option_is_a_usage_error(egpu_home: Path) -> None:
    sock_path = Path(tempfile.mkdtemp(prefix="vu", dir="/tmp")) / "fn.sock"
    proc = subprocess.run(
        [sys.executable, "-m", "egpu", "vfio-user", "serve", "--socket", str(sock_path),
         "--function", "sample", "-o", "novalue"], capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2 and "KEY=VALUE" in proc.stderr
    assert not sock_path.exists()


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
    proc = subprocess.Popen(
        [sys.executable, "-m", "egpu", "vfio-user", "serve", "--socket", str(sock_path),
         "--function", "display", "-o", f"screenshot_request={request}"],
        stderr=subprocess.PIPE,
    )
    try:
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
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_nvme_with_a_backing_file(egpu_home: Path) -> None:
    base = Path(tempfile.mkdtemp(prefix="vu", dir="/tmp"))
    sock_path = base / "fn1.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "egpu", "vfio-user", "serve", "--socket", str(sock_path),
         "--function", "nvme", "-o", f"backing={base / 'disk.img'}", "-o", "size=16M"],
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_socket(sock_path, proc)
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(str(sock_path))
        client = VfioUserClient(s)
        client.negotiate()
        class_code = client.region_read(7, 9, 3)
        assert class_code == bytes([0x02, 0x08, 0x01])  # NVMe: mass storage, NVM, NVMe
        s.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
