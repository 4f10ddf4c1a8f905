"""``egpu image push``: check a local qcow2 and its JSON manifest, then publish both in
scottjg/qemu-vfio-apple's layout, so that pulling the image reference yields the same bytes.

Order of trust: everything local is checked before any request (REF and the tags parse,
the file is a qcow2 without a backing file, the JSON parses with the reader ``pull`` uses, and
its sha256 is the file's), so a refused push sends nothing. Then the blobs the registry lacks
go up (``images/upload.py``), and only then are the tags set: a failed push tags nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from egpu.errors import ImageError, NotFoundError, UsageError
from egpu.images.auth import load_credentials
from egpu.images.manifest import (
    ANNOTATION_TITLE,
    EMPTY_CONFIG,
    MAX_METADATA_BYTES,
    MEDIA_IMAGE_JSON,
    MEDIA_OCI_EMPTY,
    MEDIA_OCI_MANIFEST,
    MEDIA_QCOW2,
    METADATA_TITLE,
    Descriptor,
    ImageManifest,
    ImageMetadata,
    build_image_manifest,
    parse_manifest,
    parse_metadata,
    safe_file_name,
    select_layout,
)
from egpu.images.qcow2 import HEADER, Qcow2Header
from egpu.images.reference import Digest, OciReference, parse_reference, parse_tag
from egpu.images.registry import PULL_PUSH, RegistryClient
from egpu.images.upload import DEFAULT_CHUNK_BYTES, Uploader
from egpu.progress import Progress, SilentProgress
from egpu.transfer import StallPolicy

# Where ``image build`` (and qemu-vfio-apple's builder, ``<name>.manifest.json``) put the JSON.
SIDECAR_SUFFIXES = (".json", ".manifest.json")
HASH_CHUNK = 1024 * 1024
MAX_NAME = 128
_FEATURE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
MAX_FEATURE = 64


@dataclass(frozen=True)
class LocalImage:
    """A checked local image: the qcow2, its sha256, and the exact bytes of its JSON manifest."""

    disk: Path
    size: int
    digest: Digest
    metadata: bytes
    metadata_path: Path | None  # None when made from --name/--features
    info: ImageMetadata


@dataclass(frozen=True)
class PushedImage:
    """What a push left in the registry."""

    ref: str
    digest: Digest
    tags: tuple[str, ...]
    disk_digest: Digest
    size: int
    uploaded: tuple[str, ...]  # labels of the blobs sent
    reused: tuple[str, ...]  # labels of the blobs the registry already had


ClientFactory = Callable[[OciReference], RegistryClient]


def default_push_client(ref: OciReference, stall: StallPolicy | None = None) -> RegistryClient:
    """A registry client allowed to push, with the credentials ``pull`` would use."""
    return RegistryClient(
        ref,
        credentials=load_credentials(ref.registry, ref.repository),
        stall=stall or StallPolicy.from_env(os.environ),
        actions=PULL_PUSH,
    )


def push_target(reference: str, tags: Sequence[str] = ()) -> tuple[OciReference, tuple[str, ...]]:
    """REF and every tag to push to, checked (a digest cannot be pushed to)."""
    ref = parse_reference(reference)
    if ref.digest is not None or ref.tag is None:
        raise UsageError(f"push to a tag, not a digest: {reference[:120]!r}")
    all_tags = [ref.tag]
    for tag in tags:
        if parse_tag(tag) not in all_tags:
            all_tags.append(tag)
    return ref, tuple(all_tags)


def sidecar_candidates(disk: Path) -> list[Path]:
    """Where a qcow2's JSON manifest may be, in the order looked at."""
    stem = disk.with_suffix("")
    return [stem.with_name(stem.name + suffix) for suffix in SIDECAR_SUFFIXES]


def load_local_image(
    disk: Path,
    *,
    metadata_path: Path | None = None,
    name: str | None = None,
    features: Sequence[str] = (),
    progress: Progress | None = None,
) -> LocalImage:
    """Check a qcow2 and its JSON manifest (found next to it, or made from ``name``/``features``).

    Raises NotFoundError, UsageError or ImageError with one line saying what is wrong.
    """
    progress = progress or SilentProgress()
    _check_qcow2(disk)
    if metadata_path is None:
        metadata_path = next((p for p in sidecar_candidates(disk) if p.exists()), None)
    elif not metadata_path.exists():
        raise NotFoundError(f"no such file {metadata_path}")
    if metadata_path is not None and (name is not None or features):
        raise UsageError(
            f"{disk.name} already has its JSON manifest {metadata_path}",
            hint="--name and --features only make one for an image without",
        )
    if metadata_path is None and name is None:
        looked = " or ".join(p.name for p in sidecar_candidates(disk))
        raise UsageError(
            f"no JSON manifest next to {disk} ({looked})",
            hint="give --name (and --features) to make one",
        )
    size = disk.stat().st_size
    digest = _sha256_file(disk, size, progress)
    if metadata_path is None:
        assert name is not None
        body = make_metadata(name, disk.name, digest.hex, features)
    else:
        body = _read_metadata(metadata_path)
    try:
        info = parse_metadata(body)
    except ImageError as e:
        raise ImageError(f"{metadata_path}: {e.message}") from None
    if info.sha256 is None:
        raise ImageError(f"{metadata_path} has no sha256 of {disk.name}")
    if info.sha256 != digest.hex:
        raise ImageError(
            f"sha256 mismatch: {metadata_path} says {info.sha256}, {disk.name} is {digest.hex}",
            hint="rebuild the image, or push the file that JSON describes",
        )
    return LocalImage(disk, size, digest, body, metadata_path, info)


def _check_qcow2(disk: Path) -> None:
    try:
        with open(disk, "rb") as f:
            header = Qcow2Header.unpack(f.read(HEADER.size))
    except FileNotFoundError:
        raise NotFoundError(f"no such file {disk}") from None
    except IsADirectoryError:
        raise UsageError(f"{disk} is a directory, not a qcow2 image") from None
    except OSError as e:
        raise ImageError(f"cannot read {disk}: {e.strerror or e}") from None
    except ImageError as e:
        raise ImageError(f"{disk}: {e.message}") from None
    if header.backing_size:
        raise ImageError(
            f"{disk} is an overlay (it has a backing file); a pushed image must stand alone",
            hint="flatten it first: qemu-img convert -O qcow2 OVERLAY FLAT.qcow2",
        )


def _sha256_file(path: Path, size: int, progress: Progress) -> Digest:
    hasher = hashlib.sha256()
    progress.start(f"hashing {path.name}", size)
    try:
        with open(path, "rb") as f:
            while chunk := f.read(HASH_CHUNK):
                hasher.update(chunk)
                progress.advance(len(chunk))
    except OSError as e:
        raise ImageError(f"cannot read {path}: {e.strerror or e}") from None
    finally:
        progress.finish()
    return Digest.of_hex(hasher.hexdigest())


def _read_metadata(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            body = f.read(MAX_METADATA_BYTES + 1)
    except OSError as e:
        raise ImageError(f"cannot read {path}: {e.strerror or e}") from None
    if len(body) > MAX_METADATA_BYTES:
        raise ImageError(f"{path} is over the {MAX_METADATA_BYTES}-byte limit of a JSON manifest")
    return body


def make_metadata(name: str, artifact: str, sha256_hex: str, features: Sequence[str]) -> bytes:
    """A JSON manifest in qemu-vfio-apple's form: name, artifact, sha256, features as flags."""
    if not name or len(name) > MAX_NAME or not name.isprintable():
        raise UsageError(f"bad --name {name[:80]!r}: 1 to {MAX_NAME} printable characters")
    for feature in features:
        if not feature or len(feature) > MAX_FEATURE or not set(feature) <= _FEATURE_CHARS:
            raise UsageError(
                f"bad feature {feature[:80]!r}: letters, digits, '.', '_' and '-', at most "
                f"{MAX_FEATURE}"
            )
    doc = {
        "name": name,
        "artifact": artifact,
        "sha256": sha256_hex,
        # qemu-vfio-apple's publish script reads features as an object of flags
        "features": {feature: True for feature in features},
    }
    return json.dumps(doc, indent=2).encode() + b"\n"


def image_manifest(image: LocalImage) -> tuple[bytes, ImageManifest]:
    """The manifest bytes to push for an image, and the manifest as ``pull`` will read it."""
    config = Descriptor(MEDIA_OCI_EMPTY, _digest_of(EMPTY_CONFIG), len(EMPTY_CONFIG))
    title = safe_file_name(image.disk.name)
    disk = Descriptor(
        MEDIA_QCOW2, image.digest, image.size, {ANNOTATION_TITLE: title} if title else {}
    )
    metadata = Descriptor(
        MEDIA_IMAGE_JSON,
        _digest_of(image.metadata),
        len(image.metadata),
        {ANNOTATION_TITLE: METADATA_TITLE},
    )
    body = build_image_manifest(config, disk, metadata)
    parsed = parse_manifest(body, MEDIA_OCI_MANIFEST)
    # What pull will see: checked here, so a layout pull cannot read is never published.
    assert isinstance(parsed, ImageManifest) and select_layout(parsed).kind == "reference"
    return body, parsed


def push(
    image: LocalImage,
    reference: str,
    *,
    tags: Sequence[str] = (),
    progress: Progress | None = None,
    client_factory: ClientFactory = default_push_client,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> PushedImage:
    """Upload the blobs the registry lacks, then PUT the manifest under every tag."""
    ref, all_tags = push_target(reference, tags)
    progress = progress or SilentProgress()
    body, manifest = image_manifest(image)
    digest = _digest_of(body)
    config, disk, metadata = manifest.config, *manifest.layers
    assert config is not None
    uploaded: list[str] = []
    reused: list[str] = []
    with client_factory(ref) as client:
        up = Uploader(client)
        for desc, label in ((config, "the empty config"), (metadata, METADATA_TITLE)):
            if up.has_blob(desc.digest, desc.size):
                reused.append(label)
            else:
                up.put_blob(EMPTY_CONFIG if desc is config else image.metadata, desc.digest, label)
                uploaded.append(label)
        label = image.disk.name
        if up.has_blob(disk.digest, disk.size):
            progress.note(f"{label}: already in the registry")
            reused.append(label)
        else:
            up.put_blob_chunked(image.disk, image.size, disk.digest, progress, label, chunk_bytes)
            uploaded.append(label)
        for tag in all_tags:
            up.put_manifest(tag, body, MEDIA_OCI_MANIFEST, digest)
    return PushedImage(
        str(ref), digest, all_tags, image.digest, image.size, tuple(uploaded), tuple(reused)
    )


def _digest_of(data: bytes) -> Digest:
    return Digest.of_hex(hashlib.sha256(data).hexdigest())
