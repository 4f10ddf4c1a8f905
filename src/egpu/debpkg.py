"""Fetch Debian packages without touching the host's package state.

egpu provisions its engine and its built-in guest from Debian's archive. It keeps a private apt
root (its own sources, lists and an empty dpkg status, so the whole dependency closure is
resolved), lets apt resolve and verify the index signatures, and downloads the .deb files itself
so it can resume, verify each against the SHA256 from the signed index, and show progress.
Downloads go through ``egpu.transfer`` as registry pulls do: redirects followed without reading
their bodies, a stall (``EGPU_STALL_TIMEOUT``) fails with the partial kept, and a file never
grows past the size the index gives.
The mirror comes from the host's own apt sources (so a local mirror or proxy is honoured), or
from ``EGPU_DEBIAN_MIRROR``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from egpu.errors import EngineError
from egpu.process import run_tool
from egpu.progress import Progress, SilentProgress
from egpu.transfer import (
    Stalled,
    StallPolicy,
    StallWatch,
    TransferError,
    make_client,
    parse_decimal,
    raw_chunks,
    send,
)

MIRROR_ENV = "EGPU_DEBIAN_MIRROR"
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
HOST_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))
CHUNK = 1 << 20
CONNECT_TIMEOUT = 15.0
READ_TIMEOUT = 60.0
HTTP_OK, HTTP_PARTIAL = 200, 206
# Patterns are used with fullmatch ('$' would also accept a trailing newline).
# apt prints one line per package: 'URI' FILENAME SIZE [HASH] (the hash is absent for some
# suites, so it is taken from the signed index instead)
_PRINT_URI = re.compile(r"'(?P<uri>[^']+)' (?P<name>\S+) (?P<size>[0-9]+)(?: \S*)?")
# NAME_VERSION_ARCH.deb (the epoch's colon unescaped): a plain name, never a path.
_DEB_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+~_:-]{0,254}\.deb")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class DebFile:
    """One package file as the signed index describes it."""

    uri: str
    filename: str
    size: int
    sha256: str


def host_mirror(sources: Iterable[str]) -> str | None:
    """Return the first Debian archive URI named in apt source texts (one-line or deb822)."""
    for text in sources:
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("#"):
                continue
            m = re.match(r"^URIs:\s*(\S+)", line)
            if m is None:
                m = re.match(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+\S+", line)
            if m and m.group(1).rstrip("/").endswith("/debian"):
                return m.group(1).rstrip("/")
    return None


def find_mirror() -> str:
    """The Debian mirror to use: ``EGPU_DEBIAN_MIRROR`` or the host's own apt configuration."""
    if env := os.environ.get(MIRROR_ENV):
        return env.rstrip("/")
    texts: list[str] = []
    for src in HOST_SOURCES:
        if src.is_dir():
            files = sorted(src.glob("*.list")) + sorted(src.glob("*.sources"))
        else:
            files = [src]
        for f in files:
            try:
                texts.append(f.read_text())
            except OSError:
                continue
    mirror = host_mirror(texts)
    if mirror is None:
        raise EngineError(
            "no Debian mirror found in the host's apt sources",
            hint=f"set {MIRROR_ENV}=http://<mirror>/debian",
        )
    return mirror


def parse_print_uris(text: str) -> list[tuple[str, str, int]]:
    """Parse ``apt-get --print-uris`` output into (uri, file name, size)."""
    out: list[tuple[str, str, int]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("'"):
            continue
        m = _PRINT_URI.fullmatch(line)
        if m is None:
            raise EngineError(f"unexpected apt output: {line[:120]!r}")
        # name the local file after the pool file (apt's own name escapes the epoch colon)
        name = urllib.parse.unquote(m.group("uri").rsplit("/", 1)[-1])
        if not _DEB_FILE.fullmatch(name) or ".." in name:
            raise EngineError(f"unexpected package file name in apt output: {name[:120]!r}")
        out.append((m.group("uri"), name, int(m.group("size"))))
    return out


def parse_sha256s(records: str) -> dict[str, str]:
    """Map each package file name to its SHA256 from ``apt-cache show`` records.

    Older apt prints only MD5 with --print-uris; the signed index has SHA256 for every file.
    """
    out: dict[str, str] = {}
    for record in records.split("\n\n"):
        fields = dict(
            (k.strip(), v.strip())
            for k, sep, v in (ln.partition(":") for ln in record.splitlines() if ln[:1] != " ")
            if sep
        )
        sha = fields.get("SHA256", "").lower()
        # A malformed hash is left out: the file is then refused as having no SHA256.
        if "Filename" in fields and _SHA256_HEX.fullmatch(sha):
            out[fields["Filename"].rsplit("/", 1)[-1]] = sha
    return out


def parse_madison(text: str) -> dict[tuple[str, str], set[str]]:
    """Map (package, version) to the suites that carry it, from ``apt-cache madison`` lines."""
    out: dict[tuple[str, str], set[str]] = {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) != 3 or not parts[0] or not parts[1]:
            continue
        where = parts[2].split()  # MIRROR SUITE/COMPONENT ARCH Packages
        if len(where) >= 2:
            out.setdefault((parts[0], parts[1]), set()).add(where[1].split("/", 1)[0])
    return out


def parse_origins(records: str) -> dict[str, tuple[str, str, str]]:
    """Map each package file name to (package, version, source package) from ``apt-cache show``."""
    out: dict[str, tuple[str, str, str]] = {}
    for record in records.split("\n\n"):
        fields = dict(
            (k.strip(), v.strip())
            for k, sep, v in (ln.partition(":") for ln in record.splitlines() if ln[:1] != " ")
            if sep
        )
        if {"Filename", "Package", "Version"} <= fields.keys():
            # "Source: NAME (VERSION)" when the binary's version differs; absent when equal
            source = fields.get("Source", fields["Package"]).split(" ", 1)[0]
            out[fields["Filename"].rsplit("/", 1)[-1]] = (
                fields["Package"], fields["Version"], source)
    return out


class DebianArchive:
    """A private apt root over some Debian suites, for resolving and downloading packages."""

    def __init__(self, root: Path, suites: Sequence[str], arches: Sequence[str],
                 extra_sources: Sequence[str] = ()) -> None:
        self.root = root
        self.suites = tuple(suites)
        self.arches = tuple(arches)
        self.extra_sources = tuple(extra_sources)  # whole "deb [...] URI SUITE" lines

    def _apt_options(self) -> list[str]:
        opts = [
            f"Dir={self.root}",
            f"Dir::State::status={self.root / 'var/lib/dpkg/status'}",
            "Debug::NoLocking=1",
            "APT::Sandbox::User=root",
            "Acquire::Languages=none",
            "APT::Install-Recommends=0",
            # an empty dpkg status would otherwise pull every Essential package into the closure
            "pkgCacheGen::Essential=none",
            f"APT::Architecture={self.arches[0]}",
        ]
        opts += [f"APT::Architectures::={a}" for a in self.arches]
        return [x for o in opts for x in ("-o", o)]

    def _apt(self, tool: str, *args: str) -> str:
        if shutil.which(tool) is None:
            raise EngineError(
                f"{tool} not found",
                hint="egpu provisions from Debian packages; run it on Debian or Ubuntu",
            )
        return run_tool(
            [tool, *self._apt_options(), *args],
            lambda why: EngineError(f"{tool} {args[0]} failed: {why}"),
            timeout=None,  # apt bounds its own network waits; a long update is not a hang
            env={"LC_ALL": "C"},
        )

    def update(self, mirror: str) -> None:
        """Write the private sources and fetch the signed indexes."""
        if not KEYRING.exists():
            raise EngineError(
                f"Debian archive keyring missing ({KEYRING})",
                hint="apt-get install debian-archive-keyring",
            )
        for d in ("etc/apt/sources.list.d", "etc/apt/preferences.d", "etc/apt/apt.conf.d",
                  "var/lib/apt/lists/partial", "var/cache/apt/archives/partial", "var/lib/dpkg"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        (self.root / "var/lib/dpkg/status").touch()
        lines = [f"deb [signed-by={KEYRING}] {mirror} {suite} main" for suite in self.suites]
        lines += self.extra_sources
        (self.root / "etc/apt/sources.list").write_text("\n".join(lines) + "\n")
        # apt-get update exits 0 on an unreachable mirror unless asked not to
        self._apt("apt-get", "update", "-qq", "--error-on=any")

    def resolve(self, packages: Sequence[str], *, target: str | None = None) -> list[DebFile]:
        """The files for ``packages`` and their whole dependency closure (nothing is installed)."""
        args = ["install", "-qq", "-y", "--print-uris"]
        if target:
            args += ["-t", target]
        return self._with_hashes(parse_print_uris(self._apt("apt-get", *args, *packages)))

    def resolve_only(self, packages: Sequence[str]) -> list[DebFile]:
        """The files for exactly ``packages``, without dependencies."""
        uris = parse_print_uris(self._apt("apt-get", "download", "--print-uris", "-qq", *packages))
        return self._with_hashes(uris)

    def _with_hashes(self, uris: list[tuple[str, str, int]]) -> list[DebFile]:
        if not uris:
            return []
        # file names are NAME_VERSION_ARCH.deb; ask for NAME:ARCH records
        names = sorted({f"{n.split('_')[0]}:{n.rsplit('_', 1)[-1].removesuffix('.deb')}"
                        for _, n, _ in uris})
        sums = parse_sha256s(self._apt("apt-cache", "show", *names))
        out: list[DebFile] = []
        for uri, name, size in uris:
            digest = sums.get(name)
            if digest is None:
                raise EngineError(f"no SHA256 for {name} in the signed index")
            out.append(DebFile(uri, name, size, digest))
        return out

    def sources_only_in(self, files: Sequence[DebFile], suite: str) -> list[str]:
        """Source packages of those ``files`` whose version no suite but ``suite`` carries."""
        names = sorted({f.filename.split("_", 1)[0] for f in files})
        if not names:
            return []
        origins = parse_origins(self._apt("apt-cache", "show", *names))
        suites = parse_madison(self._apt("apt-cache", "madison", *names))
        out: set[str] = set()
        for f in files:
            origin = origins.get(f.filename)
            if origin is not None and suites.get(origin[:2]) == {suite}:
                out.add(origin[2])
        return sorted(out)

    def has_lists(self) -> bool:
        """Whether an earlier ``update`` left indexes (resolving then needs no network)."""
        lists = self.root / "var/lib/apt/lists"
        return lists.is_dir() and any(p.name.endswith("_Packages") for p in lists.iterdir())

    def priority_packages(self, priority: str) -> list[str]:
        """Names of the available packages of a Priority (debootstrap's "required" set)."""
        names: set[str] = set()
        for record in self._apt("apt-cache", "dumpavail").split("\n\n"):
            fields = dict((k, v.strip()) for k, sep, v in
                          (ln.partition(":") for ln in record.splitlines() if ln[:1] != " ")
                          if sep)
            if fields.get("Priority") == priority and "Package" in fields:
                names.add(fields["Package"])
        return sorted(names)

    def depends(self, package: str) -> list[str]:
        """Direct ``Depends`` of a package (used to see through metapackages)."""
        out = self._apt("apt-cache", "depends", "--no-recommends", "--no-suggests", package)
        return [ln.split(":", 1)[1].strip() for ln in out.splitlines()
                if ln.strip().startswith("Depends:")]


def download(
    files: Sequence[DebFile],
    dest: Path,
    progress: Progress | None = None,
    stall: StallPolicy | None = None,
) -> list[Path]:
    """Download package files into ``dest``, resuming partial ones, verifying each SHA256.

    A file is renamed into place only once verified, so an interrupted or stalled run leaves at
    most a ``.part`` file that the next run continues. ``stall`` defaults to the environment's.
    """
    progress = progress or SilentProgress()
    stall = stall or StallPolicy.from_env(os.environ)
    dest.mkdir(parents=True, exist_ok=True)
    paths = [dest / f.filename for f in files]
    todo = [(f, p) for f, p in zip(files, paths, strict=True) if not p.exists()]
    if not todo:
        return paths
    progress.start("downloading packages", sum(f.size for f, _ in todo))
    try:
        timeout = httpx.Timeout(stall.read_timeout(READ_TIMEOUT), connect=CONNECT_TIMEOUT)
        with make_client(timeout=timeout) as client:
            for f, path in todo:
                _fetch_one(client, f, path, progress, stall)
    finally:
        progress.finish()
    return paths


def _fetch_one(
    client: httpx.Client, f: DebFile, path: Path, progress: Progress, stall: StallPolicy
) -> None:
    part = path.with_name(path.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    if have > f.size:
        part.unlink()
        have = 0
    h = hashlib.sha256()
    if have:
        with part.open("rb") as fh:
            for block in iter(lambda: fh.read(CHUNK), b""):
                h.update(block)
        progress.advance(have)
    if have < f.size:
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            request = client.build_request("GET", f.uri, headers=headers)
            with contextlib.closing(send(client, request)) as resp:
                if resp.status_code == HTTP_OK and have:
                    # the server ignored the range: start over
                    h, have = hashlib.sha256(), 0
                    part.unlink()
                elif resp.status_code == HTTP_PARTIAL and _range_start(resp) != have:
                    raise EngineError(
                        f"download of {f.filename} failed: the mirror sent another range"
                    )
                elif resp.status_code not in (HTTP_OK, HTTP_PARTIAL):
                    raise EngineError(f"download of {f.filename} failed: HTTP {resp.status_code}")
                with part.open("ab") as out:
                    for block in raw_chunks(resp, StallWatch(stall)):
                        if have + len(block) > f.size:
                            raise _TooLong(f"the mirror sent more than {f.size} bytes")
                        out.write(block)
                        h.update(block)
                        have += len(block)
                        progress.advance(len(block))
        except _TooLong as e:
            part.unlink(missing_ok=True)
            raise EngineError(f"download of {f.filename} failed: {e.message}") from None
        except Stalled as e:
            raise EngineError(
                f"download of {f.filename} {e.message} at {have} of {f.size} bytes",
                hint="run the command again to resume",
            ) from None
        except TransferError as e:
            raise EngineError(f"download of {f.filename} failed: {e.message}") from None
        except httpx.InvalidURL as e:
            raise EngineError(f"download of {f.filename}: bad URL {f.uri[:120]!r} ({e})") from None
        except httpx.HTTPError as e:
            raise EngineError(
                f"download of {f.filename} failed: {_one_line(e)}",
                hint="run the command again to resume",
            ) from None
        finally:
            with contextlib.suppress(OSError):
                if part.stat().st_size == 0:
                    part.unlink()  # nothing arrived: nothing to resume
    if have < f.size:
        raise EngineError(
            f"download of {f.filename} broke off at {have} of {f.size} bytes",
            hint="run the command again to resume",
        )
    if h.hexdigest() != f.sha256:
        part.unlink(missing_ok=True)
        raise EngineError(f"{f.filename}: checksum mismatch", hint="run the command again")
    os.replace(part, path)


class _TooLong(TransferError):
    """The mirror sent more bytes than the signed index says the file has."""


def _range_start(resp: httpx.Response) -> int | None:
    """The first byte of a 206's ``Content-Range: bytes START-END/TOTAL``."""
    unit, _, spec = resp.headers.get("content-range", "").strip().partition(" ")
    return parse_decimal(spec.partition("-")[0]) if unit == "bytes" else None


def _one_line(error: Exception) -> str:
    text = str(error) or type(error).__name__
    return text.splitlines()[0][:200]


def extract(deb: Path, dest: Path) -> None:
    """Unpack a .deb's data into ``dest`` (dpkg-deb, no maintainer scripts)."""
    dest.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise EngineError(f"cannot unpack {deb.name}: {proc.stderr.strip()}")
