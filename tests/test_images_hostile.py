"""A registry that misbehaves: ignores Range, sends more than the descriptor says, serves a
manifest that is not the one asked for, or one that is too large."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from egpu.errors import ImageError
from egpu.images.manifest import MAX_MANIFEST_BYTES
from egpu.images.pull import pull
from egpu.images.reference import Digest
from egpu.images.store import ImageStore
from registry_server import (
    DISK,
    CountingProxy,
    Registry,
    TokenGate,
    home,
    no_retry_client,
    push_plain_image,
    registry,
)

__all__ = ["home", "registry"]  # fixtures, imported so pytest sees them


@pytest.fixture
def gate(registry: Registry) -> Iterator[TokenGate]:
    g = TokenGate(registry.host)
    yield g
    g.close()


def test_server_ignoring_range_restarts_cleanly(
    home: Path, registry: Registry, gate: TokenGate
) -> None:
    pushed = push_plain_image(registry.host, "egpu/norange", "v1", DISK)
    # A kept partial from an earlier pull, with wrong bytes: it must not survive a 200 answer.
    store = ImageStore()
    partial = store.partial_path(Digest.parse(pushed.disk_digest))
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"\xee" * 1000)
    gate.ignore_range = True
    result = pull(f"{gate.host}/egpu/norange:v1")
    assert result.path.read_bytes() == DISK
    assert not partial.exists()


def test_more_bytes_than_declared(home: Path, registry: Registry) -> None:
    pushed = push_plain_image(registry.host, "egpu/long", "v1", DISK)
    blob = registry.blob_file(pushed.disk_digest)
    original = blob.read_bytes()
    blob.write_bytes(original + b"x" * 4096)
    try:
        with pytest.raises(ImageError, match="corrupted blob"):
            pull(pushed.ref, client_factory=no_retry_client)
    finally:
        blob.write_bytes(original)
    store = ImageStore()
    assert not store.has_blob(Digest.parse(pushed.disk_digest))


def test_manifest_swapped_for_pinned_digest(
    home: Path, registry: Registry, gate: TokenGate
) -> None:
    pushed = push_plain_image(registry.host, "egpu/pinned", "v1", DISK)
    other = json.dumps({"schemaVersion": 2, "layers": []}).encode()
    gate.manifest_override = other
    with pytest.raises(
        ImageError,
        match=f"wrong digest: registry returned manifest sha256:.* for {pushed.manifest_digest}",
    ):
        pull(f"{gate.host}/egpu/pinned@{pushed.manifest_digest}")
    assert ImageStore().refs() == []


def test_oversized_manifest(home: Path, registry: Registry, gate: TokenGate) -> None:
    gate.manifest_override = b" " * (MAX_MANIFEST_BYTES + 1)
    with pytest.raises(ImageError, match="too large"):
        pull(f"{gate.host}/egpu/huge:v1")


def test_proxy_counts_bytes(registry: Registry) -> None:
    """The byte counter the resume tests rely on does count what the registry sent."""
    pushed = push_plain_image(registry.host, "egpu/count", "v1", DISK)
    proxy = CountingProxy(registry.host)
    try:
        import httpx

        r = httpx.get(f"http://{proxy.host}/v2/egpu/count/blobs/{pushed.disk_digest}")
        assert r.content == DISK
        assert len(DISK) < proxy.served < len(DISK) + 4096
    finally:
        proxy.close()


def test_bad_kept_partial_is_replaced(home: Path, registry: Registry) -> None:
    """Resuming onto bytes that were wrong fails verification once, then one fresh download."""
    pushed = push_plain_image(registry.host, "egpu/badpartial", "v1", DISK)
    proxy = CountingProxy(registry.host)
    try:
        store = ImageStore()
        partial = store.partial_path(Digest.parse(pushed.disk_digest))
        partial.parent.mkdir(parents=True)
        partial.write_bytes(b"\xee" * 1000)
        result = pull(f"{proxy.host}/egpu/badpartial:v1")
        assert result.path.read_bytes() == DISK
        assert proxy.range_requests() == ["bytes=1000-"]  # resumed first, then started over
        assert 2 * len(DISK) - 1000 <= proxy.served < 2 * len(DISK) - 1000 + 16 * 1024  # + headers
    finally:
        proxy.close()
