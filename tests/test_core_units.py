"""Pure cores of the foundation: sizes, argv, state derivation, package-index parsing."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from egpu.debpkg import host_mirror, parse_madison, parse_origins, parse_print_uris, parse_sha256s
from egpu.engine.argv import Disk, VmSpec, build_argv, parse_disk_option, parse_memory
from egpu.engine.qemu import Engine, EngineInfo, host_is_virtual, parse_help_names, parse_version
from egpu.errors import EngineError, UsageError
from egpu.vm.lifecycle import choose_accel
from egpu.vm.status import derive_state


@given(st.integers(min_value=64, max_value=1 << 22))
def test_memory_mib_roundtrip(mib: int) -> None:
    assert parse_memory(f"{mib}M") == mib
    assert parse_memory(str(mib)) == mib
    assert parse_memory(f"{mib}MiB") == mib


@given(st.integers(min_value=1, max_value=4096))
def test_memory_gib(gib: int) -> None:
    assert parse_memory(f"{gib}G") == gib * 1024
    assert parse_memory(f"{gib}g") == gib * 1024


@given(st.text(max_size=12))
def test_memory_never_crashes(text: str) -> None:
    try:
        mib = parse_memory(text)
    except UsageError:
        return
    assert 64 <= mib <= 1 << 22


def test_memory_fractions_and_units() -> None:
    assert parse_memory("1.5G") == 1536
    assert parse_memory("524288K") == 512
    with pytest.raises(UsageError):
        parse_memory("1.0001G")


def test_disk_option() -> None:
    assert parse_disk_option("/a/b.img:ro") == (Path("/a/b.img"), True)
    assert parse_disk_option("/a/b.img") == (Path("/a/b.img"), False)
    assert parse_disk_option("c:rw") == (Path("c"), False)


def spec(**kw: object) -> VmSpec:
    base: dict[str, object] = dict(
        name="v", arch="aarch64", cpus=2, memory_mib=512, accel="tcg",
        qmp_socket=Path("/r/qmp.sock"), console_socket=Path("/r/con.sock"),
        serial_log=Path("/r/serial.log"),
    )
    base.update(kw)
    return VmSpec(**base)  # type: ignore[arg-type]


def test_argv_shared_memory_and_devices() -> None:
    argv = build_argv(["qemu"], spec(memory_backend="memfd-shared",
                                     devices=(("-device", "vfio-user-pci,socket=/s"),)))
    assert "memory-backend-memfd,id=pc.ram,size=512M,share=on" in argv
    assert argv[argv.index("-machine") + 1] == "virt,highmem=on,memory-backend=pc.ram"
    assert argv.index("vfio-user-pci,socket=/s") > argv.index("-netdev")


def test_argv_x86_and_disks() -> None:
    d = Disk(Path("/d.qcow2"), "qcow2")
    argv = build_argv(["q"], spec(arch="x86_64", accel="kvm", boot_disk=d))
    assert argv[argv.index("-machine") + 1] == "q35"
    assert argv[argv.index("-cpu") + 1] == "host"
    assert "virtio-blk-pci,drive=disk0,bootindex=0" in argv
    assert "file=/d.qcow2,format=qcow2,if=none,id=disk0,discard=unmap,detect-zeroes=unmap" in argv


def test_argv_agent_port_on_a_socket_chardev() -> None:
    argv = build_argv(["q"], spec(agent_socket=Path("/vm,x/agent.sock")))
    # the path's comma stays part of the value; the port carries the name qemu-ga looks for
    assert "socket,id=agent,path=/vm,,x/agent.sock,server=on,wait=off" in argv
    assert argv[argv.index("virtio-serial-pci") - 1] == "-device"
    assert "virtserialport,chardev=agent,name=org.qemu.guest_agent.0" in argv
    assert "virtio-serial-pci" not in build_argv(["q"], spec())


def test_argv_port_forward_binds_loopback() -> None:
    argv = build_argv(["q"], spec(ssh_port=2222))
    assert "user,id=net0,hostfwd=tcp:127.0.0.1:2222-:22" in argv


@pytest.mark.parametrize(
    ("facts", "state"),
    [
        (dict(exit_record=None, qemu_alive=True, supervisor_alive=True,
              pid_recorded=True, qmp_up=True), "running"),
        (dict(exit_record=None, qemu_alive=True, supervisor_alive=True,
              pid_recorded=True, qmp_up=False), "starting"),
        (dict(exit_record=None, qemu_alive=False, supervisor_alive=True,
              pid_recorded=True, qmp_up=False), "starting"),
        (dict(exit_record={"returncode": 0}, qemu_alive=False, supervisor_alive=False,
              pid_recorded=True, qmp_up=False), "stopped"),
        (dict(exit_record={"returncode": -9}, qemu_alive=False, supervisor_alive=False,
              pid_recorded=True, qmp_up=False), "crashed"),
        (dict(exit_record={"returncode": -9, "stop_requested": True}, qemu_alive=False,
              supervisor_alive=False, pid_recorded=True, qmp_up=False), "stopped"),
        (dict(exit_record={"returncode": 0, "server_failure": "x died"}, qemu_alive=False,
              supervisor_alive=False, pid_recorded=True, qmp_up=False), "crashed"),
        (dict(exit_record=None, qemu_alive=False, supervisor_alive=False,
              pid_recorded=True, qmp_up=False), "crashed"),
        (dict(exit_record=None, qemu_alive=False, supervisor_alive=False,
              pid_recorded=False, qmp_up=False), "stopped"),
    ],
)
def test_derive_state(facts: dict[str, object], state: str) -> None:
    assert derive_state(**facts) == state  # type: ignore[arg-type]


def test_host_mirror_from_both_source_formats() -> None:
    deb822 = "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm\n"
    oneline = "# comment\ndeb [arch=amd64] http://other.example/debian bookworm main\n"
    assert host_mirror([deb822]) == "http://mirror.example/debian"
    assert host_mirror([oneline]) == "http://other.example/debian"
    assert host_mirror(["deb http://x.example/ubuntu jammy main"]) is None


def test_print_uris_and_index_hashes() -> None:
    out = (
        "'http://m/debian/pool/main/q/qemu/qemu-utils_11.1.3%2bds-1_amd64.deb' "
        "qemu-utils_1%3a11.1.3+ds-1_amd64.deb 1995168 \n"
        "'http://m/debian/pool/main/z/zlib/zlib1g_1.3_amd64.deb' zlib1g_1.3_amd64.deb 10 "
        "MD5Sum:00\n"
    )
    uris = parse_print_uris(out)
    assert uris == [
        ("http://m/debian/pool/main/q/qemu/qemu-utils_11.1.3%2bds-1_amd64.deb",
         "qemu-utils_11.1.3+ds-1_amd64.deb", 1995168),
        ("http://m/debian/pool/main/z/zlib/zlib1g_1.3_amd64.deb", "zlib1g_1.3_amd64.deb", 10),
    ]
    records = (
        "Package: qemu-utils\nFilename: pool/main/q/qemu/qemu-utils_11.1.3+ds-1_amd64.deb\n"
        f"SHA256: {'AB12' * 16}\nDescription: x\n more\n\nPackage: other\nFilename: pool/o.deb\n"
        "\nPackage: short\nFilename: pool/s.deb\nSHA256: ab12\n"
    )
    # A hash that is not 64 hex digits is dropped (the file is then refused as unhashed).
    assert parse_sha256s(records) == {"qemu-utils_11.1.3+ds-1_amd64.deb": "ab12" * 16}
    with pytest.raises(EngineError):
        parse_print_uris("'broken line\n")
    # The local file name comes from the URI: never a path, never a trailing newline.
    for name in ("..%2F..%2Fetc%2Fx.deb", "x.deb%0A", "x%2Fy.deb", "x.tar"):
        with pytest.raises(EngineError, match="unexpected package file name"):
            parse_print_uris(f"'http://m/debian/pool/{name}' x.deb 10\n")


def test_origins_and_suites_of_package_versions() -> None:
    """What tells a build which source packages only forky carries (glibc for llama.cpp)."""
    madison = (
        "     libc6 |     2.43-7 | http://deb.debian.org/debian forky/main amd64 Packages\n"
        "     libc6 | 2.41-12+deb13u1 | http://deb.debian.org/debian trixie/main amd64 Packages\n"
        "  libgmp10 | 2:6.3.0+dfsg-3 | http://deb.debian.org/debian trixie/main amd64 Packages\n"
        "  libgmp10 | 2:6.3.0+dfsg-3 | http://deb.debian.org/debian forky/main amd64 Packages\n"
        "not a madison line\n | 1 | x y\n"
    )
    assert parse_madison(madison) == {
        ("libc6", "2.43-7"): {"forky"}, ("libc6", "2.41-12+deb13u1"): {"trixie"},
        ("libgmp10", "2:6.3.0+dfsg-3"): {"trixie", "forky"},
    }
    records = (
        "Package: libc6\nSource: glibc\nVersion: 2.43-7\n"
        "Filename: pool/main/g/glibc/libc6_2.43-7_amd64.deb\n\n"
        "Package: libgmp10\nSource: gmp (2:6.3.0+dfsg-3)\nVersion: 2:6.3.0+dfsg-3\n"
        "Filename: pool/main/g/gmp/libgmp10_6.3.0+dfsg-3_amd64.deb\n\n"
        "Package: wget\nVersion: 1.25.0-2\nFilename: pool/main/w/wget/wget_1.25.0-2_amd64.deb\n"
        "\nPackage: nofile\nVersion: 1\n"
    )
    assert parse_origins(records) == {
        "libc6_2.43-7_amd64.deb": ("libc6", "2.43-7", "glibc"),
        "libgmp10_6.3.0+dfsg-3_amd64.deb": ("libgmp10", "2:6.3.0+dfsg-3", "gmp"),
        "wget_1.25.0-2_amd64.deb": ("wget", "1.25.0-2", "wget"),  # no Source: its own name
    }


def test_qemu_probe_parsers() -> None:
    assert parse_version("QEMU emulator version 11.1.3 (Debian 1:11.1.3+ds-1~bpo13+1)") == (
        11, 1, 3)
    assert parse_version("QEMU emulator version 10.1") == (10, 1, 0)
    assert parse_version("nothing") is None
    assert parse_help_names("Accelerators supported in QEMU binary:\ntcg\nkvm\n") == {
        "tcg", "kvm"}
    devices = 'name "vfio-user-pci", bus PCI, desc "x"\nname "virtio-net-pci", bus PCI\n'
    assert parse_help_names(devices, prefix="name ") == {"vfio-user-pci", "virtio-net-pci"}


def _info(accels: tuple[str, ...]) -> EngineInfo:
    return EngineInfo(Engine("path", Path("/usr/bin")), (11, 1, 0), ("x86_64",),
                      {"x86_64": accels}, {})


def test_choose_accel() -> None:
    assert choose_accel(_info(("kvm", "tcg")), "x86_64", None) == ("kvm", None)
    accel, notice = choose_accel(_info(("kvm", "tcg")), "x86_64", None, nested=True)
    assert accel == "tcg" and notice and "--accel kvm" in notice
    assert choose_accel(_info(("kvm", "tcg")), "x86_64", "kvm", nested=True) == ("kvm", None)
    assert choose_accel(_info(("tcg",)), "x86_64", None, nested=True) == ("tcg", None)
    with pytest.raises(UsageError, match="not available"):
        choose_accel(_info(("tcg",)), "x86_64", "hvf")


def test_host_is_virtual(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu vme hypervisor lahf_lm\n")
    assert host_is_virtual(cpuinfo)
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu vme lahf_lm\n")
    assert not host_is_virtual(cpuinfo)
    assert not host_is_virtual(tmp_path / "missing")
