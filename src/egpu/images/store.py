"""The image cache: content-addressed blobs, one record per pulled reference, and who uses what.

Layout under ``egpu.paths.dirs().images``::

    blobs/sha256/<hex>      verified blobs (disk images, their JSON, manifests); read-only
    partial/<hex>           downloads in progress (kept across processes so pulls resume)
    locks/<hex>.lock        one lock per blob, so concurrent pulls never write the same file
    refs/<key>.json         one RefRecord per image reference pulled (key = its sha256)

A blob is renamed into ``blobs/`` only after its digest was checked, so anything there is whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from egpu.errors import ImageError
from egpu.images.qcow2 import read_backing_file
from egpu.images.reference import Digest
from egpu.paths import dirs

READ_ONLY = 0o444
# The VM layer's overlay file name (egpu.vm.store.OVERLAY); images sits below vm, so it is
# passed in by callers and this is only the default.
DEFAULT_OVERLAY_NAME = "overlay.qcow2"
MAX_REF_RECORD = 1024 * 1024


@dataclass(frozen=True)
class RefRecord:
    """What a reference resolved to when it was last pulled."""

    ref: str
    manifest_digest: str
    disk_digest: str
    size: int
    file_name: str
    layout: str
    metadata_digest: str | None = None
    metadata: dict[str, Any] | None = field(default=None, hash=False)
    pulled_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> RefRecord:
        """Rebuild a record, checking the digests it names (they become file names)."""
        try:
            record = cls(
                ref=str(doc["ref"]),
                manifest_digest=str(Digest.parse(doc["manifest_digest"])),
                disk_digest=str(Digest.parse(doc["disk_digest"])),
                size=int(doc["size"]),
                file_name=str(doc["file_name"]),
                layout=str(doc["layout"]),
                metadata_digest=(
                    None
                    if doc.get("metadata_digest") is None
                    else str(Digest.parse(doc["metadata_digest"]))
                ),
                metadata=doc.get("metadata") if isinstance(doc.get("metadata"), dict) else None,
                pulled_at=float(doc.get("pulled_at", 0.0)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ImageError(f"broken image record: {e}") from None
        return record

    @property
    def disk(self) -> Digest:
        return Digest.parse(self.disk_digest)


@dataclass(frozen=True)
class CachedImage:
    """One cached image as ``egpu images`` shows it."""

    ref: str | None  # None: an older base no reference points at, kept because a VM uses it
    digest: str  # the manifest digest (the disk's digest when the manifest is unknown)
    disk_digest: str
    path: Path
    size: int
    used_by: tuple[str, ...] = ()
    file_name: str | None = None
    features: tuple[str, ...] = ()  # from the image's JSON layer (docker, desktop, ...)

    def to_json(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "digest": self.digest,
            "disk_digest": self.disk_digest,
            "path": str(self.path),
            "size": self.size,
            "used_by": list(self.used_by),
            "file_name": self.file_name,
            "features": list(self.features),
        }


class ImageStore:
    """The cache directory and the operations on it."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root if root is not None else dirs().images

    @property
    def blobs_dir(self) -> Path:
        return self.root / "blobs" / "sha256"

    def blob_path(self, digest: Digest) -> Path:
        return self.blobs_dir / digest.hex

    def partial_path(self, digest: Digest) -> Path:
        return self.root / "partial" / digest.hex

    def has_blob(self, digest: Digest, size: int | None = None) -> bool:
        """Whether the blob is cached (and, when ``size`` is given, has exactly that size)."""
        path = self.blob_path(digest)
        try:
            st = path.stat()
        except OSError:
            return False
        return stat.S_ISREG(st.st_mode) and (size is None or st.st_size == size)

    @contextlib.contextmanager
    def locked(self, digest: Digest, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
        """Hold the blob's lock; ``on_wait()`` is called once if another process has it."""
        lock_dir = self.root / "locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        # filelock brings asyncio: imported only where a blob is locked
        from filelock import FileLock, Timeout

        lock = FileLock(str(lock_dir / f"{digest.hex}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if on_wait is not None:
                on_wait()
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def commit_blob(self, partial: Path, digest: Digest) -> Path:
        """Move a verified download into place, read-only."""
        dest = self.blob_path(digest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(partial, READ_ONLY)
        os.replace(partial, dest)
        return dest

    def put_blob(self, data: bytes) -> Digest:
        """Store small content (a manifest) under its digest."""
        digest = Digest.of_hex(hashlib.sha256(data).hexdigest())
        if not self.has_blob(digest, len(data)):
            tmp = _write_temp(self.blobs_dir, data)
            self.commit_blob(tmp, digest)
        return digest

    # -- references -------------------------------------------------------------------------

    def _ref_path(self, ref: str) -> Path:
        return self.root / "refs" / f"{hashlib.sha256(ref.encode()).hexdigest()[:32]}.json"

    def write_ref(self, record: RefRecord) -> None:
        """Record what a reference points at now (atomically: the old record stays until then)."""
        path = self._ref_path(record.ref)
        tmp = _write_temp(path.parent, json.dumps(record.to_json(), indent=2).encode())
        os.replace(tmp, path)

    def get_ref(self, ref: str) -> RefRecord | None:
        path = self._ref_path(ref)
        return _read_record(path) if path.exists() else None

    def refs(self) -> list[RefRecord]:
        """Every recorded reference (unreadable records are skipped)."""
        out: list[RefRecord] = []
        for path in sorted((self.root / "refs").glob("*.json")):
            try:
                out.append(_read_record(path))
            except ImageError:
                continue
        return sorted(out, key=lambda r: r.ref)

    def remove_ref(self, ref: str) -> None:
        self._ref_path(ref).unlink(missing_ok=True)

    # -- listing and pruning ----------------------------------------------------------------

    def digest_of_path(self, path: Path) -> Digest | None:
        """The digest of a path inside this store's blobs directory, else None."""
        try:
            rel = Path(os.path.realpath(path)).relative_to(os.path.realpath(self.blobs_dir))
        except ValueError:
            return None
        try:
            return Digest.of_hex(str(rel)) if len(rel.parts) == 1 else None
        except ImageError:
            return None

    def users(
        self, vms_root: Path, overlay_name: str = DEFAULT_OVERLAY_NAME
    ) -> dict[str, list[str]]:
        """Disk digest -> names of VMs whose overlay is backed by that cached blob."""
        by_path = overlay_bases(vms_root, overlay_name)
        out: dict[str, list[str]] = {}
        for vm, base in sorted(by_path.items()):
            digest = self.digest_of_path(base)
            if digest is not None:
                out.setdefault(str(digest), []).append(vm)
        return out

    def images(self, vms_root: Path, overlay_name: str = DEFAULT_OVERLAY_NAME) -> list[CachedImage]:
        """Every cached image: pulled references, plus older bases still used by a VM."""
        users = self.users(vms_root, overlay_name)
        out: list[CachedImage] = []
        listed: set[str] = set()
        for r in self.refs():
            path = self.blob_path(r.disk)
            if not path.exists():
                continue
            listed.add(r.disk_digest)
            used = tuple(users.get(r.disk_digest, ()))
            features = (r.metadata or {}).get("features") or []
            out.append(
                CachedImage(
                    r.ref,
                    r.manifest_digest,
                    r.disk_digest,
                    path,
                    r.size,
                    used,
                    r.file_name,
                    tuple(str(f) for f in features if isinstance(f, str)),
                )
            )
        for disk, vms in sorted(users.items()):
            if disk not in listed:
                path = self.blob_path(Digest.parse(disk))
                if path.exists():
                    size = path.stat().st_size
                    out.append(CachedImage(None, disk, disk, path, size, tuple(vms)))
        return out

    def prune(self, vms_root: Path, overlay_name: str = DEFAULT_OVERLAY_NAME) -> list[CachedImage]:
        """Delete every cached image no VM overlay uses; returns what was removed."""
        users = self.users(vms_root, overlay_name)
        removed: list[CachedImage] = []
        keep: set[str] = set(users)
        for image in self.images(vms_root, overlay_name):
            if image.used_by:
                continue
            if image.ref is not None:
                self.remove_ref(image.ref)
            removed.append(image)
        for r in self.refs():  # what remains is in use: keep its manifest and JSON too
            keep |= {r.disk_digest, r.manifest_digest}
            if r.metadata_digest:
                keep.add(r.metadata_digest)
        for blob in self.blobs_dir.glob("*") if self.blobs_dir.exists() else ():
            digest = self.digest_of_path(blob)
            if digest is None or str(digest) in keep:
                continue
            # Skip a blob that a running pull holds; it is not ours to delete now.
            from filelock import FileLock, Timeout

            lock = FileLock(str(self.root / "locks" / f"{digest.hex}.lock"))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue
            try:
                blob.unlink(missing_ok=True)
            finally:
                lock.release()
        return removed


def overlay_bases(vms_root: Path, overlay_name: str = DEFAULT_OVERLAY_NAME) -> dict[str, Path]:
    """VM name -> the backing file its overlay names (VMs without an overlay are left out)."""
    out: dict[str, Path] = {}
    if not vms_root.is_dir():
        return out
    for vm_dir in sorted(vms_root.iterdir()):
        overlay = vm_dir / overlay_name
        if not overlay.is_file():
            continue
        try:
            base = read_backing_file(overlay)
        except (OSError, ImageError):
            continue  # a broken overlay uses nothing egpu could delete safely anyway
        if base is not None:
            out[vm_dir.name] = base
    return out


def _read_record(path: Path) -> RefRecord:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_REF_RECORD + 1)  # bounded: never the whole of a runaway file
        if len(data) > MAX_REF_RECORD:
            raise ImageError(f"broken image record {path}: over {MAX_REF_RECORD} bytes")
        doc = json.loads(data)
    except (OSError, ValueError) as e:
        raise ImageError(f"broken image record {path}: {e}") from None
    if not isinstance(doc, dict):
        raise ImageError(f"broken image record {path}")
    return RefRecord.from_json(doc)


def _write_temp(directory: Path, data: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name)


def sum_sizes(images: Iterable[CachedImage]) -> int:
    return sum(i.size for i in images)
