"""Debian package downloads are bounded like registry pulls: a stall fails with the partial kept
(and the next run resumes it), a mirror sending too much or redirecting in a loop fails in one
line, and a failed download leaves no file. Against a small loopback mirror of the test's own."""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from egpu.debpkg import DebFile, download
from egpu.errors import EngineError
from egpu.transfer import StallPolicy

DATA = bytes(range(256)) * 1024  # 256 KiB
NAME = "pkg_1.0-1_amd64.deb"
FAST_PART = 64 * 1024  # what a trickling mirror sends at full speed first
TRICKLE_PACE = 1.0  # then one byte per second
EXTRA = 100  # bytes a "long" mirror sends past the file's size
SHORT_WINDOW = StallPolicy(min_rate=1024, window=2)


class Mirror:
    """Serves DATA at /pool/NAME (with Range), misbehaving as ``mode`` says:
    ``ok``, ``trickle``, ``long`` (more bytes than the index says), or ``loop`` (redirects)."""

    def __init__(self) -> None:
        mirror = self
        self.mode = "ok"
        self.ranges: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if mirror.mode == "loop":
                    self.send_response(302)
                    self.send_header("Location", self.path)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                mirror.ranges.append(self.headers.get("Range", ""))
                start = 0
                if self.headers.get("Range", "").startswith("bytes="):
                    start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
                body = DATA[start:] + (b"x" * EXTRA if mirror.mode == "long" else b"")
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(DATA) - 1}/{len(DATA)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                with contextlib.suppress(OSError):  # a client that gave up
                    if mirror.mode != "trickle":
                        self.wfile.write(body)
                        return
                    self.wfile.write(body[:FAST_PART])
                    for i in range(FAST_PART, len(body)):
                        time.sleep(TRICKLE_PACE)  # the hostile pace itself, not a wait
                        self.wfile.write(body[i : i + 1])

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass

        self._server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/pool/{NAME}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def mirror() -> Iterator[Mirror]:
    m = Mirror()
    yield m
    m.close()


def deb(uri: str) -> DebFile:
    return DebFile(uri, NAME, len(DATA), hashlib.sha256(DATA).hexdigest())


def files_in(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir()) if dest.exists() else []


def one_line(error: pytest.ExceptionInfo[EngineError]) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


def test_download_verifies_and_renames(tmp_path: Path, mirror: Mirror) -> None:
    (path,) = download([deb(mirror.url)], tmp_path, stall=SHORT_WINDOW)
    assert path.read_bytes() == DATA and files_in(tmp_path) == [NAME]


def test_stall_keeps_the_partial_and_the_next_run_resumes(tmp_path: Path, mirror: Mirror) -> None:
    mirror.mode = "trickle"
    with pytest.raises(EngineError) as error:
        download([deb(mirror.url)], tmp_path, stall=SHORT_WINDOW)
    text = one_line(error)
    assert f"download of {NAME} stalled (under 1 KiB/s for 2 s)" in text, text
    assert "run the command again to resume" in text
    part = tmp_path / f"{NAME}.part"
    kept = part.stat().st_size
    assert FAST_PART <= kept < len(DATA) and files_in(tmp_path) == [part.name]
    mirror.mode = "ok"
    mirror.ranges.clear()
    (path,) = download([deb(mirror.url)], tmp_path, stall=SHORT_WINDOW)
    assert mirror.ranges == [f"bytes={kept}-"]
    assert path.read_bytes() == DATA and files_in(tmp_path) == [NAME]


def test_more_bytes_than_the_index_says(tmp_path: Path, mirror: Mirror) -> None:
    mirror.mode = "long"
    with pytest.raises(EngineError) as error:
        download([deb(mirror.url)], tmp_path, stall=SHORT_WINDOW)
    assert f"the mirror sent more than {len(DATA)} bytes" in one_line(error)
    assert files_in(tmp_path) == []


def test_redirect_loop(tmp_path: Path, mirror: Mirror) -> None:
    mirror.mode = "loop"
    with pytest.raises(EngineError) as error:
        download([deb(mirror.url)], tmp_path, stall=SHORT_WINDOW)
    assert "more than 10 redirects" in one_line(error)
    assert files_in(tmp_path) == []


def test_bad_url(tmp_path: Path) -> None:
    with pytest.raises(EngineError) as error:
        download([deb("http://[::1/pool/x.deb")], tmp_path, stall=SHORT_WINDOW)
    assert "bad URL" in one_line(error)
    assert files_in(tmp_path) == []
