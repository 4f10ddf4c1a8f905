"""``egpu image build``: a UEFI-bootable Debian qcow2 built inside a VM that egpu boots.

The host resolves the package set with apt in a private root (Provides and alternatives are
apt's business; the Priority: required packages are added as debootstrap does), downloads and
verifies every .deb, and writes two tar streams with no Linux tools: the first stage (the
required packages unpacked, every .deb, the second-stage script) and a small toolbox (sfdisk,
mkfs, mtools, systemd-boot). The builder VM is the built-in guest's kernel and busybox with
``images/builder/init.sh`` as /init; it partitions the raw disk, unpacks the first stage, runs
``images/builder/stage2.sh`` in a chroot and installs systemd-boot on the ESP. The host watches
its serial console (progress markers), converts the disk to qcow2 and writes the scottjg JSON
manifest beside it.

Cache (``dirs().cache / "image-build"``)::

    apt-<key>/                  private apt roots, one per suite and source set
    images/<key>/NAME.qcow2     a finished build and its NAME.json, renamed in whole
    images/.build-*             a build under way (removed when it fails or is interrupted)

``<key>`` is :func:`egpu.images.profiles.cache_key` of the request, the resolved files (by
sha256) and this builder's code, so the same inputs find the same image. The package index is
fetched once and reused until ``refresh``: the same inputs resolve to the same versions.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from filelock import FileLock

from egpu import debpkg
from egpu.engine.argv import Disk, VmSpec, build_argv
from egpu.engine.qemu import EngineInfo, host_is_virtual
from egpu.errors import EgpuError, ImageError, UsageError
from egpu.guest import cpio
from egpu.guest.assets import GuestAssets
from egpu.guest.protocol import console_for
from egpu.images import profiles, rootfs
from egpu.images.manifest import ImageMetadata, parse_metadata
from egpu.paths import dirs
from egpu.process import run_tool
from egpu.progress import Progress, SilentProgress
from egpu.vm.lifecycle import choose_accel

KEY_CHARS = 16
FAILED_LOG = "last-failed-build.log"
BUILDER_PACKAGE = "egpu.images.builder"
BUILDER_SCRIPTS = ("init.sh", "stage2.sh")
# profiles.py is not here: what a profile puts in an image enters the key through the request
# (BuildRequest.describe) and the extra steps' script, so editing one profile rebuilds only it
BUILDER_MODULES = ("egpu.images.rootfs", "egpu.vm.image_build")
# what the builder VM runs its own steps with (unpacked into a scratch root, never installed)
TOOL_PACKAGES = ("base-files", "fdisk", "e2fsprogs", "dosfstools", "mtools", "systemd-boot-efi")
LOADER = {  # arch -> (file in systemd-boot-efi, removable-media path on the ESP)
    "aarch64": ("usr/lib/systemd/boot/efi/systemd-bootaa64.efi", "EFI/BOOT/BOOTAA64.EFI"),
    "x86_64": ("usr/lib/systemd/boot/efi/systemd-bootx64.efi", "EFI/BOOT/BOOTX64.EFI"),
}
TESTING_PIN = 100  # forky below trixie's 500: only what is asked for (and needs) comes from it
TESTING_SOURCE_PIN = 990  # a source package forky supplies comes wholly from forky
BUILDER_CPUS = 2
BUILDER_MEMORY_MIB = 2048
# Under TCG a base build takes tens of minutes (aarch64 on x86_64 longer); this bounds a hang.
BUILD_TIMEOUT_S = 4 * 3600
POLL_S = 0.5
FAIL_CONTEXT_LINES = 15
HOSTNAME = "egpu"
MAX_CONSOLE_PACKAGES = 20000
# the builder's console protocol (images/builder/*.sh)
STEP_MARK = "EGPU-BUILD-STEP "
OK_MARK = "EGPU-BUILD-OK"
FAIL_MARK = "EGPU-BUILD-FAIL"
PACKAGE_MARK = "EGPU-BUILD-PACKAGE "
# dpkg's "Setting up NAME[:ARCH] (VERSION) ..." (its --status-fd made maintainer scripts'
# writes to the console fail with EIO)
_DPKG_INSTALLED = re.compile(r"Setting up ([a-z0-9][a-z0-9+.-]*)(?::[a-z0-9-]+)? \(.*")
_PACKAGE_LINE = re.compile(r"EGPU-BUILD-PACKAGE ([a-z0-9][a-z0-9+.-]{0,99}) "
                           r"([A-Za-z0-9.+~:-]{1,128})")
_KERNEL_FILE = re.compile(r"linux-image-(\d[A-Za-z0-9.+~-]*)_[^_]+_[a-z0-9]+\.deb")
_DEB_NAME = re.compile(r"([a-z0-9][a-z0-9+.-]*)_([^_]+)_([a-z0-9]+)\.deb")
# what the steps are called on the console, for progress notes
STEP_NOTES = {
    "tools": "unpacking the builder's tools", "partition": "partitioning the disk",
    "mkfs": "making the filesystems", "unpack": "unpacking the first stage",
    "dpkg-core": "installing dpkg and the C library", "dpkg-required": "installing packages",
    "kernel": "making the initramfs", "extras": "running the extra steps",
    "configure": "configuring the image", "esp": "installing the boot loader",
}


@dataclass(frozen=True)
class ResolvedSet:
    """The package files of one build: what is installed, what the first stage unpacks, and
    the builder's tools."""

    files: tuple[debpkg.DebFile, ...]
    required: tuple[str, ...]  # file names unpacked by the first stage, dpkg's first round
    tools: tuple[debpkg.DebFile, ...]

    def digests(self) -> dict[str, str]:
        return {f.filename: f.sha256 for f in (*self.files, *self.tools)}

    def kernel_version(self) -> str:
        found = [m.group(1) for f in self.files if (m := _KERNEL_FILE.fullmatch(f.filename))]
        if len(found) != 1:
            raise ImageError(f"expected one kernel image package, found {len(found)}")
        return found[0]

    def versions(self) -> dict[str, str]:
        """Package name -> version as the file names give it (pool names carry no epoch)."""
        return {m.group(1): m.group(2) for f in self.files
                if (m := _DEB_NAME.fullmatch(f.filename))}


@dataclass(frozen=True)
class BuildResult:
    """A finished image: its qcow2, its JSON manifest, what they say, and whether it was cached."""

    image: Path
    manifest: Path
    metadata: ImageMetadata
    key: str
    cached: bool


@dataclass
class ConsoleState:
    """What the builder said so far on its serial console."""

    step: str | None = None
    installed: set[str] = field(default_factory=set)
    packages: dict[str, str] = field(default_factory=dict)
    ok: bool = False
    failed: str | None = None
    lines: list[str] = field(default_factory=list)


def read_console(state: ConsoleState, lines: Iterable[str]) -> list[str]:
    """Fold console lines into ``state``; return the steps that started (pure)."""
    started: list[str] = []
    for raw in lines:
        line = raw.strip()
        state.lines = [*state.lines[-(FAIL_CONTEXT_LINES - 1):], line]
        if line.startswith(STEP_MARK):
            state.step = line[len(STEP_MARK):][:64]
            started.append(state.step)
        elif line == OK_MARK:
            state.ok = True
        elif line.startswith(FAIL_MARK):
            state.failed = line[len(FAIL_MARK):].strip()[:64] or "?"
        elif line.startswith(PACKAGE_MARK):
            m = _PACKAGE_LINE.fullmatch(line)
            if m is None or len(state.packages) >= MAX_CONSOLE_PACKAGES:
                raise ImageError(f"the builder reported a malformed package line: {line[:80]!r}")
            state.packages[m.group(1)] = m.group(2)
        elif m := _DPKG_INSTALLED.fullmatch(line):
            state.installed.add(m.group(1))
    return started


def check_installed(reported: Mapping[str, str], resolved: Mapping[str, str]) -> None:
    """The builder installed exactly the resolved packages at their versions (epochs aside)."""
    missing = sorted(set(resolved) - set(reported))
    extra = sorted(set(reported) - set(resolved))
    if missing or extra:
        raise ImageError(f"the image's packages differ from the resolved set "
                         f"(missing: {', '.join(missing[:5]) or '-'}; "
                         f"unexpected: {', '.join(extra[:5]) or '-'})")
    for name, version in reported.items():
        if version.split(":", 1)[-1] != resolved[name]:
            raise ImageError(f"{name} was installed at {version}, not {resolved[name]}")


def builder_code() -> bytes:
    """The code that builds an image, for the cache key: changing it builds anew."""
    parts: list[bytes] = []
    for name in BUILDER_SCRIPTS:
        parts.append(resources.files(BUILDER_PACKAGE).joinpath(name).read_bytes())
    for module in BUILDER_MODULES:
        package, _, leaf = module.rpartition(".")
        parts.append(resources.files(package).joinpath(f"{leaf}.py").read_bytes())
    return b"\0".join(parts)


def build_env(values: Mapping[str, str]) -> bytes:
    """The builder's settings as a shell file (every value quoted)."""
    return "".join(f"{k}={shlex.quote(v)}\n" for k, v in sorted(values.items())).encode()


def boot_entry(arch: str, root_uuid: str, title: str) -> str:
    """The Boot Loader Specification entry systemd-boot starts the image with."""
    return (f"title {title}\nlinux /vmlinuz\ninitrd /initrd.img\n"
            f"options root=UUID={root_uuid} ro console={console_for(arch)} console=tty0\n")


LOADER_CONF = "timeout 0\ndefault egpu.conf\n"
DHCP_NETWORK = "[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n"
SSH_KEYS_UNIT = """[Unit]
Description=Generate the SSH host keys on first boot
ConditionPathExistsGlob=!/etc/ssh/ssh_host_*_key
Before=ssh.service

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
"""


def _archive(request: profiles.BuildRequest) -> debpkg.DebianArchive:
    extra = [request.nvidia.source.line()] if request.nvidia else []
    tag = hashlib.sha256("\0".join([request.debarch, *request.suites(), *extra]).encode())
    root = dirs().cache / "image-build" / f"apt-{tag.hexdigest()[:KEY_CHARS]}"
    return debpkg.DebianArchive(root, request.suites(), [request.debarch], extra)


def resolve(request: profiles.BuildRequest, *, refresh: bool = False,
            progress: Progress | None = None) -> ResolvedSet:
    """The package files of a build (no download). The index is fetched on first use or with
    ``refresh``; otherwise the one fetched before is used, so versions stay put."""
    progress = progress or SilentProgress()
    archive = _archive(request)
    if refresh or not archive.has_lists():
        progress.note(f"fetching the Debian {'/'.join(request.suites())} package index")
        archive.update(debpkg.find_mirror())
    if profiles.TESTING_SUITE in request.suites():
        _pin_testing(archive, request)
    arch = request.debarch
    required = [f"{p}:{arch}" for p in archive.priority_packages("required")]
    wanted = [f"{p}:{arch}" for p in request.packages()] + request.testing_packages()
    try:
        files = archive.resolve([*required, *wanted])
        first = {f.filename for f in archive.resolve(required)}
        tools = archive.resolve([f"{p}:{arch}" for p in TOOL_PACKAGES])
    except EgpuError as e:
        raise ImageError(f"cannot resolve the {request.profile.name} package set: {e.message}",
                         hint="check the --packages names, or fetch the index anew with "
                              "--refresh") from e
    if request.nvidia is not None:
        _check_nvidia(request.nvidia, files)
    return ResolvedSet(tuple(files), tuple(f.filename for f in files if f.filename in first),
                       tuple(tools))


def _pin_testing(archive: debpkg.DebianArchive, request: profiles.BuildRequest) -> None:
    """Take from forky only what the forky packages need, and each such source package whole.

    A forky library (say glibc's libc6) needs its siblings at the same version (libc-bin,
    locales), which trixie's higher priority would otherwise pick: apt then finds no solution.
    """
    prefs = archive.root / "etc/apt/preferences.d/egpu-testing"
    general = (f"Package: *\nPin: release n={profiles.TESTING_SUITE}\n"
               f"Pin-Priority: {TESTING_PIN}\n")
    prefs.write_text(general)
    try:
        needed = archive.sources_only_in(archive.resolve(request.testing_packages()),
                                         profiles.TESTING_SUITE)
    except EgpuError as e:
        raise ImageError(f"cannot resolve {', '.join(request.testing_packages())}: {e.message}",
                         hint="fetch the index anew with --refresh") from e
    prefs.write_text(general + "".join(
        f"\nPackage: src:{source}\nPin: release n={profiles.TESTING_SUITE}\n"
        f"Pin-Priority: {TESTING_SOURCE_PIN}\n" for source in needed))


def _check_nvidia(plan: profiles.NvidiaPlan, files: Sequence[debpkg.DebFile]) -> None:
    for f in files:
        m = _DEB_NAME.fullmatch(f.filename)
        if m and m.group(1) == plan.packages[0]:
            branch = profiles.nvidia_branch(m.group(2))
            if branch is None or branch < plan.min_branch:
                raise ImageError(f"{f.filename}: NVIDIA's driver {m.group(2)} is older than "
                                 f"{plan.min_branch}, which RTX 50-series cards need")
            return
    raise ImageError(f"{plan.packages[0]} is not in {plan.source.url}")


def _cache_root() -> Path:
    return dirs().cache / "image-build" / "images"


def _load_cached(final: Path) -> BuildResult | None:
    try:
        (json_path,) = final.glob("*.json")
        meta = parse_metadata(json_path.read_bytes())
        image = final / str(meta.artifact)
        if meta.artifact is None or not image.is_file():
            return None
    except (OSError, ValueError, EgpuError):
        return None
    return BuildResult(image, json_path, meta, final.name, True)


def build_image(request: profiles.BuildRequest, info: EngineInfo, guest: GuestAssets, *,
                refresh: bool = False, compress: bool = False,
                progress: Progress | None = None, accel: str | None = None) -> BuildResult:
    """Build (or find in the cache) the image ``request`` describes."""
    progress = progress or SilentProgress()
    if request.arch not in info.arches:
        raise UsageError(f"--arch {request.arch} is not supported by the engine "
                         f"(it runs {', '.join(info.arches) or 'none'})")
    resolved = resolve(request, refresh=refresh, progress=progress)
    steps = (profiles.extra_steps_script(request.nvidia, guest.kernel_version)
             if request.nvidia is not None else "")
    key = profiles.cache_key(request, resolved.digests(),
                             b"\0".join([builder_code(), guest.kernel_version.encode(),
                                         steps.encode()]))
    final = _cache_root() / key[:KEY_CHARS]
    if (hit := _load_cached(final)) is not None:
        return hit
    _cache_root().mkdir(parents=True, exist_ok=True)
    with FileLock(str(_cache_root() / ".lock")):
        if (hit := _load_cached(final)) is not None:
            return hit
        for stale in _cache_root().glob(".build-*"):
            shutil.rmtree(stale, ignore_errors=True)  # we hold the lock: leftovers of a kill
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=_cache_root()))
        try:
            out = _build(request, info, guest, resolved, work, key, compress, progress, accel)
            if final.exists():
                shutil.rmtree(final)
            os.rename(out, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    result = _load_cached(final)
    if result is None:
        raise ImageError(f"the build left no usable image in {final}")
    return BuildResult(result.image, result.manifest, result.metadata, result.key, False)


def image_name(request: profiles.BuildRequest) -> str:
    return f"egpu-{request.profile.name}-{request.arch}"


def write_stages(request: profiles.BuildRequest, resolved: ResolvedSet, debs: Mapping[str, Path],
                 work: Path, key: str) -> tuple[Path, Path, bytes]:
    """Write the first stage and the tools tar into ``work``; return them and the settings."""
    kernel_version = resolved.kernel_version()
    versions = resolved.versions()
    # identifiers from the key: the same inputs give the same filesystems' UUIDs
    root_uuid = str(uuid.UUID(key[:32], version=4))
    esp_serial = key[32:40].upper()
    loader_source, loader_path = LOADER[request.arch]
    name = image_name(request)
    settings = {
        "ROOT_UUID": root_uuid, "ESP_SERIAL": esp_serial,
        "ESP_FS_UUID": f"{esp_serial[:4]}-{esp_serial[4:]}", "ESP_MIB": str(profiles.ESP_MIB),
        "KERNEL_VERSION": kernel_version, "DPKG_VERSION": versions["dpkg"],
        "HOSTNAME": HOSTNAME, "LOADER_SOURCE": loader_source, "LOADER_PATH": loader_path,
    }
    env_file = build_env(settings)
    required = list(resolved.required)
    base = [f.filename for f in resolved.files if f.filename not in set(required)]
    stage_files = {f"egpu/debs/{f.filename}": (debs[f.filename], 0o644) for f in resolved.files}
    builder = resources.files(BUILDER_PACKAGE)
    stage_data = {
        "egpu/build.env": (env_file, 0o644),
        "egpu/stage2.sh": (builder.joinpath("stage2.sh").read_bytes(), 0o755),
        "egpu/required.list": ("".join(f"{n}\n" for n in required).encode(), 0o644),
        "egpu/base.list": ("".join(f"{n}\n" for n in base).encode(), 0o644),
        "egpu/loader.conf": (LOADER_CONF.encode(), 0o644),
        "egpu/entry.conf": (boot_entry(request.arch, root_uuid, name).encode(), 0o644),
        "egpu/dhcp.network": (DHCP_NETWORK.encode(), 0o644),
        "egpu/ssh-host-keys.service": (SSH_KEYS_UNIT.encode(), 0o644),
    }
    if request.nvidia is not None:
        script = profiles.extra_steps_script(request.nvidia, kernel_version)
        stage_data["egpu/extra-steps.sh"] = (script.encode(), 0o755)
    stage1 = work / "stage1.tar"
    with stage1.open("wb") as fh:
        tree = rootfs.merge_packages(debs[n].read_bytes() for n in required)
        rootfs.write_tar(fh, tree, stage_files, stage_data)
    del tree
    tools = work / "tools.tar"
    with tools.open("wb") as fh:
        rootfs.write_tar(fh, rootfs.merge_packages(debs[f.filename].read_bytes()
                                                   for f in resolved.tools))
    return stage1, tools, env_file


def _build(request: profiles.BuildRequest, info: EngineInfo, guest: GuestAssets,
           resolved: ResolvedSet, work: Path, key: str, compress: bool, progress: Progress,
           accel: str | None) -> Path:
    debs = {p.name: p for p in debpkg.download([*resolved.files, *resolved.tools], dirs().debs,
                                               progress)}
    progress.note("writing the first stage")
    stage1, tools, env_file = write_stages(request, resolved, debs, work, key)
    name = image_name(request)
    versions = resolved.versions()
    builder = resources.files(BUILDER_PACKAGE)
    initrd = work / "builder-initrd"
    extra = cpio.gzip_archive([
        cpio.regular("init", builder.joinpath("init.sh").read_bytes(), perm=0o755),
        cpio.regular("etc/egpu/build.env", env_file),
    ])
    initrd.write_bytes(guest.initramfs.read_bytes() + extra)
    disk = work / "disk.raw"
    with disk.open("wb") as fh:
        fh.truncate(request.size)
    console = _run_builder(request, info, guest, initrd, (disk, tools, stage1), work, progress,
                           accel, len(resolved.files))
    check_installed(console.packages, versions)
    progress.note("converting the disk to qcow2")
    out = work / "out"
    out.mkdir()
    image = out / f"{name}.qcow2"
    engine = info.engine
    run_tool([*engine.qemu_img(), "convert", *(["-c"] if compress else []), "-f", "raw",
              "-O", "qcow2", str(disk), str(image)],
             lambda why: ImageError(f"qemu-img convert failed: {why}"), timeout=None,
             env=engine.env())
    disk.unlink()
    meta = ImageMetadata(name=name, artifact=image.name, sha256=_sha256(image),
                         features=tuple(request.features()), arch=request.arch,
                         profile=request.profile.name, packages=console.packages)
    (out / f"{name}.json").write_bytes(meta.dump())
    (out / "build-log.txt").write_text("\n".join(console.lines) + "\n")
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _run_builder(request: profiles.BuildRequest, info: EngineInfo, guest: GuestAssets,
                 initrd: Path, disks: tuple[Path, Path, Path], work: Path, progress: Progress,
                 accel: str | None, packages: int) -> ConsoleState:
    """Boot the builder VM and follow its console until it powers off."""
    chosen, notice = choose_accel(info, request.arch, accel, nested=host_is_virtual())
    if notice:
        progress.note(notice)
    progress.note(f"booting the builder VM ({chosen}"
                  f"{'; slow: tens of minutes' if chosen == 'tcg' else ''})")
    sockets = Path(tempfile.mkdtemp(prefix="egpu-ib-"))  # short: UNIX socket paths are bounded
    log = work / "serial.log"
    target, tools, stage1 = disks
    spec = VmSpec(
        name="image-build", arch=request.arch, cpus=BUILDER_CPUS, memory_mib=BUILDER_MEMORY_MIB,
        accel=chosen,  # type: ignore[arg-type]
        qmp_socket=sockets / "qmp.sock", console_socket=sockets / "console.sock",
        serial_log=log, kernel=guest.kernel, initrd=initrd,
        append=f"console={console_for(request.arch)} loglevel=3 panic=-1",
        disks=(Disk(target, "raw"), Disk(tools, "raw", readonly=True),
               Disk(stage1, "raw", readonly=True)),
        extra=("-no-reboot",),
    )
    argv = build_argv(info.engine.qemu(request.arch), spec)
    state = ConsoleState()
    qemu_log = (work / "qemu.log").open("wb")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=qemu_log,
                            stderr=subprocess.STDOUT, env={**os.environ, **info.engine.env()})
    bar = False
    try:
        deadline = time.monotonic() + BUILD_TIMEOUT_S
        offset, pending = 0, b""
        while True:
            done = proc.poll() is not None
            if log.exists():
                with log.open("rb") as fh:
                    fh.seek(offset)
                    chunk = fh.read()
                offset += len(chunk)
                *lines, pending = (pending + chunk).split(b"\n")
                before = len(state.installed)
                for step in read_console(state, (ln.decode(errors="replace") for ln in lines)):
                    if step == "dpkg-core" and not bar:
                        progress.note(STEP_NOTES[step])
                        progress.start("installing packages", packages)
                        bar = True
                    elif step in STEP_NOTES and not step.startswith("dpkg-"):
                        if bar:
                            progress.finish()
                            bar = False
                        progress.note(STEP_NOTES[step])
                if bar and len(state.installed) > before:
                    progress.advance(len(state.installed) - before)
            if done:
                break
            if time.monotonic() > deadline:
                raise ImageError(f"the builder VM did not finish in {BUILD_TIMEOUT_S} s",
                                 hint=_tail(state))
            time.sleep(POLL_S)
    finally:
        if bar:
            progress.finish()
        if proc.poll() is None:
            proc.kill()  # our own child, started above
        proc.wait()
        qemu_log.close()
        shutil.rmtree(sockets, ignore_errors=True)
    if state.failed is not None or not state.ok:
        with contextlib.suppress(OSError):
            shutil.copyfile(log, _cache_root().parent / FAILED_LOG)
        what = f"at step {state.failed}" if state.failed else (
            f"QEMU exited {proc.returncode} at step {state.step or 'boot'}")
        raise ImageError(f"the image build failed {what}: {_last_words(state, work)}",
                         hint=f"the whole console is in {_cache_root().parent / FAILED_LOG}")
    return state


def _tail(state: ConsoleState) -> str:
    return " | ".join(ln for ln in state.lines[-3:] if ln)[:300] or "no console output"


def _last_words(state: ConsoleState, work: Path) -> str:
    lines = [ln for ln in state.lines if ln and not ln.startswith(FAIL_MARK)]
    if not lines:
        with contextlib.suppress(OSError):
            lines = (work / "qemu.log").read_text(errors="replace").splitlines()[-3:]
    return " | ".join(lines[-FAIL_CONTEXT_LINES:])[-1500:] or "no console output"


def copy_out(result: BuildResult, output: Path) -> tuple[Path, Path]:
    """Copy a built image to ``output`` (a .qcow2) with its JSON beside it, each renamed in only
    once complete; the JSON names the new file."""
    if output.suffix != ".qcow2":
        raise UsageError(f"--output {output}: the file name must end in .qcow2")
    if not output.parent.is_dir():
        raise UsageError(f"--output {output}: no such directory {output.parent}")
    meta_path = output.with_suffix(".json")
    meta = result.metadata
    meta = ImageMetadata(name=meta.name, artifact=output.name, sha256=meta.sha256,
                         features=meta.features, arch=meta.arch, profile=meta.profile,
                         packages=meta.packages)
    parts = [output.with_name(f".{output.name}.partial"),
             meta_path.with_name(f".{meta_path.name}.partial")]
    try:
        shutil.copyfile(result.image, parts[0])
        parts[1].write_bytes(meta.dump())
        os.replace(parts[0], output)
        os.replace(parts[1], meta_path)
    except OSError as e:
        raise ImageError(f"cannot write {output}: {e.strerror or e}") from e
    finally:
        for p in parts:
            p.unlink(missing_ok=True)
    return output, meta_path


def manifest_json(result: BuildResult) -> dict[str, object]:
    """A JSON summary for ``--json``."""
    return {"image": str(result.image), "manifest": str(result.manifest), "key": result.key,
            "cached": result.cached, **result.metadata.to_json(),
            "package_count": len(result.metadata.packages)}

