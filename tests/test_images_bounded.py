"""Registries and downloads are bounded: huge bodies, trickles, redirect loops, bad digests and
bad URLs each give one error line (no traceback), cost bounded memory, and leave no file in the
cache (except a stalled download's partial, which the next pull resumes)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from egpu.images import pull as pull_module
from egpu.images.pull import pull, resolve_cached
from egpu.images.reference import Digest
from egpu.images.store import ImageStore
from egpu.transfer import MIN_RATE_ENV, STALL_TIMEOUT_ENV
from registry_server import (
    DISK,
    HUGE_BODY_BYTES,
    OCI_INDEX,
    OCI_MANIFEST,
    QCOW2,
    CountingProxy,
    Registry,
    TokenGate,
    egpu,
    egpu_measured,
    home,
    manifest_descriptor,
    one_error_line,
    push_manifest,
    push_plain_image,
    registry,
)

__all__ = ["home", "registry"]  # fixtures, imported so pytest sees them

# The CLI's own footprint is well under this; reading a HUGE_BODY_BYTES body whole is far over.
RSS_BOUND = 200 * 1024 * 1024
STALL_WINDOW = "2"  # seconds: short, so a stall is seen in a few seconds
FAST_PART = 64 * 1024  # bytes a trickling registry sends at full speed first
DRIP_BYTES = 100  # bytes a dripping registry sends per connection before hanging up
HEX = "ab" * 32


@pytest.fixture
def gate(registry: Registry) -> Iterator[TokenGate]:
    g = TokenGate(registry.host)
    yield g
    g.close()


def leftovers(store: ImageStore) -> list[Path]:
    """Every blob, partial download and reference record in the cache."""
    dirs = (store.blobs_dir, store.root / "partial", store.root / "refs")
    return sorted(p for d in dirs if d.exists() for p in d.rglob("*"))


def newline_names(store: ImageStore) -> list[Path]:
    return [p for p in store.root.rglob("*") if "\n" in p.name] if store.root.exists() else []


def test_stall_limits_are_documented_in_pull_help() -> None:
    help_text = egpu("pull", "--help").stdout
    assert STALL_TIMEOUT_ENV in help_text and MIN_RATE_ENV in help_text
    assert "--stall-timeout" in help_text and "--min-rate" in help_text


def test_bad_stall_limit_is_a_usage_error(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(STALL_TIMEOUT_ENV, "soon")
    proc = egpu("pull", "127.0.0.1:1/egpu/x:v1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "--stall-timeout" in proc.stderr


# -- huge bodies ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("error", "error: unknown tag 'v1' in "),  # a 404 whose error body never ends
        ("token", "error: registry 127.0.0.1:"),  # a token response that never ends
        ("manifest", "error: manifest of "),  # a manifest with no Content-Length
        ("redirect", None),  # a redirect with a huge body: followed without reading it
    ],
)
def test_huge_body_costs_bounded_memory(
    home: Path, registry: Registry, gate: TokenGate, kind: str, expected: str | None
) -> None:
    push_plain_image(registry.host, f"egpu/huge-{kind}", "v1", DISK)
    gate.huge = kind
    proc, rss = egpu_measured(
        "pull", "--quiet", f"{gate.host}/egpu/huge-{kind}:v1", workdir=home
    )
    assert rss < RSS_BOUND < HUGE_BODY_BYTES, f"peak RSS {rss >> 20} MiB"
    store = ImageStore()
    if expected is None:
        assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr
        assert store.has_blob(Digest.of_hex(hashlib.sha256(DISK).hexdigest()), len(DISK))
        return
    line = one_error_line(proc)
    assert line.startswith(expected), line
    if kind == "token":
        assert "token response over the 65536-byte limit" in line
    if kind == "manifest":
        assert "too large" in line
    assert leftovers(store) == []


# -- stalls -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["trickle", "silent", "drip"])
def test_stalled_download_fails_and_keeps_the_partial(
    home: Path, registry: Registry, gate: TokenGate, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """1 byte per second, nothing at all after the headers, or a few bytes per connection
    (each reconnect gains some, so retries alone never give up): the pull fails once a window
    is too slow, with the bytes so far kept, and the next pull resumes from them."""
    pushed = push_plain_image(registry.host, f"egpu/stall-{mode}", "v1", DISK)
    ref = f"{gate.host}/egpu/stall-{mode}:v1"
    if mode == "silent":
        gate.silent_blobs = True
        proc = egpu("pull", "--quiet", "--stall-timeout", STALL_WINDOW, ref, timeout=60)
    else:
        if mode == "trickle":
            gate.trickle_after = FAST_PART
        else:
            gate.drip_blobs = DRIP_BYTES
        monkeypatch.setenv(STALL_TIMEOUT_ENV, STALL_WINDOW)
        proc = egpu("pull", "--quiet", ref, timeout=60)
    line = one_error_line(proc)
    assert f"download of plain.qcow2 stalled (under 1 KiB/s for {STALL_WINDOW} s)" in line, line
    assert line.endswith("run the pull again to resume"), line
    store = ImageStore()
    partial = store.partial_path(Digest.parse(pushed.disk_digest))
    if mode == "silent":
        kept = 0
        assert leftovers(store) == []  # nothing arrived, so no empty partial either
    else:
        kept = partial.stat().st_size
        assert (FAST_PART if mode == "trickle" else DRIP_BYTES) <= kept < len(DISK)
        assert leftovers(store) == [partial]
    gate.trickle_after, gate.silent_blobs, gate.drip_blobs = None, False, None
    gate.ranges.clear()
    done = egpu("pull", "--quiet", ref)
    assert done.returncode == 0, done.stderr
    assert gate.ranges == ([f"bytes={kept}-"] if kept else [""])
    record = store.get_ref(ref)
    assert record is not None and store.blob_path(record.disk).read_bytes() == DISK


# -- redirects and URLs -----------------------------------------------------------------------


def test_redirect_loop(home: Path, registry: Registry, gate: TokenGate) -> None:
    pushed = push_plain_image(registry.host, "egpu/loop", "v1", DISK)
    gate.redirect_blobs = f"http://{gate.host}/v2/egpu/loop/blobs/{pushed.disk_digest}"
    line = one_error_line(egpu("pull", f"{gate.host}/egpu/loop:v1"))
    assert line == f"error: registry {gate.host}: more than 10 redirects (a redirect loop?)"
    assert leftovers(ImageStore()) == []


@pytest.mark.parametrize(
    ("where", "url", "message"),
    [
        ("redirect", "http://[::1", "redirect to a bad URL 'http://[::1'"),
        ("redirect", "ftp://127.0.0.1/blob", "redirect to a bad URL 'ftp://127.0.0.1/blob'"),
        ("realm", "http://[::1", "sent a bad token realm URL"),
        ("realm", "file:///etc/passwd", "sent a bad token realm URL"),
    ],
)
def test_bad_urls_from_the_registry(
    home: Path, registry: Registry, gate: TokenGate, where: str, url: str, message: str
) -> None:
    push_plain_image(registry.host, "egpu/badurl", "v1", DISK)
    if where == "redirect":
        gate.redirect_blobs = url
    else:
        gate.realm = url
    line = one_error_line(egpu("pull", f"{gate.host}/egpu/badurl:v1"))
    assert line.startswith(f"error: registry {gate.host}") and message in line, line
    assert leftovers(ImageStore()) == []


@pytest.mark.parametrize(
    "ref",
    [
        "http://127.0.0.1:5000/egpu/x:v1",  # a URL is not a reference
        f"127.0.0.1:5000/egpu/x@sha256:{HEX}\n",
        "127.0.0.1:5000/egpu/x@sha256:" + "z" * 64,
        "127.0.0.1:5000/egpu/x:v1\n",
    ],
)
def test_bad_references_on_the_command_line(home: Path, ref: str) -> None:
    line = one_error_line(egpu("pull", ref), exit_code=2)
    assert line.startswith("error: bad image reference"), line
    assert leftovers(ImageStore()) == []


# -- digests from the registry ----------------------------------------------------------------


@pytest.mark.parametrize("digest", [f"sha256:{HEX}\n", "sha256:" + "z" * 64, f"sha256:{HEX[:-2]}"])
def test_malformed_digest_in_a_manifest(
    home: Path, registry: Registry, gate: TokenGate, digest: str
) -> None:
    """A manifest naming its disk by a digest that is not 64 lowercase hex digits, exactly."""
    gate.manifest_override = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "layers": [{"mediaType": QCOW2, "digest": digest, "size": len(DISK)}],
        }
    ).encode()
    line = one_error_line(egpu("pull", f"{gate.host}/egpu/digest:v1"))
    assert line.startswith("error: malformed manifest: descriptor invalid digest"), line
    store = ImageStore()
    assert leftovers(store) == [] and newline_names(store) == []


# -- the cache --------------------------------------------------------------------------------


def test_cached_blob_of_another_size_is_not_reused(home: Path, registry: Registry) -> None:
    pushed = push_plain_image(registry.host, "egpu/resized", "v1", DISK)
    first = pull(pushed.ref)
    # The right name, the wrong content: a damaged cache (or a lying manifest).
    first.path.chmod(0o644)
    first.path.write_bytes(DISK + b"\0")
    assert resolve_cached(pushed.ref) is None
    proxy = CountingProxy(registry.host)
    try:
        again = pull(f"{proxy.host}/egpu/resized:v1")
        assert proxy.served > len(DISK)  # downloaded again, not taken from the cache
    finally:
        proxy.close()
    assert again.path == first.path and again.path.read_bytes() == DISK


def test_index_depth_is_bounded(
    home: Path, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An index of an index is refused at the default depth; MAX_INDEX_DEPTH is what decides."""
    plain = push_plain_image(registry.host, "egpu/nested", "arm64", DISK)
    inner = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [manifest_descriptor(registry, "egpu/nested", plain.manifest_digest)],
    }
    inner_digest = push_manifest(registry.host, "egpu/nested", "inner", inner)
    inner_size = len(json.dumps(inner).encode())
    # The entry claims to be a manifest, so only the depth limit can stop the chain.
    outer = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": inner_digest, "size": inner_size}],
    }
    push_manifest(registry.host, "egpu/nested", "outer", outer)
    ref = f"{registry.host}/egpu/nested:outer"
    line = one_error_line(egpu("pull", ref))
    assert line.startswith("error: unknown layout: an index inside an index"), line
    monkeypatch.setattr(pull_module, "MAX_INDEX_DEPTH", 2)
    result = pull(ref)
    assert result.path.read_bytes() == DISK
