"""Shared folders, pure side: ``--mount`` parsing and checks, the 9p argv, the guest's encoding."""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from conftest import InProcessCli
from egpu.engine.argv import build_argv
from egpu.engine.qemu import PASSTHROUGH_DEVICES, placeholder_info
from egpu.engine.shares import (
    MAX_SHARES,
    MountRequest,
    Share,
    check_guest_path,
    parse_mount,
    resolve_mounts,
    share_args,
)
from egpu.errors import EngineError, UsageError
from egpu.guest.assets import planned_guest
from egpu.guest.protocol import GuestMount, encode_path, kernel_cmdline, mounts_arg
from egpu.vm.lifecycle import RunRequest, plan_run
from egpu.vm.store import VmConfig
from test_core_units import spec
from test_qemu_options import parse_qemu_opts


def test_parse_plain_guest_and_mode() -> None:
    assert parse_mount("/data") == MountRequest("/data", None, False)
    assert parse_mount("/data:ro") == MountRequest("/data", None, True)
    assert parse_mount("/data:rw") == MountRequest("/data", None, False)
    assert parse_mount("/data:/mnt/d") == MountRequest("/data", "/mnt/d", False)
    assert parse_mount("/data:/mnt/d:ro") == MountRequest("/data", "/mnt/d", True)
    assert parse_mount("rel/dir:/g") == MountRequest("rel/dir", "/g", False)


def test_colon_rule_keeps_host_paths_whole_unless_a_field_looks_like_guest_or_mode() -> None:
    # the last field is GUEST_DIR only if it is absolute: here it is part of the host path
    assert parse_mount("/data/a:b") == MountRequest("/data/a:b", None, False)
    assert parse_mount("/data/a:b:ro") == MountRequest("/data/a:b", None, True)
    assert parse_mount("/models/llama:7b:/m") == MountRequest("/models/llama:7b", "/m", False)
    # an absolute last field is GUEST_DIR; writing GUEST_DIR out keeps any host path whole
    assert parse_mount("/x:/y") == MountRequest("/x", "/y", False)
    assert parse_mount("/x:/y:/g") == MountRequest("/x:/y", "/g", False)
    # a host directory whose name ends in ":ro" is shared writable by saying so
    assert parse_mount("/m:ro:/m:rw") == MountRequest("/m:ro", "/m", False)
    assert parse_mount("/m:ro:rw") == MountRequest("/m:ro", None, False)


@pytest.mark.parametrize("text", ["", ":ro", ":/g", ":/g:ro", ":rw"])
def test_no_host_directory_is_refused(text: str) -> None:
    with pytest.raises(UsageError, match="names no host directory"):
        parse_mount(text)


@given(host=st.text(min_size=1), guest=st.text(), ro=st.booleans())
def test_explicit_guest_and_mode_always_parse_back(host: str, guest: str, ro: bool) -> None:
    """Whatever the host path holds (colons, ':ro' tails), the full form recovers it exactly."""
    assume(":" not in guest)
    text = f"{host}:/{guest}:{'ro' if ro else 'rw'}"
    assert parse_mount(text) == MountRequest(host, "/" + guest, ro)


_name_chars = st.characters(blacklist_characters="/\x00\n", blacklist_categories=["Cs"])


@given(name=st.text(_name_chars, min_size=1, max_size=40), ro=st.booleans())
def test_odd_host_directory_names_resolve(tmp_path_factory: pytest.TempPathFactory, name: str,
                                          ro: bool) -> None:
    assume(name not in (".", "..") and len(os.fsencode(name)) < 200)
    base = tmp_path_factory.mktemp("odd")
    host = base / name
    host.mkdir()
    (share,) = resolve_mounts([f"{host}:/mnt/share:{'ro' if ro else 'rw'}"])
    assert share == Share("egpu0", host.resolve(), "/mnt/share", ro)
    # and by default the guest path is the host's own
    (default,) = resolve_mounts([f"{host}:rw"])
    assert default.guest == str(host.resolve())


def test_host_directory_resolved_absolute(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (share,) = resolve_mounts(["link:/g"], cwd=tmp_path)
    assert share.host == (tmp_path / "real").resolve() and share.host.is_absolute()


def test_host_directory_must_exist_and_be_a_directory(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        resolve_mounts([str(tmp_path / "missing")])
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is not a directory"):
        resolve_mounts([str(tmp_path / "file")])
    with pytest.raises(UsageError, match="newline"):
        resolve_mounts([f"{tmp_path}/a\nb:/g"])


@pytest.mark.parametrize("guest", [
    "/", "/proc", "/proc/1", "/sys/kernel", "/dev", "/dev/shm", "/run/x", "/etc", "/usr",
    "/tmp", "//proc//", "/bin/",
])
def test_system_directories_of_the_guest_are_refused(guest: str) -> None:
    with pytest.raises(UsageError, match="system directory"):
        check_guest_path(guest)


@pytest.mark.parametrize(("guest", "why"), [
    ("relative", "not absolute"), ("/a/../proc", r"'\.\.'"), ("/a/./b", r"'\.'"),
    ("/a\x00b", "NUL"), ("/a\nb", "newline"),
])
def test_bad_guest_paths_are_refused(guest: str, why: str) -> None:
    with pytest.raises(UsageError, match=why):
        check_guest_path(guest)


def test_guest_paths_are_normalised_and_may_sit_inside_system_dirs() -> None:
    assert check_guest_path("//mnt//models/") == "/mnt/models"
    assert check_guest_path("/tmp/cache") == "/tmp/cache"
    assert check_guest_path("/usr/share/models") == "/usr/share/models"
    assert check_guest_path("/processes") == "/processes"  # not /proc


def test_duplicate_and_nested_guest_paths_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="is '/g'"):
        resolve_mounts([f"{tmp_path}:/g", f"{tmp_path}:/g/"])
    with pytest.raises(UsageError, match="overlaps"):
        resolve_mounts([f"{tmp_path}:/g", f"{tmp_path}:/g/inner"])
    with pytest.raises(UsageError, match="overlaps"):
        resolve_mounts([f"{tmp_path}:/g/inner", f"{tmp_path}:/g"])
    # the same host folder twice, at two places, is fine; so are siblings with a common prefix
    shares = resolve_mounts([f"{tmp_path}:/g", f"{tmp_path}:/gg:ro"])
    assert [s.tag for s in shares] == ["egpu0", "egpu1"]


def test_too_many_shares_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=f"at most {MAX_SHARES}"):
        resolve_mounts([f"{tmp_path}:/g{i}" for i in range(MAX_SHARES + 1)])


def test_argv_golden() -> None:
    shares = (Share("egpu0", Path("/srv/my models, v2"), "/models", False),
              Share("egpu1", Path("/srv/ro"), "/mnt/ro", True))
    assert share_args(shares) == [
        "-fsdev", "local,id=share0,path=/srv/my models,, v2,security_model=none",
        "-device", "virtio-9p-pci,fsdev=share0,mount_tag=egpu0",
        "-fsdev", "local,id=share1,path=/srv/ro,security_model=none,readonly=on",
        "-device", "virtio-9p-pci,fsdev=share1,mount_tag=egpu1",
    ]
    argv = build_argv(["qemu"], spec(shares=shares))
    i = argv.index("-fsdev")
    assert argv[i:i + 8] == share_args(shares)
    assert "-fsdev" not in build_argv(["qemu"], spec())


@given(st.text(_name_chars, min_size=1))
def test_fsdev_path_is_one_value_whatever_it_holds(name: str) -> None:
    """QemuOpts reads the path back exactly: a comma or '=' never becomes another option."""
    host = Path("/h") / name  # pathlib folds a name of "." away: compare with what it holds
    (fsdev, _device) = share_args([Share("egpu0", host, "/g", True)])[1::2]
    pairs = parse_qemu_opts(fsdev)
    assert pairs == [("local", ""), ("id", "share0"), ("path", str(host)),
                     ("security_model", "none"), ("readonly", "on")]


@given(st.text(_name_chars, min_size=1))
def test_guest_mount_path_survives_the_kernel_command_line(name: str) -> None:
    path = "/mnt/" + name
    line = kernel_cmdline("aarch64", selftest=False, cpus=1, memory_mib=64,
                          mounts=[GuestMount("egpu0", path, True)])
    (arg,) = [a for a in line.split(" ") if a.startswith("egpu.mounts=")]
    tag, mode, enc = arg.removeprefix("egpu.mounts=").split(":")
    assert (tag, mode) == ("egpu0", "ro")
    assert set(enc) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789/._-%")
    out, i = bytearray(), 0
    while i < len(enc):
        if enc[i] == "%":
            out.append(int(enc[i + 1:i + 3], 16))
            i += 3
        else:
            out.append(ord(enc[i]))
            i += 1
    assert os.fsdecode(bytes(out)) == path


def test_mounts_arg_refuses_bad_tags_and_long_command_lines() -> None:
    assert mounts_arg([]) == []
    with pytest.raises(ValueError, match="bad guest mount"):
        mounts_arg([GuestMount("Egpu,0", "/g", False)])
    with pytest.raises(ValueError, match="command line"):
        kernel_cmdline("x86_64", selftest=False, cpus=1, memory_mib=64,
                       mounts=[GuestMount("egpu0", "/" + " " * 700, False)])


def test_guest_init_decodes_what_the_host_encodes(tmp_path: Path) -> None:
    """The decoding init.sh does (sed to \\xHH, then printf), run by a POSIX shell here."""
    path = "/tmp/x/my models, v2/é'\"$(id)%\\ *\t"
    script = ('enc=$1; path=$(printf "$(echo "$enc" | '
              "sed 's/%\\([0-9A-F][0-9A-F]\\)/\\\\x\\1/g')\"); printf '%s' \"$path\"")
    init = (Path(__file__).parent.parent / "src/egpu/guest/init.sh").read_text()
    assert "sed 's/%\\([0-9A-F][0-9A-F]\\)/\\\\x\\1/g'" in init  # the same expression
    out = subprocess.run(["bash", "-c", script, "sh", encode_path(path)], capture_output=True,
                         check=True).stdout
    assert out == os.fsencode(path), shlex.quote(out.decode(errors="replace"))


def test_config_records_mounts_and_reads_them_back() -> None:
    share = Share("egpu0", Path("/srv/a, b"), "/srv/a, b", True)
    config = VmConfig(name="v", arch="aarch64", cpus=1, memory_mib=64, accel="tcg",
                      gpu_path="none", qemu="q", qemu_version="11.1", argv=["q"],
                      mounts=[share])
    doc = config.to_json()
    assert doc["mounts"] == [{"tag": "egpu0", "host": "/srv/a, b", "guest": "/srv/a, b",
                              "readonly": True}]
    assert VmConfig.from_json(doc).mounts == [share]
    doc["mounts"] = [{"tag": "egpu0", "host": 1}]
    with pytest.raises(ValueError, match="mount entry"):
        VmConfig.from_json(doc)


def test_cli_refuses_bad_mounts_before_anything_starts(
    inproc: InProcessCli, tmp_path: Path
) -> None:
    proc = inproc("run", "--gpu", "none", "--mount", f"{tmp_path}/nope:/g")
    assert proc.returncode == 2 and proc.stderr.count("\n") <= 2
    assert "does not exist" in proc.stderr
    proc = inproc("run", "--gpu", "none", "--mount", f"{tmp_path}:/sys/x")
    assert proc.returncode == 2 and "system directory" in proc.stderr


def test_dry_run_shows_the_shares(inproc: InProcessCli, tmp_path: Path) -> None:
    host = tmp_path / "my models, v2"
    host.mkdir()
    doc = inproc.json("run", "--dry-run", "--gpu", "none", "--mount", f"{host}:ro")
    argv = doc["argv"]
    assert argv[argv.index("-fsdev") + 1] == (
        f"local,id=share0,path={str(host).replace(',', ',,')},security_model=none,readonly=on")
    append = argv[argv.index("-append") + 1]
    assert f"egpu.mounts=egpu0:ro:{encode_path(str(host))}" in append.split(" ")


def test_plan_refuses_mounts_on_a_qemu_without_9p(egpu_home: Path, tmp_path: Path) -> None:
    info = placeholder_info()
    request = RunRequest(name="v", arch="aarch64", cpus=1, memory_mib=256,
                         mounts=(f"{tmp_path}:/mnt/a:ro",))
    plan = plan_run(request, info, planned_guest("aarch64"))
    assert plan.shares == (Share("egpu0", tmp_path.resolve(), "/mnt/a", True),)
    assert plan.config.mounts == list(plan.shares)
    without = dataclasses.replace(info, devices={a: PASSTHROUGH_DEVICES for a in info.arches})
    with pytest.raises(EngineError, match="no virtio-9p-pci"):
        plan_run(request, without, planned_guest("aarch64"))
    # no mounts: no 9p needed
    assert plan_run(dataclasses.replace(request, mounts=()), without,
                    planned_guest("aarch64")).shares == ()
