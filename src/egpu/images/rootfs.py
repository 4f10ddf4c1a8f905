"""A first-stage root as one tar stream, made from .deb files without dpkg, root or Linux tools.

A .deb is an ar archive (deb(5)) whose ``data.tar.{xz,gz}`` member holds the package's files.
The files of several packages are merged into one tar (root-owned, modes and links kept, as
the package says) that the builder VM unpacks onto the new root filesystem, as debootstrap's
first stage unpacks the required packages. The paths of merged /usr (``bin`` -> ``usr/bin``,
...) are written under ``usr`` so a package's ``./bin/x`` never replaces the link. Package
files are verified against the signed index before they get here, and each member is still
checked (a plain relative path, no ``..``, a bounded size) before use.
"""

from __future__ import annotations

import io
import lzma
import tarfile
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from egpu.errors import ImageError

AR_MAGIC = b"!<arch>\n"
AR_HEADER = 60  # ar(5): name 16, mtime 12, uid 6, gid 6, mode 8, size 10, magic 2
AR_NAME, AR_SIZE_AT, AR_SIZE_LEN, AR_END = 16, 48, 10, b"`\n"
DATA_MEMBER = "data.tar"
def _gunzip(blob: bytes) -> bytes:
    return zlib.decompress(blob, 16 + zlib.MAX_WBITS)


def _plain(blob: bytes) -> bytes:
    return blob


# the compressions dpkg-deb writes that Python reads without extra modules
DECOMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    ".xz": lzma.decompress, ".gz": _gunzip, "": _plain}
MAX_MEMBER = 4 << 30
# merged /usr (DEP17): these top-level names are links into /usr shipped by base-files
USR_ALIASES = {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib", "lib64": "usr/lib64"}
DIR_MODE = 0o755
TAR_FORMAT = tarfile.GNU_FORMAT  # long names as busybox tar reads them


@dataclass(frozen=True)
class Member:
    """One file of the merged tree: its header and, for regular files, its bytes."""

    info: tarfile.TarInfo
    data: bytes = b""


def ar_members(blob: bytes) -> dict[str, bytes]:
    """The members of an ar archive by name (bounds-checked)."""
    if not blob.startswith(AR_MAGIC):
        raise ImageError("not a .deb (no ar header)")
    out: dict[str, bytes] = {}
    pos = len(AR_MAGIC)
    while pos + AR_HEADER <= len(blob):
        head = blob[pos:pos + AR_HEADER]
        if head[-2:] != AR_END:
            raise ImageError("malformed .deb (bad ar member header)")
        name = head[:AR_NAME].decode("ascii", "replace").strip().rstrip("/")
        size_text = head[AR_SIZE_AT:AR_SIZE_AT + AR_SIZE_LEN].decode("ascii", "replace").strip()
        if not size_text.isdigit():
            raise ImageError("malformed .deb (bad ar member size)")
        size = int(size_text)
        start = pos + AR_HEADER
        if start + size > len(blob):
            raise ImageError(f"malformed .deb (member {name!r} runs past the end)")
        out[name] = blob[start:start + size]
        pos = start + size + (size & 1)  # members are 2-byte aligned
    return out


def deb_data(blob: bytes) -> bytes:
    """The uncompressed data tar of a .deb."""
    for name, data in ar_members(blob).items():
        if name.startswith(DATA_MEMBER):
            suffix = name[len(DATA_MEMBER):]
            if suffix not in DECOMPRESSORS:
                raise ImageError(f"unsupported .deb compression {name!r}")
            try:
                return DECOMPRESSORS[suffix](data)
            except (lzma.LZMAError, zlib.error) as e:
                raise ImageError(f"corrupt {name} in .deb: {e}") from None
    raise ImageError("malformed .deb (no data.tar member)")


def canonical(path: str) -> str | None:
    """A member path as it lands in the merged tree, or None when it is unsafe or the root."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts or ".." in parts or path.startswith("/"):
        return None
    if parts[0] in USR_ALIASES and len(parts) > 1:
        parts = USR_ALIASES[parts[0]].split("/") + parts[1:]
    return "/".join(parts)


def merge_packages(debs: Iterable[bytes]) -> dict[str, Member]:
    """The merged files of packages, later packages replacing earlier ones' files."""
    tree: dict[str, Member] = {}
    for blob in debs:
        with tarfile.open(fileobj=io.BytesIO(deb_data(blob)), mode="r:") as tar:
            for info in tar:
                name = canonical(info.name)
                if name is None or info.size > MAX_MEMBER:
                    continue
                if name in USR_ALIASES and not info.issym():
                    continue  # a ./bin directory entry: the link from base-files stays
                if info.islnk():
                    target = canonical(info.linkname)
                    if target is None:
                        continue
                    info.linkname = target
                if info.isreg():
                    f = tar.extractfile(info)
                    data = f.read() if f is not None else b""
                elif info.isdir() or info.issym() or info.islnk():
                    data = b""
                else:
                    continue  # devices and fifos are made by maintainer scripts, if ever
                info.name = name
                info.uname = info.gname = ""  # numeric ids: the builder has no passwd file
                tree[name] = Member(info, data)
    return tree


def write_tar(out: BinaryIO, tree: Mapping[str, Member],
              extra_files: Mapping[str, tuple[Path, int]] = {},
              extra_data: Mapping[str, tuple[bytes, int]] = {}) -> None:
    """Write the tree (parents before children, hard links last, so any tar unpacks it) plus
    host files (path in the tar -> (file, mode)) and generated files (-> (bytes, mode))."""
    with tarfile.open(fileobj=out, mode="w:", format=TAR_FORMAT) as tar:
        names = sorted(tree)
        for name in [n for n in names if not tree[n].info.islnk()] + \
                [n for n in names if tree[n].info.islnk()]:
            m = tree[name]
            tar.addfile(m.info, io.BytesIO(m.data) if m.info.isreg() else None)
        parents = sorted({"/".join(n.split("/")[:i]) for n in [*extra_files, *extra_data]
                          for i in range(1, n.count("/") + 1)} - set(tree))
        for name in parents:
            info = _file_info(name, 0, DIR_MODE)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, (path, mode) in sorted(extra_files.items()):
            info = _file_info(name, path.stat().st_size, mode)
            with path.open("rb") as fh:
                tar.addfile(info, fh)
        for name, (data, mode) in sorted(extra_data.items()):
            tar.addfile(_file_info(name, len(data), mode), io.BytesIO(data))


def _file_info(name: str, size: int, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.uid, info.gid, info.mtime = size, mode, 0, 0, 0
    return info
