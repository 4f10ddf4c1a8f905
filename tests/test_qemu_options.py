"""Values in QEMU option strings: escaped as QemuOpts reads them, or refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from egpu.devices.serve_spec import ServeSpec
from egpu.engine.argv import Disk, Firmware, VmSpec, build_argv
from egpu.engine.qemu_options import escape, json_option, option_string
from egpu.engine.virtual import DeviceServer, device_arg
from egpu.errors import UsageError


def parse_qemu_opts(text: str) -> list[tuple[str, str]]:
    """Split an option string by QemuOpts' rule (util/qemu-option.c): a name runs to '=' or
    ',', a value to the first single ',', and ',,' inside a value is one ','."""
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(text):
        end = i
        while end < len(text) and text[end] not in "=,":
            end += 1
        name = text[i:end]
        if end == len(text) or text[end] == ",":
            pairs.append((name, ""))  # a bare name (the driver, or a flag)
            i = end + 1
            continue
        value: list[str] = []
        i = end + 1
        while i < len(text):
            if text[i] == ",":
                if text[i + 1:i + 2] == ",":
                    value.append(",")
                    i += 2
                    continue
                i += 1
                break
            value.append(text[i])
            i += 1
        pairs.append((name, "".join(value)))
    return pairs


def spec(**kw: object) -> VmSpec:
    base: dict[str, object] = dict(
        name="vm", arch="aarch64", cpus=1, memory_mib=256, accel="tcg",
        qmp_socket=Path("/h/qmp.sock"), console_socket=Path("/h/console.sock"),
        serial_log=Path("/h/serial.log"),
    )
    base.update(kw)
    return VmSpec(**base)  # type: ignore[arg-type]


def after(argv: list[str], flag: str, start: str = "") -> list[str]:
    """Every argument that follows ``flag`` (and starts with ``start``)."""
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag
            and argv[i + 1].startswith(start)]


def test_a_disk_named_like_options_is_one_file_name() -> None:
    disk = Disk(Path("/d/x.img,readonly=off"), "raw")
    argv = build_argv(["q"], spec(disks=(disk,)))
    drive = after(argv, "-drive", "file=")
    assert drive == ["file=/d/x.img,,readonly=off,format=raw,if=none,id=disk0,discard=unmap,"
                     "detect-zeroes=unmap"]
    assert dict(parse_qemu_opts(drive[0]))["file"] == "/d/x.img,readonly=off"
    assert ("readonly", "off") not in parse_qemu_opts(drive[0])


def test_every_home_path_in_the_command_is_escaped() -> None:
    home = Path("/h,o=me")
    argv = build_argv(["q"], spec(
        qmp_socket=home / "qmp.sock", console_socket=home / "console.sock",
        serial_log=home / "serial.log", firmware=Firmware(home / "code.fd", home / "vars.fd"),
        boot_disk=Disk(home / "overlay.qcow2", "qcow2"),
    ))
    assert after(argv, "-chardev") == [
        "socket,id=console,path=/h,,o=me/console.sock,server=on,wait=off,"
        "logfile=/h,,o=me/serial.log,logappend=on",
        "socket,id=qmp,path=/h,,o=me/qmp.sock,server=on,wait=off",
    ]
    # the monitor names its chardev: no path in "-qmp unix:...", where '=' would split it
    assert after(argv, "-qmp") == ["chardev:qmp"]
    assert after(argv, "-drive") == [
        "if=pflash,format=raw,unit=0,readonly=on,file=/h,,o=me/code.fd",
        "if=pflash,format=raw,unit=1,file=/h,,o=me/vars.fd",
        "file=/h,,o=me/overlay.qcow2,format=qcow2,if=none,id=disk0,discard=unmap,"
        "detect-zeroes=unmap",
    ]
    assert after(argv, "-name") == ["guest=vm,process=egpu-vm"]


# any text but NUL (no argv or file name can hold it) and lone surrogates
TEXT = st.text(st.characters(exclude_characters="\x00", exclude_categories=["Cs"]))
PATHS = st.text(st.characters(exclude_characters="\x00", exclude_categories=["Cs"]),
                max_size=40).map(lambda t: "/" + t)


@given(PATHS, PATHS)
def test_paths_read_back_unchanged(disk: str, home: str) -> None:
    argv = build_argv(["q"], spec(disks=(Disk(Path(disk), "raw", readonly=True),),
                                  console_socket=Path(home), serial_log=Path(home)))
    [drive] = after(argv, "-drive", "file=")
    assert parse_qemu_opts(drive) == [("file", str(Path(disk))), ("format", "raw"),
                                      ("if", "none"), ("id", "disk0"), ("readonly", "on")]
    console = dict(parse_qemu_opts(after(argv, "-chardev")[0]))
    assert console["path"] == console["logfile"] == str(Path(home))


@given(TEXT)
def test_escape_round_trips(value: str) -> None:
    assert parse_qemu_opts(f"k={escape(value)},next=1") == [("k", value), ("next", "1")]


def test_values_no_escaping_can_carry_are_refused() -> None:
    with pytest.raises(UsageError, match="NUL"):
        option_string("socket", {"path": "/a\x00b"})
    # a relative file name could be read as a block protocol ("nbd:...", "json:{...}")
    with pytest.raises(UsageError, match="absolute"):
        build_argv(["q"], spec(disks=(Disk(Path("nbd:host:10809"), "raw"),)))
    with pytest.raises(UsageError, match="not a QEMU option"):
        option_string("socket", {"path=x,id": "y"})


def test_vfio_user_device_json_keeps_the_socket_path_whole(tmp_path: Path) -> None:
    sock = Path("/h,id=evil/display.sock")
    flag, arg = device_arg(DeviceServer("display", 0, ServeSpec("display", sock),
                                          tmp_path / "spec", tmp_path / "log"), 0x10)
    assert flag == "-device"
    doc = json.loads(arg)
    assert doc["socket"] == {"type": "unix", "path": str(sock)} and doc["id"] == "egpu-display"


def test_json_refuses_names_that_are_not_utf8() -> None:
    undecodable = b"/h/\xff.sock".decode("utf-8", "surrogateescape")
    with pytest.raises(UsageError, match="UTF-8"):
        json_option({"socket": {"path": undecodable}})
    with pytest.raises(UsageError, match="NUL"):
        json_option({"id": "a\x00"})
