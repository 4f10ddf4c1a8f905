"""``egpu pull``: resolve a reference, download and verify its disk image into the cache.

Order of trust: the manifest's bytes are hashed (and must equal a pinned digest), every blob is
hashed against its descriptor, the qcow2 is also checked against the sha256 in the image's JSON
layer, and only then is anything renamed into the cache and the image reference recorded. A failed
pull leaves the previously pulled image and its record untouched.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from egpu.errors import ImageError
from egpu.images.auth import load_credentials
from egpu.images.manifest import (
    Descriptor,
    ImageIndex,
    ImageLayout,
    ImageManifest,
    ImageMetadata,
    parse_manifest,
    parse_metadata,
    safe_file_name,
    select_from_index,
    select_layout,
)
from egpu.images.qcow2 import is_qcow2
from egpu.images.reference import Digest, OciReference, parse_reference
from egpu.images.store import ImageStore, RefRecord
from egpu.progress import Progress, SilentProgress

if TYPE_CHECKING:
    from egpu.images.registry import RegistryClient
    from egpu.transfer import StallPolicy

# scottjg/qemu-vfio-apple's docker-profile image: its publish script tags that profile
# docker-latest (contrib/apple-vfio/image-builder/scripts/publish-to-ghcr.sh).
DEFAULT_IMAGE = "ghcr.io/scottjg/qemu-vfio-apple-images:docker-latest"
DEFAULT_ARCHITECTURE = "arm64"
# How many indexes may stand between a reference and its manifest (an index of indexes is
# not an egpu image layout, and a registry must not lead the pull through an endless chain).
MAX_INDEX_DEPTH = 1


@dataclass(frozen=True)
class PulledImage:
    """The result of a pull: where the verified qcow2 is and what it came from."""

    ref: str
    manifest_digest: Digest
    disk_digest: Digest
    path: Path
    size: int
    file_name: str
    metadata: ImageMetadata | None


ClientFactory = Callable[[OciReference], "RegistryClient"]


def default_client(ref: OciReference, stall: StallPolicy | None = None) -> RegistryClient:
    """A registry client with the user's stored credentials for that registry, if any.

    Without ``stall``, the stall limits come from ``EGPU_STALL_TIMEOUT`` / ``EGPU_MIN_RATE``.
    """
    # httpx comes with the client: commands that only read the cache never import it
    from egpu.images.registry import RegistryClient
    from egpu.transfer import StallPolicy

    return RegistryClient(
        ref,
        credentials=load_credentials(ref.registry, ref.repository),
        stall=stall or StallPolicy.from_env(os.environ),
    )


def pull(
    reference: str | OciReference,
    *,
    store: ImageStore | None = None,
    progress: Progress | None = None,
    client_factory: ClientFactory = default_client,
    architecture: str = DEFAULT_ARCHITECTURE,
) -> PulledImage:
    """Pull an image into the cache (resuming any earlier partial download) and record it."""
    ref = parse_reference(reference) if isinstance(reference, str) else reference
    store = store or ImageStore()
    progress = progress or SilentProgress()
    with client_factory(ref) as client:
        manifest_bytes, manifest_digest, manifest = _resolve(client, ref, architecture)
        layout = select_layout(manifest)
        metadata = None
        if layout.metadata is not None:
            meta_path = _fetch(client, store, layout.metadata, "image metadata", SilentProgress())
            metadata = parse_metadata(meta_path.read_bytes())
            # The blob is verified against its descriptor's digest, so the JSON's sha256 must
            # name that same digest; checked before anything is downloaded (or found cached).
            if metadata.sha256 is not None and metadata.sha256 != layout.disk.digest.hex:
                raise ImageError(
                    f"wrong digest: the image's JSON manifest says sha256:{metadata.sha256} "
                    f"but its qcow2 layer is {layout.disk.digest}"
                )
        label = layout.file_name

        def check_disk(partial: Path) -> None:
            _check_qcow2(partial, label)

        disk_path = _fetch(client, store, layout.disk, label, progress, check=check_disk)
    store.put_blob(manifest_bytes)
    record = RefRecord(
        ref=str(ref),
        manifest_digest=str(manifest_digest),
        disk_digest=str(layout.disk.digest),
        size=layout.disk.size,
        file_name=_file_name(layout, metadata),
        layout=layout.kind,
        metadata_digest=None if layout.metadata is None else str(layout.metadata.digest),
        metadata=None if metadata is None else _metadata_json(metadata),
        pulled_at=time.time(),
    )
    store.write_ref(record)
    return PulledImage(
        record.ref,
        manifest_digest,
        layout.disk.digest,
        disk_path,
        layout.disk.size,
        record.file_name,
        metadata,
    )


def _resolve(
    client: RegistryClient, ref: OciReference, architecture: str
) -> tuple[bytes, Digest, ImageManifest]:
    """Fetch the manifest (through at most MAX_INDEX_DEPTH indexes), checking every digest."""
    body, content_type = client.get_manifest(ref.manifest_ref)
    digest = Digest.of_hex(hashlib.sha256(body).hexdigest())
    if ref.digest is not None and digest != ref.digest:
        raise ImageError(f"wrong digest: registry returned manifest {digest} for {ref.digest}")
    parsed = parse_manifest(body, content_type)
    depth = 0
    while isinstance(parsed, ImageIndex):
        if depth >= MAX_INDEX_DEPTH:
            raise ImageError(
                f"unknown layout: an index inside an index (at most {MAX_INDEX_DEPTH} level)"
            )
        depth += 1
        chosen = select_from_index(parsed, architecture)
        body, content_type = client.get_manifest(str(chosen.digest))
        digest = Digest.of_hex(hashlib.sha256(body).hexdigest())
        if digest != chosen.digest or len(body) != chosen.size:
            raise ImageError(
                f"wrong digest: registry returned manifest {digest} for {chosen.digest}"
            )
        parsed = parse_manifest(body, content_type)
    return body, digest, parsed


def _fetch(
    client: RegistryClient,
    store: ImageStore,
    desc: Descriptor,
    label: str,
    progress: Progress,
    check: Callable[[Path], None] | None = None,
) -> Path:
    """Have one verified blob in the cache (download, resume, or find it there)."""
    digest = desc.digest

    def waiting() -> None:
        progress.note(f"waiting for another egpu pull of {label}")

    with store.locked(digest, on_wait=waiting):
        # Reused only when its size is the descriptor's too: a blob of another size under this
        # name is damaged (or the manifest lies), and a fresh download verifies both.
        if store.has_blob(digest, desc.size):
            return store.blob_path(digest)
        partial = store.partial_path(digest)
        client.download_blob(digest, desc.size, partial, progress, label)
        if check is not None:
            check(partial)
        return store.commit_blob(partial, digest)


def _check_qcow2(partial: Path, label: str) -> None:
    """A verified blob that is not a qcow2 is not a disk image egpu can boot."""
    if not is_qcow2(partial):
        partial.unlink(missing_ok=True)
        raise ImageError(f"unknown layout: {label} is not a qcow2 image")


def _file_name(layout: ImageLayout, metadata: ImageMetadata | None) -> str:
    if metadata is not None and safe_file_name(metadata.artifact):
        return str(metadata.artifact)
    return layout.file_name


def _metadata_json(metadata: ImageMetadata) -> dict[str, object]:
    return {
        "name": metadata.name,
        "artifact": metadata.artifact,
        "sha256": metadata.sha256,
        "features": list(metadata.features),
    }


def resolve_cached(reference: str, store: ImageStore | None = None) -> Path | None:
    """The cached qcow2 of a reference pulled before, or None (no network)."""
    store = store or ImageStore()
    record = store.get_ref(str(parse_reference(reference)))
    if record is None:
        return None
    # Only a blob of the recorded size is the image; anything else needs a fresh pull.
    return store.blob_path(record.disk) if store.has_blob(record.disk, record.size) else None
