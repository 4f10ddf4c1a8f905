"""OCI / Docker manifests and indexes, and which layers of an artifact make the disk image: pure.

Accepted: OCI image manifest and index, Docker v2 schema 2 manifest and manifest list. Two
artifact layouts are understood:

* scottjg/qemu-vfio-apple's layout (contrib/apple-vfio/image-builder/scripts/publish-to-ghcr.sh;
  ``ImageLayout.kind`` "reference"): one qcow2 layer (``MEDIA_QCOW2``, file name in the title
  annotation) plus one JSON layer (``MEDIA_IMAGE_JSON``: name, artifact file name, sha256,
  features);
* a plain artifact whose only layer is a qcow2 (qcow2 media type or a ``.qcow2`` title, as
  ``oras push REF disk.qcow2`` makes).

Anything else is an "unknown layout" error. Registry JSON is untrusted: sizes are capped, types
checked, digests validated before anything uses them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from egpu.errors import ImageError
from egpu.images.reference import Digest

MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = (MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST)
INDEX_TYPES = (MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST)
# Sent as Accept so a registry never converts the manifest (that would change its digest).
MANIFEST_ACCEPT = ", ".join((*MANIFEST_TYPES, *INDEX_TYPES))

# scottjg/qemu-vfio-apple's artifact (contrib/apple-vfio/image-builder/scripts/publish-to-ghcr.sh).
ARTIFACT_TYPE_IMAGE = "application/vnd.scottjg.qemu-vfio.image.v1"
MEDIA_QCOW2 = "application/vnd.scottjg.qemu-vfio.qcow2"
MEDIA_IMAGE_JSON = "application/vnd.scottjg.qemu-vfio.image.manifest.v1+json"
MEDIA_OCI_EMPTY = "application/vnd.oci.empty.v1+json"
ANNOTATION_TITLE = "org.opencontainers.image.title"
# The JSON layer's title in that layout (the publish script stages it under this name).
METADATA_TITLE = "manifest.json"
# The OCI empty descriptor's content (image-spec manifest.md, "Guidance for an Empty Descriptor").
EMPTY_CONFIG = b"{}"
QCOW2_SUFFIX = ".qcow2"

# Caps on untrusted registry data. distribution itself refuses manifests above 4 MiB.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_METADATA_BYTES = 1024 * 1024
MAX_LAYERS = 256
MAX_INDEX_ENTRIES = 1024
MAX_ANNOTATIONS = 256
MAX_STRING = 4096
MAX_PACKAGES = 20000
MAX_PACKAGE_FIELD = 256
# A disk image larger than this is not something a registry should be handing us.
MAX_BLOB_BYTES = 1 << 40
SCHEMA_VERSION = 2
ARTIFACT_NAME_KEYS = ("artifact", "artifactFile", "artifact_file", "file", "filename")

_MEDIA_TYPE_PART = r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
# matched with fullmatch: "$" alone would let a trailing newline through
_MEDIA_TYPE_RE = re.compile(rf"{_MEDIA_TYPE_PART}/{_MEDIA_TYPE_PART}")
_HEX64_RE = re.compile(r"[a-f0-9]{64}")


@dataclass(frozen=True)
class Platform:
    """The platform an index entry is for."""

    os: str
    architecture: str
    variant: str | None = None


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor: what a blob is, its digest and its exact size."""

    media_type: str
    digest: Digest
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False, compare=False)
    artifact_type: str | None = None
    platform: Platform | None = None

    @property
    def title(self) -> str | None:
        return self.annotations.get(ANNOTATION_TITLE)


@dataclass(frozen=True)
class ImageManifest:
    """One image or artifact manifest."""

    media_type: str
    config: Descriptor | None
    layers: tuple[Descriptor, ...]
    artifact_type: str | None = None


@dataclass(frozen=True)
class ImageIndex:
    """A multi-manifest index (OCI index or Docker manifest list)."""

    media_type: str
    manifests: tuple[Descriptor, ...]


@dataclass(frozen=True)
class ImageLayout:
    """The layers of an artifact egpu uses: the disk and, in qemu-vfio-apple's layout, its JSON."""

    kind: Literal["reference", "plain"]
    disk: Descriptor
    metadata: Descriptor | None = None

    @property
    def file_name(self) -> str:
        """A display name for the disk: its title annotation (sanitised) or the digest."""
        return safe_file_name(self.disk.title) or f"{self.disk.digest.hex[:12]}{QCOW2_SUFFIX}"


@dataclass(frozen=True)
class ImageMetadata:
    """The JSON layer of scottjg/qemu-vfio-apple's layout."""

    name: str | None
    artifact: str | None
    sha256: str | None  # 64 lowercase hex digits of the qcow2, when given
    features: tuple[str, ...] = ()
    # written by ``egpu image build`` (optional: other builders' files lack them)
    arch: str | None = None
    profile: str | None = None
    packages: Mapping[str, str] = field(default_factory=dict, hash=False)  # name -> version

    def to_json(self) -> dict[str, object]:
        """The JSON layer's fields (the optional ones only when set)."""
        doc: dict[str, object] = {"name": self.name, "artifact": self.artifact,
                                  "sha256": self.sha256, "features": list(self.features)}
        for key, value in (("arch", self.arch), ("profile", self.profile)):
            if value is not None:
                doc[key] = value
        if self.packages:
            doc["packages"] = dict(sorted(self.packages.items()))
        return doc

    def dump(self) -> bytes:
        """The file's bytes as egpu writes them (published verbatim by ``image push``)."""
        return (json.dumps(self.to_json(), indent=2) + "\n").encode()


def _fail(message: str) -> ImageError:
    return ImageError(f"malformed manifest: {message}")


def _str(value: Any, what: str, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or len(value) > MAX_STRING:
        raise _fail(f"{what} must be a string")
    return value


def _media_type(value: Any, what: str) -> str:
    text = _str(value, what)
    assert text is not None
    if not _MEDIA_TYPE_RE.fullmatch(text):
        raise _fail(f"{what} {text[:80]!r} is not a media type")
    return text


def _annotations(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_ANNOTATIONS:
        raise _fail("annotations must be an object of strings")
    out: dict[str, str] = {}
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str) or len(k) + len(v) > MAX_STRING:
            raise _fail("annotations must be an object of strings")
        out[k] = v
    return out


def _platform(value: Any) -> Platform | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _fail("platform must be an object")
    os_ = _str(value.get("os"), "platform.os")
    arch = _str(value.get("architecture"), "platform.architecture")
    assert os_ is not None and arch is not None
    return Platform(os_, arch, _str(value.get("variant"), "platform.variant", optional=True))


def parse_descriptor(value: Any) -> Descriptor:
    """Validate one descriptor object: media type, sha256 digest, size within bounds."""
    if not isinstance(value, dict):
        raise _fail("descriptor must be an object")
    size = value.get("size")
    # bool is an int subclass in Python; JSON true is not a size.
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_BLOB_BYTES:
        raise _fail(f"descriptor size {size!r} out of range")
    digest_text = value.get("digest")
    try:
        digest = Digest.parse(digest_text)
    except ImageError as e:
        raise _fail(f"descriptor {e}") from None
    artifact_type = value.get("artifactType")
    return Descriptor(
        media_type=_media_type(value.get("mediaType"), "mediaType"),
        digest=digest,
        size=size,
        annotations=_annotations(value.get("annotations")),
        artifact_type=None if artifact_type is None else _media_type(artifact_type, "artifactType"),
        platform=_platform(value.get("platform")),
    )


def parse_manifest(body: bytes, content_type: str | None = None) -> ImageManifest | ImageIndex:
    """Parse a manifest or index from its raw bytes; ImageError when malformed or unsupported."""
    if len(body) > MAX_MANIFEST_BYTES:
        raise _fail(f"{len(body)} bytes is over the {MAX_MANIFEST_BYTES}-byte limit")
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise _fail("not JSON") from None
    if not isinstance(doc, dict):
        raise _fail("not a JSON object")
    if doc.get("schemaVersion") != SCHEMA_VERSION:
        raise _fail(f"unsupported schemaVersion {doc.get('schemaVersion')!r}")
    declared = doc.get("mediaType")
    header = content_type.split(";", 1)[0].strip() if content_type else None
    if declared is not None:
        media_type = _media_type(declared, "mediaType")
    elif header in (*MANIFEST_TYPES, *INDEX_TYPES):
        media_type = header
    else:
        # OCI makes mediaType optional; the shape then tells.
        media_type = MEDIA_OCI_INDEX if "manifests" in doc else MEDIA_OCI_MANIFEST
    if media_type in INDEX_TYPES:
        entries = doc.get("manifests")
        if not isinstance(entries, list) or len(entries) > MAX_INDEX_ENTRIES:
            raise _fail("index manifests must be a list")
        return ImageIndex(media_type, tuple(parse_descriptor(e) for e in entries))
    if media_type not in MANIFEST_TYPES:
        raise ImageError(f"unsupported manifest type {media_type!r}")
    layers = doc.get("layers")
    if not isinstance(layers, list) or len(layers) > MAX_LAYERS:
        raise _fail("layers must be a list")
    config = doc.get("config")
    artifact_type = doc.get("artifactType")
    return ImageManifest(
        media_type=media_type,
        config=None if config is None else parse_descriptor(config),
        layers=tuple(parse_descriptor(layer) for layer in layers),
        artifact_type=None if artifact_type is None else _media_type(artifact_type, "artifactType"),
    )


def select_from_index(index: ImageIndex, architecture: str = "arm64") -> Descriptor:
    """Pick an index's manifest: our artifact type, else the platform, else the only one."""
    usable = [d for d in index.manifests if d.media_type in MANIFEST_TYPES]
    for d in usable:
        if d.artifact_type == ARTIFACT_TYPE_IMAGE:
            return d
    for d in usable:
        if d.platform is not None and d.platform.architecture == architecture:
            return d
    if len(usable) == 1:
        return usable[0]
    raise ImageError(
        f"unknown layout: the index lists {len(index.manifests)} manifests and none is an "
        f"egpu disk image for {architecture}"
    )


def _is_qcow2_layer(d: Descriptor) -> bool:
    title = d.title or ""
    return d.media_type == MEDIA_QCOW2 or "qcow2" in d.media_type or title.endswith(QCOW2_SUFFIX)


def select_layout(manifest: ImageManifest) -> ImageLayout:
    """Which layer is the disk (and which its JSON): qemu-vfio-apple's layout or a plain qcow2."""
    disks = [d for d in manifest.layers if d.media_type == MEDIA_QCOW2]
    metas = [d for d in manifest.layers if d.media_type == MEDIA_IMAGE_JSON]
    if len(disks) == 1 and len(metas) <= 1 and len(manifest.layers) == len(disks) + len(metas):
        if metas and metas[0].size > MAX_METADATA_BYTES:
            raise ImageError(f"image metadata layer too large ({metas[0].size} bytes)")
        return ImageLayout("reference" if metas else "plain", disks[0], metas[0] if metas else None)
    if len(manifest.layers) == 1 and _is_qcow2_layer(manifest.layers[0]):
        return ImageLayout("plain", manifest.layers[0])
    kinds = ", ".join(sorted({d.media_type for d in manifest.layers})) or "no layers"
    raise ImageError(
        f"unknown layout: expected one qcow2 layer (and optionally its JSON manifest), got {kinds}"
    )


def descriptor_json(d: Descriptor) -> dict[str, Any]:
    """A descriptor as the manifest JSON carries it."""
    out: dict[str, Any] = {"mediaType": d.media_type, "digest": str(d.digest), "size": d.size}
    if d.annotations:
        out["annotations"] = dict(d.annotations)
    return out


def build_image_manifest(config: Descriptor, disk: Descriptor, metadata: Descriptor) -> bytes:
    """The OCI image manifest of qemu-vfio-apple's layout, as exact bytes (what is pushed).

    No timestamp goes in, so the same image always makes the same bytes and the same digest.
    """
    doc = {
        "schemaVersion": SCHEMA_VERSION,
        "mediaType": MEDIA_OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE_IMAGE,
        "config": descriptor_json(config),
        "layers": [descriptor_json(disk), descriptor_json(metadata)],
    }
    return json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"


def parse_metadata(body: bytes) -> ImageMetadata:
    """Parse qemu-vfio-apple's JSON layer: {name, artifact file name, sha256, features}."""
    if len(body) > MAX_METADATA_BYTES:
        raise ImageError("image metadata layer too large")
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise ImageError("image metadata layer is not JSON") from None
    if not isinstance(doc, dict):
        raise ImageError("image metadata layer is not a JSON object")
    # The file-name key is not pinned down by that project's docs; accept its usual spellings.
    artifact = next((doc[k] for k in ARTIFACT_NAME_KEYS if k in doc), None)
    sha = doc.get("sha256")
    if sha is not None:
        if not isinstance(sha, str):
            raise ImageError("image metadata sha256 must be a string")
        sha = sha.lower().removeprefix("sha256:")
        if not _HEX64_RE.fullmatch(sha):
            raise ImageError(f"image metadata sha256 {sha[:80]!r} is not 64 hex digits")
    features = doc.get("features", [])
    if isinstance(features, dict):
        features = [k for k, v in features.items() if v]
    if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
        raise ImageError("image metadata features must be a list of strings")
    packages = doc.get("packages", {})
    if not isinstance(packages, dict) or len(packages) > MAX_PACKAGES or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= MAX_PACKAGE_FIELD
            and len(v) <= MAX_PACKAGE_FIELD for k, v in packages.items()):
        raise ImageError("image metadata packages must be an object of name -> version strings")
    try:
        return ImageMetadata(
            name=_str(doc.get("name"), "name", optional=True),
            artifact=_str(artifact, "artifact", optional=True),
            sha256=sha,
            features=tuple(features),
            arch=_str(doc.get("arch"), "arch", optional=True),
            profile=_str(doc.get("profile"), "profile", optional=True),
            packages=dict(packages),
        )
    except ImageError as e:
        raise ImageError(f"image metadata: {e.message}") from None


_SAFE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


def safe_file_name(name: str | None) -> str | None:
    """A registry-given file name if it is plain and harmless (no path, no dot-dot), else None."""
    if name and _SAFE_NAME_RE.fullmatch(name) and ".." not in name:
        return name
    return None
