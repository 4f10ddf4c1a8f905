"""``egpu image build``'s pure parts: profiles and requests, the NVIDIA steps (golden), the cache
key, the first stage's tar made from .deb files, the builder's console protocol, and the
manifest's new fields."""

from __future__ import annotations

import io
import json
import lzma
import tarfile
from pathlib import Path

import pytest

from conftest import Cli, InProcessCli
from egpu.errors import ImageError, UsageError
from egpu.images import profiles, rootfs
from egpu.images.manifest import ImageMetadata, parse_metadata
from egpu.vm import image_build

NO_ENV: dict[str, str] = {}

@pytest.fixture
def cli(inproc: InProcessCli) -> Cli:
    """What these commands decide and print is tested in-process (quick; see InProcessCli)."""
    return inproc



def request(profile: str = "base", arch: str = "x86_64", **kw: object) -> profiles.BuildRequest:
    return profiles.parse_request(profile, arch, profiles.DEFAULT_SIZE,
                                  list(kw.get("packages", [])),  # type: ignore[call-overload]
                                  list(kw.get("extras", [])),  # type: ignore[call-overload]
                                  kw.get("env", NO_ENV))  # type: ignore[arg-type]


def test_base_profile_packages_golden() -> None:
    assert request().packages() == [
        "systemd", "systemd-sysv", "udev", "dbus", "openssh-server", "cloud-init",
        "qemu-guest-agent", "python3", "initramfs-tools", "e2fsprogs", "ca-certificates",
        "iproute2", "linux-image-amd64", "linux-headers-amd64",
    ]
    assert request(arch="aarch64").packages()[-2:] == ["linux-image-arm64", "linux-headers-arm64"]
    assert request().suites() == ("trixie",)


def test_docker_and_ai_profiles() -> None:
    docker = request("docker")
    # the CLI too: docker.io only recommends it, and builds install no recommends
    assert docker.packages()[-2:] == ["docker.io", "docker-cli"]
    assert "docker" in docker.features() and "docker" not in request("base").features()
    ai = request("ai")
    assert ai.suites() == ("trixie", "forky")
    assert ai.testing_packages() == ["llama.cpp-tools/forky"]
    # vLLM is a container: the ai image runs Docker as well
    assert {"llama-server", "docker"} <= set(ai.features())
    assert {"docker.io", "docker-cli"} <= set(ai.packages())


def test_a_profile_edit_rebuilds_only_that_profile() -> None:
    from egpu.vm import image_build

    # profiles enter the key through the request, not as code: editing one keeps the others
    assert "egpu.images.profiles" not in image_build.BUILDER_MODULES
    files, code = {"a.deb": "00"}, b"builder"
    key = profiles.cache_key(request("docker"), files, code)
    assert key == profiles.cache_key(request("docker"), dict(files), code)
    assert key != profiles.cache_key(request("base"), files, code)
    assert key != profiles.cache_key(request("docker", packages=["vim"]), files, code)


def test_extra_packages_are_added_once() -> None:
    r = request(packages=["vim", "python3", "vim"])
    assert r.packages().count("python3") == 1
    assert r.packages()[-1] == "vim"


@pytest.mark.parametrize(("args", "message"), [
    (("nope", "x86_64", profiles.DEFAULT_SIZE, [], []), "unknown profile 'nope'"),
    (("base", "riscv64", profiles.DEFAULT_SIZE, [], []), "unknown architecture"),
    (("base", "x86_64", 1 << 30, [], []), "out of range"),
    (("base", "x86_64", profiles.DEFAULT_SIZE, ["vim;rm -rf /"], []), "not a Debian package"),
    (("base", "x86_64", profiles.DEFAULT_SIZE, ["Vim"], []), "not a Debian package"),
    (("base", "x86_64", profiles.DEFAULT_SIZE, [], ["amd"]), "--with 'amd' is not known"),
])
def test_bad_requests_are_refused(args: tuple[str, str, int, list[str], list[str]],
                                  message: str) -> None:
    with pytest.raises(UsageError, match=message):
        profiles.parse_request(*args, NO_ENV)


def test_nvidia_plan_golden() -> None:
    r = request(extras=["nvidia"])
    assert r.nvidia is not None
    assert r.nvidia.source.line() == (
        "deb [signed-by=/usr/share/keyrings/cuda-archive-keyring.gpg] "
        "https://developer.download.nvidia.com/compute/cuda/repos/debian13/x86_64/ /")
    assert r.packages()[-3:] == ["nvidia-open", "nvidia-driver-cuda", "dkms"]
    assert "nvidia" in r.features()
    assert profiles.extra_steps_script(r.nvidia, "6.12.1+deb13-amd64") == (
        "#!/bin/sh\n"
        "# egpu image build: --with nvidia (run in the image's chroot)\n"
        "set -e\n"
        "dkms autoinstall -k 6.12.1+deb13-amd64\n"
        "sh -c 'printf '\"'\"'blacklist nouveau\\noptions nouveau modeset=0\\n'\"'\"' "
        "> /etc/modprobe.d/egpu-nvidia.conf'\n"
        "update-initramfs -u -k 6.12.1+deb13-amd64\n")
    arm = request(arch="aarch64", extras=["nvidia"])
    assert arm.nvidia is not None and "/debian13/sbsa/ /" in arm.nvidia.source.line()


def test_nvidia_source_is_configurable() -> None:
    env = {profiles.NVIDIA_REPO_ENV: "http://127.0.0.1:8080/cuda",
           profiles.NVIDIA_KEYRING_ENV: "/etc/egpu/nvidia.gpg"}
    r = request(extras=["nvidia"], env=env)
    assert r.nvidia is not None
    assert r.nvidia.source.line() == (
        "deb [signed-by=/etc/egpu/nvidia.gpg] http://127.0.0.1:8080/cuda/ /")
    # the source is an input of the build: another repository is another cache key
    assert request(extras=["nvidia"]).describe() != r.describe()
    with pytest.raises(UsageError, match=profiles.NVIDIA_REPO_ENV):
        request(extras=["nvidia"], env={profiles.NVIDIA_REPO_ENV: "ftp://x y"})
    with pytest.raises(UsageError, match=profiles.NVIDIA_KEYRING_ENV):
        request(extras=["nvidia"], env={profiles.NVIDIA_KEYRING_ENV: "k] evil"})


@pytest.mark.parametrize(("version", "branch"), [
    ("570.124.06-1", 570), ("1:580.65.06-0ubuntu1", 580), ("550.163.01-2", 550), ("x", None)])
def test_nvidia_branch(version: str, branch: int | None) -> None:
    assert profiles.nvidia_branch(version) == branch


def test_cache_key_follows_every_input() -> None:
    files = {"a_1_amd64.deb": "1" * 64, "b_2_all.deb": "2" * 64}
    key = profiles.cache_key(request(), files, b"builder")
    assert key == profiles.cache_key(request(), dict(reversed(files.items())), b"builder")
    others = {
        profiles.cache_key(request("docker"), files, b"builder"),
        profiles.cache_key(request(arch="aarch64"), files, b"builder"),
        profiles.cache_key(request(packages=["vim"]), files, b"builder"),
        profiles.cache_key(request(), {**files, "b_2_all.deb": "3" * 64}, b"builder"),
        profiles.cache_key(request(), files, b"builder v2"),
    }
    assert key not in others and len(others) == 5


# --- the first stage, from .deb files -------------------------------------------------------

def _ar(members: dict[str, bytes]) -> bytes:
    out = bytearray(rootfs.AR_MAGIC)
    for name, data in members.items():
        head = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}".encode() + b"`\n"
        out += head + data + (b"\n" if len(data) & 1 else b"")
    return bytes(out)


def _deb(entries: list[tarfile.TarInfo], data: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:") as tar:
        for info in entries:
            body = data.get(info.name)
            if body is not None:
                info.size = len(body)
            tar.addfile(info, io.BytesIO(body) if body is not None else None)
    return _ar({"debian-binary": b"2.0\n", "control.tar.xz": lzma.compress(b""),
                "data.tar.xz": lzma.compress(buf.getvalue())})


def _info(name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644,
          link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname, info.uname, info.gname = kind, mode, link, "root", "root"
    return info


def test_merge_keeps_merged_usr_and_refuses_escapes() -> None:
    base_files = _deb([_info("./", tarfile.DIRTYPE, 0o755),
                       _info("./bin", tarfile.SYMTYPE, 0o777, "usr/bin"),
                       _info("./usr/bin", tarfile.DIRTYPE, 0o755)], {})
    tool = _deb([_info("./bin", tarfile.DIRTYPE, 0o755),
                 _info("./bin/tool", mode=0o4755),
                 _info("./bin/tool2", tarfile.LNKTYPE, link="./bin/tool"),
                 _info("./../escape"), _info("/abs")],
                {"./bin/tool": b"#!/bin/sh\n", "./../escape": b"x", "/abs": b"x"})
    tree = rootfs.merge_packages([base_files, tool])
    assert tree["bin"].info.issym() and tree["bin"].info.linkname == "usr/bin"
    assert tree["usr/bin/tool"].data == b"#!/bin/sh\n"
    assert tree["usr/bin/tool"].info.mode == 0o4755
    assert tree["usr/bin/tool2"].info.linkname == "usr/bin/tool"
    assert not any("escape" in n or "abs" in n for n in tree)
    out = io.BytesIO()
    rootfs.write_tar(out, tree, extra_data={"egpu/x/y.sh": (b"echo\n", 0o755)})
    out.seek(0)
    with tarfile.open(fileobj=out) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    # parents before children, hard links after their targets, generated files with dirs
    assert names.index("usr/bin") < names.index("usr/bin/tool") < names.index("usr/bin/tool2")
    assert names.index("egpu") < names.index("egpu/x") < names.index("egpu/x/y.sh")
    assert all(m.uid == 0 and m.uname == "" for m in members)


@pytest.mark.parametrize("blob", [
    b"not an ar archive",
    rootfs.AR_MAGIC + b"data.tar.xz/    0           0     0     100644  999999999 `\n",
    rootfs.AR_MAGIC + b"data.tar.xz/    0           0     0     100644  abc       `\n",
    _ar({"debian-binary": b"2.0\n"}),
    _ar({"data.tar.zst": b"x"}),
    _ar({"data.tar.xz": b"not xz"}),
])
def test_malformed_debs_are_refused(blob: bytes) -> None:
    with pytest.raises(ImageError):
        rootfs.deb_data(blob)


# --- the builder's console and what it installed -------------------------------------------

def test_console_protocol() -> None:
    state = image_build.ConsoleState()
    started = image_build.read_console(state, [
        "EGPU-BUILD-STEP dpkg-core", "Unpacking libc6:amd64 (2.41-12) ...",
        "Setting up libc6:amd64 (2.41-12) ...", "Setting up dash (0.5.12-12) ...",
        "Setting up libc6:amd64 (2.41-12) ...", "EGPU-BUILD-PACKAGE login 1:4.16.0-2",
        "EGPU-BUILD-STEP esp", "EGPU-BUILD-OK"])
    assert started == ["dpkg-core", "esp"]
    assert state.installed == {"libc6", "dash"}
    assert state.packages == {"login": "1:4.16.0-2"}
    assert state.ok and state.failed is None
    failed = image_build.ConsoleState()
    image_build.read_console(failed, ["EGPU-BUILD-STEP mkfs", "egpu-build: mkfs failed",
                                      "EGPU-BUILD-FAIL mkfs"])
    assert failed.failed == "mkfs" and "egpu-build: mkfs failed" in failed.lines
    with pytest.raises(ImageError, match="malformed package line"):
        image_build.read_console(image_build.ConsoleState(),
                                 ["EGPU-BUILD-PACKAGE bad name $(reboot)"])


def test_installed_set_must_match_the_resolved_one() -> None:
    resolved = {"login": "4.16.0-2", "dash": "0.5.12-12"}
    image_build.check_installed({"login": "1:4.16.0-2", "dash": "0.5.12-12"}, resolved)
    with pytest.raises(ImageError, match="missing: dash"):
        image_build.check_installed({"login": "1:4.16.0-2"}, resolved)
    with pytest.raises(ImageError, match=r"not 0\.5\.12-12"):
        image_build.check_installed({"login": "4.16.0-2", "dash": "0.5.13"}, resolved)


def test_boot_entry_and_settings() -> None:
    entry = image_build.boot_entry("x86_64", "0123", "egpu-base-x86_64")
    assert "options root=UUID=0123 ro console=ttyS0 console=tty0\n" in entry
    assert image_build.build_env({"B": "it's", "A": "1"}) == b"A=1\nB='it'\"'\"'s'\n"


# --- the manifest ------------------------------------------------------------------------

def test_manifest_new_fields_round_trip() -> None:
    meta = ImageMetadata(name="egpu-base-x86_64", artifact="egpu-base-x86_64.qcow2",
                         sha256="a" * 64, features=("ssh",), arch="x86_64", profile="base",
                         packages={"systemd": "257.13-1~deb13u1", "dash": "0.5.12-12"})
    doc = json.loads(meta.dump())
    assert list(doc) == ["name", "artifact", "sha256", "features", "arch", "profile", "packages"]
    assert list(doc["packages"]) == ["dash", "systemd"]
    assert parse_metadata(meta.dump()) == meta
    # a file from another builder, without them, still reads
    plain = parse_metadata(b'{"name": "x", "sha256": null, "features": []}')
    assert plain.arch is None and plain.packages == {}
    with pytest.raises(ImageError, match="packages"):
        parse_metadata(b'{"packages": {"a": 1}}')
    with pytest.raises(ImageError, match="packages"):
        parse_metadata(b'{"packages": ["a"]}')


# --- the command line ---------------------------------------------------------------------

@pytest.mark.parametrize(("args", "text"), [
    (("nope",), "'nope' is not one of"),
    (("base", "--size", "lots"), "bad --size 'lots'"),
    (("base", "--size", "1G"), "out of range"),
    (("base", "--packages", "ok,Not;ok"), "not a Debian package name"),
    (("base", "--arch", "mips"), "'mips' is not one of"),
    (("base", "--with", "amd"), "'amd' is not"),
])
def test_cli_refuses_bad_input_in_one_line(cli: Cli, args: tuple[str, ...], text: str) -> None:
    proc = cli("image", "build", *args)
    assert proc.returncode == 2, proc.stderr
    assert text in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_copy_out_refuses_other_names(tmp_path: Path) -> None:
    meta = ImageMetadata("n", "n.qcow2", "a" * 64)
    result = image_build.BuildResult(tmp_path / "n.qcow2", tmp_path / "n.json", meta, "k", True)
    with pytest.raises(UsageError, match=r"must end in \.qcow2"):
        image_build.copy_out(result, tmp_path / "out.img")
    with pytest.raises(UsageError, match="no such directory"):
        image_build.copy_out(result, tmp_path / "missing" / "out.qcow2")
