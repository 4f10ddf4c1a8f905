"""A real OCI registry on loopback for the image tests, a push helper, and a byte-counting proxy.

The registry is Debian's ``docker-registry`` (distribution 2.8), configured with storage in a
temporary directory and ``http.addr`` on 127.0.0.1. Pushing uses the distribution API directly
(monolithic blob upload: POST then PUT ?digest=, manifest PUT) so the tests need no other tool.
The proxy forwards raw TCP to the registry, counts the bytes the registry sent back, and can cut
a connection after N bytes or slow the stream down, to break downloads in controlled ways.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from egpu.images.qcow2 import HEADER, QCOW2_MAGIC
from egpu.images.reference import OciReference
from egpu.images.registry import RegistryClient
from egpu.paths import CACHE_ENV, HOME_ENV
from inprocess import run_main

REGISTRY_BIN = "docker-registry"
START_TIMEOUT = 30.0
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
QCOW2 = "application/vnd.scottjg.qemu-vfio.qcow2"
IMAGE_JSON = "application/vnd.scottjg.qemu-vfio.image.manifest.v1+json"
ARTIFACT_TYPE = "application/vnd.scottjg.qemu-vfio.image.v1"
TITLE = "org.opencontainers.image.title"
# A small qcow2 header plus data: enough for the checks a pull makes, without running qemu-img.
DISK = HEADER.pack(QCOW2_MAGIC, 3, 0, 0, 16, 1 << 20) + bytes(range(256)) * 2048  # 512 KiB

CONFIG = """\
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Registry:
    """A running docker-registry process."""

    host: str  # 127.0.0.1:PORT
    root: Path
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def blob_file(self, digest: str) -> Path:
        """Where the registry keeps a blob's bytes (to tamper with them)."""
        hex_ = digest.split(":", 1)[1]
        return self.root / "docker/registry/v2/blobs/sha256" / hex_[:2] / hex_ / "data"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_registry(workdir: Path) -> Registry:
    """Start docker-registry on a free loopback port; returns once /v2/ answers."""
    exe = shutil.which(REGISTRY_BIN)
    if exe is None:
        pytest.fail(f"{REGISTRY_BIN} is not installed (listed in tests/apt-packages.txt)")
    root = workdir / "storage"
    root.mkdir(parents=True)
    port = free_port()
    config = workdir / "config.yml"
    config.write_text(CONFIG.format(root=root, port=port))
    log = open(workdir / "registry.log", "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen([exe, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT)
    host = f"127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            if httpx.get(f"http://{host}/v2/", timeout=2).status_code == 200:
                return Registry(host, root, proc)
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"docker-registry did not start: {(workdir / 'registry.log').read_text()}")
        time.sleep(0.1)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An EGPU_HOME whose cache is private too (the image cache is what these tests inspect)."""
    monkeypatch.setenv(HOME_ENV, str(tmp_path / "home"))
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path


WIDE = {"COLUMNS": "250"}  # rich's width when not on a terminal


def egpu(
    *args: str, timeout: float = 120, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the CLI in this process with the current (test) environment (``timeout`` is
    pytest's then); egpu_process, egpu_popen and egpu_measured start a real one."""
    return run_main(args, {**os.environ, **WIDE}, input)


def egpu_process(
    *args: str, timeout: float = 120, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the CLI in a subprocess with the current (test) environment."""
    return subprocess.run([sys.executable, "-m", "egpu", *args], capture_output=True,
                          text=True, timeout=timeout, input=input, env={**os.environ, **WIDE})


def one_error_line(proc: subprocess.CompletedProcess[str], exit_code: int = 1) -> str:
    """The single ``error: ...`` line a failed command printed (and nothing else)."""
    assert proc.returncode == exit_code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


# Runs the CLI and, at its exit, writes the peak RSS of its own address space (VmHWM) to argv[1].
# Not rusage: a child forked from the test process starts as a copy of it, and Linux carries
# that copy's size into ru_maxrss across exec, so the figure would depend on pytest's size.
_MEASURED_CLI = """
import atexit, runpy, sys
report_to = sys.argv[1]
def report():
    with open("/proc/self/status") as status:
        peak = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    with open(report_to, "w") as out:
        out.write(peak)
atexit.register(report)
sys.argv = ["egpu", *sys.argv[2:]]
runpy.run_module("egpu", run_name="__main__")
"""


def egpu_measured(
    *args: str, workdir: Path, timeout: float = 120
) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run the CLI like ``egpu`` and also return its peak RSS in bytes (VmHWM at its exit)."""
    out_path, err_path = workdir / "measured.out", workdir / "measured.err"
    peak_path = workdir / "measured.peak"
    peak_path.unlink(missing_ok=True)
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.run(
            [sys.executable, "-c", _MEASURED_CLI, str(peak_path), *args],
            stdout=out, stderr=err, stdin=subprocess.DEVNULL,
            env={**os.environ, **WIDE}, timeout=timeout,
        )
    completed = subprocess.CompletedProcess(
        proc.args, proc.returncode, out_path.read_text(), err_path.read_text()
    )
    assert peak_path.exists(), f"the CLI did not report its peak RSS: {completed.stderr}"
    return completed, int(peak_path.read_text()) * 1024  # /proc reports kB


def egpu_popen(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "egpu", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reg = start_registry(tmp_path_factory.mktemp("registry"))
    yield reg
    reg.stop()


def no_retry_client(ref: OciReference) -> RegistryClient:
    """A registry client that gives up on the first transient error (tests of failures)."""
    return RegistryClient(ref, retry_delays=())


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def push_blob(host: str, repo: str, data: bytes) -> str:
    """Upload one blob monolithically; returns its digest."""
    digest = sha256_digest(data)
    with httpx.Client(base_url=f"http://{host}", timeout=30) as c:
        r = c.post(f"/v2/{repo}/blobs/uploads/")
        assert r.status_code == 202, r.text
        location = r.headers["location"]
        sep = "&" if "?" in location else "?"
        r = c.put(
            f"{location}{sep}digest={digest}",
            content=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        assert r.status_code == 201, r.text
    return digest


def push_manifest(host: str, repo: str, tag: str, manifest: dict[str, Any]) -> str:
    """PUT a manifest under a tag; returns its digest."""
    body = json.dumps(manifest).encode()
    r = httpx.put(
        f"http://{host}/v2/{repo}/manifests/{tag}",
        content=body,
        headers={"Content-Type": manifest["mediaType"]},
        timeout=30,
    )
    assert r.status_code == 201, r.text
    return sha256_digest(body)


def manifest_descriptor(registry: Registry, repo: str, digest: str) -> dict[str, Any]:
    """The descriptor of a manifest already in the registry (for building an index)."""
    r = httpx.get(
        f"{registry.url}/v2/{repo}/manifests/{digest}",
        headers={"Accept": OCI_MANIFEST},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(r.content)}


def descriptor(media_type: str, data: bytes, **annotations: str) -> dict[str, Any]:
    d: dict[str, Any] = {"mediaType": media_type, "digest": sha256_digest(data), "size": len(data)}
    if annotations:
        d["annotations"] = annotations
    return d


@dataclass
class Pushed:
    """What a push helper put in the registry."""

    ref: str
    manifest_digest: str
    disk: bytes
    disk_digest: str
    metadata_digest: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def push_reference_image(
    host: str,
    repo: str,
    tag: str,
    disk: bytes,
    *,
    file_name: str = "disk.qcow2",
    metadata: dict[str, Any] | None = None,
) -> Pushed:
    """Push scottjg/qemu-vfio-apple's layout: qcow2 layer + JSON layer, artifactType set."""
    meta = (
        metadata
        if metadata is not None
        else {
            "name": repo.rsplit("/", 1)[-1],
            "artifact": file_name,
            "sha256": hashlib.sha256(disk).hexdigest(),
            "features": ["docker"],
        }
    )
    meta_bytes = json.dumps(meta).encode()
    empty = b"{}"
    push_blob(host, repo, empty)
    disk_digest = push_blob(host, repo, disk)
    meta_digest = push_blob(host, repo, meta_bytes)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": descriptor(OCI_EMPTY, empty),
        "layers": [
            descriptor(QCOW2, disk, **{TITLE: file_name}),
            descriptor(IMAGE_JSON, meta_bytes, **{TITLE: "manifest.json"}),
        ],
    }
    digest = push_manifest(host, repo, tag, manifest)
    return Pushed(f"{host}/{repo}:{tag}", digest, disk, disk_digest, meta_digest)


def push_plain_image(
    host: str,
    repo: str,
    tag: str,
    disk: bytes,
    *,
    media_type: str = "application/octet-stream",
    title: str = "plain.qcow2",
) -> Pushed:
    """Push a plain artifact whose only layer is the qcow2 (as ``oras push`` makes)."""
    empty = b"{}"
    push_blob(host, repo, empty)
    disk_digest = push_blob(host, repo, disk)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_EMPTY, empty),
        "layers": [descriptor(media_type, disk, **{TITLE: title})],
    }
    digest = push_manifest(host, repo, tag, manifest)
    return Pushed(f"{host}/{repo}:{tag}", digest, disk, disk_digest)


def push_layers(host: str, repo: str, tag: str, layers: list[tuple[str, bytes]]) -> str:
    """Push an artifact with arbitrary layers (for unknown-layout cases)."""
    empty = b"{}"
    push_blob(host, repo, empty)
    descs = []
    for media_type, data in layers:
        push_blob(host, repo, data)
        descs.append(descriptor(media_type, data))
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_EMPTY, empty),
        "layers": descs,
    }
    return push_manifest(host, repo, tag, manifest)


def make_qcow2(
    qemu_img: list[str], env: dict[str, str], workdir: Path, mib: int, seed: int
) -> bytes:
    """A real qcow2 (from qemu-img) holding ``mib`` MiB of pseudo-random data."""
    raw = workdir / f"disk-{seed}.raw"
    out = workdir / f"disk-{seed}.qcow2"
    raw.write_bytes(_pseudo_random(mib * 1024 * 1024, seed))
    subprocess.run(
        [*qemu_img, "convert", "-f", "raw", "-O", "qcow2", str(raw), str(out)],
        check=True,
        env={**os.environ, **env},
        capture_output=True,
    )
    raw.unlink()
    return out.read_bytes()


def _pseudo_random(n: int, seed: int) -> bytes:
    # Incompressible, so the qcow2 is as large as asked; reproducible from the seed.
    return random.Random(seed).randbytes(n)


class CountingProxy:
    """A loopback TCP proxy in front of the registry that counts and can cut or slow the stream.

    ``served`` counts bytes sent from the registry to clients over the proxy's lifetime;
    ``cut_after`` closes the connection carrying the byte that crosses that count (once);
    ``delay`` sleeps between forwarded chunks of ``chunk`` bytes (to keep a pull running).
    """

    def __init__(
        self,
        upstream: str,
        *,
        cut_after: int | None = None,
        delay: float = 0.0,
        chunk: int = 64 * 1024,
    ) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.cut_after = cut_after
        self.delay = delay
        self.chunk = chunk
        self.served = 0
        self.cuts = 0
        self.requests: list[bytes] = []
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def reset(self, *, cut_after: int | None = None, delay: float = 0.0) -> None:
        with self._lock:
            self.served = 0
            self.cut_after = cut_after
            self.delay = delay
            self.requests.clear()

    def close(self) -> None:
        """Stop accepting and wait for the accept thread, so no stale thread can ever accept on
        a reused descriptor (closing alone does not wake a blocked accept on Linux)."""
        self._stop.set()
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=10)
        self._server.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._up, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._down, args=(client, upstream), daemon=True).start()

    def _up(self, client: socket.socket, upstream: socket.socket) -> None:
        try:
            while data := client.recv(65536):
                with self._lock:
                    self.requests.append(data)
                upstream.sendall(data)
        except OSError:
            pass
        finally:
            _shut(upstream)

    def _down(self, client: socket.socket, upstream: socket.socket) -> None:
        try:
            while data := upstream.recv(self.chunk):
                with self._lock:
                    cut = self.cut_after
                    if cut is not None and self.served + len(data) >= cut:
                        data = data[: cut - self.served]
                        self.cut_after = None
                        self.cuts += 1
                        self.served += len(data)
                        client.sendall(data)
                        break
                    self.served += len(data)
                    delay = self.delay
                client.sendall(data)
                if delay:
                    time.sleep(delay)
        except OSError:
            pass
        finally:
            _shut(client)
            _shut(upstream)

    def range_requests(self) -> list[str]:
        """The Range headers clients sent, in order."""
        text = b"".join(self.requests).decode("latin-1")
        return [
            line.split(":", 1)[1].strip()
            for line in text.split("\r\n")
            if line.lower().startswith("range:")
        ]


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


# -- qemu-img from the engine -------------------------------------------------------------------


def engine_tool(name: str) -> tuple[list[str], dict[str, str]]:
    """argv prefix and environment of an engine program (qemu-img, qemu-io)."""
    from egpu.engine.qemu import find_engine
    from egpu.errors import EngineError

    try:
        engine = find_engine()
    except EngineError as e:
        pytest.fail(f"these tests need the engine's {name} (./run-tests runs egpu setup): {e}")
    return engine.program(name), engine.env()


# -- a token-gated front for the registry -------------------------------------------------------

GATE_TOKEN = "egpu-test-token"
GATE_SERVICE = "egpu-test"
FORWARDED_HEADERS = ("content-type", "content-length", "content-range", "docker-content-digest")
# A hostile body: far more than any cap, sent in pieces until the client hangs up.
HUGE_BODY_BYTES = 300 * 1024 * 1024
HUGE_PIECE = 1024 * 1024
TRICKLE_PACE = 1.0  # seconds between the bytes of a trickled blob: 1 byte per second
SILENT_HOLD = 60.0  # how long a silent answer keeps the connection open at most
# Which response a TokenGate can make huge.
HUGE_KINDS = ("token", "error", "manifest", "redirect")
REDIRECTED_MARK = "egpu-hop=1"
# What a push sends and what the registry answers it with (forwarded by a TokenGate).
UPLOAD_HEADERS = ("content-type", "content-length", "content-range")
UPLOAD_ANSWER_HEADERS = (*FORWARDED_HEADERS, "location", "range", "docker-upload-uuid")
# Upload Locations a hostile registry may give: not a URL, and plain HTTP to a remote host.
BAD_LOCATIONS = {"bad-location": "http://[::1", "remote-location": "http://example.com/upload"}
# How a TokenGate can answer a push: a POST whose error body never ends, a POST accepted with a
# body that never ends, a bad upload Location, a manifest PUT whose error body never ends, a
# chunk acknowledged with another Range, a blob stored under another digest.
HOSTILE_UPLOADS = (
    "huge-error", "huge-accept", *BAD_LOCATIONS, "huge-manifest-error", "wrong-range",
    "wrong-digest",
)


class TokenGate:
    """An HTTP front that demands a bearer token, as GHCR does, and forwards to the registry.

    ``/token`` hands out the token (only to ``user``:``password`` when those are set);
    ``fail_next`` answers that many API requests with 503 first; ``redirect_blobs`` answers
    blob requests with a redirect to that URL. Hostile modes: ``huge`` gives one kind of
    response (HUGE_KINDS) a HUGE_BODY_BYTES body; ``realm`` replaces the token realm URL;
    ``trickle_after`` sends blob bodies at full speed up to that many bytes, then one byte per
    TRICKLE_PACE; ``silent_blobs`` sends a blob's headers and then nothing; ``drip_blobs``
    sends that many bytes of each blob response, then hangs up. ``ranges`` records the Range
    headers of blob requests. Pushes (HEAD, POST, PUT, PATCH) are forwarded too, token-gated
    with a push scope; ``hostile_upload`` (HOSTILE_UPLOADS) makes them misbehave, ``requests``
    records every request's method and path, ``token_scopes`` every scope asked for;
    ``upload_origin`` moves the upload Locations the registry gives to another HOST:PORT.
    """

    def __init__(self, upstream: str, *, user: str | None = None, password: str | None = None):
        import base64
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        gate = self
        self.upstream = upstream
        self.basic = (
            "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode() if user else None
        )
        self.fail_next = 0
        self.redirect_blobs: str | None = None
        self.ignore_range = False  # answer Range requests with the whole blob (200)
        self.manifest_override: bytes | None = None  # serve this for every manifest request
        self.token_requests: list[dict[str, str]] = []
        self.unauthorized = 0
        self.huge: str | None = None
        self.realm: str | None = None
        self.trickle_after: int | None = None
        self.silent_blobs = False
        self.drip_blobs: int | None = None
        self.ranges: list[str] = []
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, in order
        self.token_scopes: list[str] = []
        self.hostile_upload: str | None = None  # one of HOSTILE_UPLOADS
        self.upload_origin: str | None = None  # HOST:PORT that upload Locations are moved to

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _send(
                self, status: int, body: bytes = b"", headers: dict[str, str] | None = None
            ) -> None:
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                if "content-length" not in {k.lower() for k in (headers or {})}:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _send_huge(self, status: int, headers: dict[str, str]) -> None:
                """A body of HUGE_BODY_BYTES without Content-Length (ends when the connection
                does), so only a reader that stops on its own cap gets away cheaply."""
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                piece = b"{" * HUGE_PIECE
                try:
                    for _ in range(HUGE_BODY_BYTES // HUGE_PIECE):
                        self.wfile.write(piece)
                except OSError:
                    pass  # the client stopped reading: what a bounded client does
                self.close_connection = True

            def _forward_body(self, r: httpx.Response, blob: bool) -> None:
                sent = 0
                if blob and gate.drip_blobs is not None:
                    self.wfile.write(r.read()[: gate.drip_blobs])
                    self.close_connection = True
                    return
                for chunk in r.iter_raw():
                    limit = gate.trickle_after if blob else None
                    if limit is None or sent + len(chunk) <= limit:
                        self.wfile.write(chunk)
                        sent += len(chunk)
                        continue
                    fast = max(limit - sent, 0)
                    self.wfile.write(chunk[:fast])
                    sent += fast
                    for i in range(fast, len(chunk)):
                        time.sleep(TRICKLE_PACE)  # the hostile pace itself, not a wait
                        self.wfile.write(chunk[i : i + 1])

            def _hold_silently(self) -> None:
                # Returns when the client hangs up (recv sees EOF) or SILENT_HOLD passes.
                self.connection.settimeout(SILENT_HOLD)
                with contextlib.suppress(OSError):
                    self.connection.recv(1)
                self.close_connection = True

            def _demand_token(self, path: str, actions: str) -> bool:
                """Answer 401 with a token challenge unless the request carries the token."""
                if self.headers.get("Authorization") == f"Bearer {GATE_TOKEN}":
                    return False
                gate.unauthorized += 1
                repo = re.split(r"/(?:blobs|manifests)/", path.removeprefix("/v2/"))[0]
                realm = gate.realm or f"http://{self.headers['Host']}/token"
                challenge = (
                    f'Bearer realm="{realm}",service="{GATE_SERVICE}",'
                    f'scope="repository:{repo}:{actions}"'
                )
                self._send(401, b"", {"WWW-Authenticate": challenge})
                return True

            def _forward_write(self, method: str) -> None:
                """HEAD, POST, PUT, PATCH (a push): token-gated, forwarded with the client's
                Host so the registry's upload Locations point back at the gate."""
                from urllib.parse import urlsplit

                url = urlsplit(self.path)
                gate.requests.append((method, url.path))
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if self._demand_token(url.path, "pull" if method == "HEAD" else "pull,push"):
                    return
                hostile = gate.hostile_upload
                manifest = "/manifests/" in url.path
                if method == "POST" and hostile == "huge-error":
                    self._send_huge(400, {"Content-Type": "application/json"})
                    return
                if method == "POST" and hostile in BAD_LOCATIONS:
                    self._send(202, b"", {"Location": BAD_LOCATIONS[hostile]})
                    return
                if method == "PUT" and manifest and hostile == "huge-manifest-error":
                    self._send_huge(400, {"Content-Type": "application/json"})
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() in UPLOAD_HEADERS}
                headers["Host"] = self.headers["Host"]
                r = httpx.request(
                    method, f"http://{gate.upstream}{self.path}", headers=headers, content=body,
                    timeout=30,
                )
                out = {
                    k: v
                    for k, v in r.headers.items()
                    if k.lower() in UPLOAD_ANSWER_HEADERS
                    and (method == "HEAD" or k.lower() != "content-length")
                }
                if method == "POST" and gate.upload_origin is not None:
                    # the upload continues at another origin (as a storage backend would)
                    out = {
                        k: v.replace(f"//{self.headers['Host']}/", f"//{gate.upload_origin}/")
                        if k.lower() == "location" else v
                        for k, v in out.items()
                    }
                if method == "PATCH" and hostile == "wrong-range":
                    out = {k: v for k, v in out.items() if k.lower() != "range"}
                    out["Range"] = "0-0"
                if method == "PUT" and not manifest and hostile == "wrong-digest":
                    out = {k: v for k, v in out.items() if k.lower() != "docker-content-digest"}
                    out["Docker-Content-Digest"] = "sha256:" + "0" * 64
                if method == "POST" and hostile == "huge-accept":
                    self._send_huge(r.status_code, out)
                    return
                self._send(r.status_code, b"" if method == "HEAD" else r.content, out)

            def do_HEAD(self) -> None:
                self._forward_write("HEAD")

            def do_POST(self) -> None:
                self._forward_write("POST")

            def do_PUT(self) -> None:
                self._forward_write("PUT")

            def do_PATCH(self) -> None:
                self._forward_write("PATCH")

            def do_GET(self) -> None:
                from urllib.parse import parse_qsl, urlsplit

                url = urlsplit(self.path)
                gate.requests.append(("GET", url.path))
                if url.path == "/token":
                    gate.token_requests.append(dict(parse_qsl(url.query)))
                    gate.token_scopes += [v for k, v in parse_qsl(url.query) if k == "scope"]
                    if gate.basic and self.headers.get("Authorization") != gate.basic:
                        self._send(401, b'{"errors":[{"code":"UNAUTHORIZED"}]}')
                        return
                    if gate.huge == "token":
                        self._send_huge(200, {"Content-Type": "application/json"})
                        return
                    self._send(
                        200,
                        json.dumps({"token": GATE_TOKEN}).encode(),
                        {"Content-Type": "application/json"},
                    )
                    return
                if self._demand_token(url.path, "pull"):
                    return
                if gate.fail_next > 0:
                    gate.fail_next -= 1
                    self._send(503, b"busy")
                    return
                if gate.manifest_override is not None and "/manifests/" in url.path:
                    self._send(
                        200,
                        gate.manifest_override,
                        {"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
                    )
                    return
                blob = "/blobs/" in url.path
                if "/manifests/" in url.path and gate.huge in ("error", "manifest"):
                    status = 404 if gate.huge == "error" else 200
                    self._send_huge(status, {"Content-Type": "application/json"})
                    return
                if blob and gate.huge == "redirect" and REDIRECTED_MARK not in url.query:
                    self._send_huge(307, {"Location": f"{url.path}?{REDIRECTED_MARK}"})
                    return
                if gate.redirect_blobs and blob:
                    self._send(307, b"", {"Location": gate.redirect_blobs})
                    return
                if blob:
                    gate.ranges.append(self.headers.get("Range", ""))
                if blob and gate.silent_blobs:
                    self.send_response(200)
                    self.send_header("Content-Length", "1048576")
                    self.end_headers()
                    self._hold_silently()
                    return
                forward = ("accept",) if gate.ignore_range else ("accept", "range")
                headers = {k: v for k, v in self.headers.items() if k.lower() in forward}
                with httpx.stream(
                    "GET", f"http://{gate.upstream}{url.path}", headers=headers, timeout=30
                ) as r:
                    out = {k: v for k, v in r.headers.items() if k.lower() in FORWARDED_HEADERS}
                    self.send_response(r.status_code)
                    for k, v in out.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self._forward_body(r, blob)

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that hangs up early (as pull does on a too-large manifest)

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
