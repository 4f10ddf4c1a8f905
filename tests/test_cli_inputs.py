"""Command-line values checked before anything starts: exit 2, one line, nothing created."""

from __future__ import annotations

import os
import signal
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from conftest import Cli, InProcessCli
from egpu.devices.display import SCREENSHOT_SIGNAL, create, request_screenshot, serve_screenshots
from egpu.engine.argv import check_cpus
from egpu.engine.qemu import find_engine_info, parse_max_cpus
from egpu.errors import DeviceServerError, UsageError
from egpu.process import ProcessRef
from egpu.vm.lifecycle import ssh_argv
from test_cli_errors import assert_clean_failure

# what QEMU 11.1 answers to query-machines, cut to the fields read and a neighbour
QMP_REPLIES = "\n".join([
    '{"QMP": {"version": {}, "capabilities": []}}',
    '{"return": {}}',
    '{"return": [{"name": "virt-11.0", "cpu-max": 512},'
    ' {"name": "virt-11.1", "alias": "virt", "cpu-max": 512},'
    ' {"name": "pc-q35-11.1", "alias": "q35", "cpu-max": 4096}]}',
    '{"return": {}}',
])

@pytest.fixture
def cli(inproc: InProcessCli) -> Cli:
    """What these commands decide and print is tested in-process (quick; see InProcessCli)."""
    return inproc



def test_cpu_count_floor_and_ceilings() -> None:
    assert check_cpus(8, "aarch64", "tcg", machine_max=512, host_cpus=2) == 8  # tcg emulates
    with pytest.raises(UsageError, match="at least 1"):
        check_cpus(0, "aarch64", "tcg", machine_max=512, host_cpus=None)
    with pytest.raises(UsageError, match=r"virt machine takes \(512\)"):
        check_cpus(513, "aarch64", "tcg", machine_max=512, host_cpus=None)
    with pytest.raises(UsageError, match=r"host's 4 CPUs \(accelerator kvm"):
        check_cpus(5, "x86_64", "kvm", machine_max=4096, host_cpus=4)
    with pytest.raises(UsageError, match="host's 4 CPUs"):
        check_cpus(5, "aarch64", "hvf", machine_max=512, host_cpus=4)
    # a dry run for another host: its cores are not these
    assert check_cpus(8, "aarch64", "hvf", machine_max=512, host_cpus=None) == 8


def test_machine_cpu_limit_from_qmp_replies() -> None:
    assert parse_max_cpus(QMP_REPLIES, "virt") == 512
    assert parse_max_cpus(QMP_REPLIES, "q35") == 4096
    assert parse_max_cpus(QMP_REPLIES, "pc-q35-11.1") == 4096
    assert parse_max_cpus(QMP_REPLIES, "microvm") is None
    assert parse_max_cpus('{"return": [{"alias": "virt", "cpu-max": true}]}', "virt") is None
    assert parse_max_cpus("not json\n", "virt") is None


def test_the_engine_reports_its_machine_limits() -> None:
    info = find_engine_info()
    # QEMU's own figures for the machine types egpu uses (virt: GICv3's 512)
    assert info.max_cpus["aarch64"] >= 512
    assert info.max_cpus["x86_64"] >= 288


def test_run_refuses_more_cpus_than_the_machine_takes(cli: Cli) -> None:
    limit = find_engine_info().cpu_limit("aarch64")
    proc = cli("run", "--accel", "tcg", "--cpus", str(limit + 1))
    assert_clean_failure(cli, proc, 2, f"virt machine takes ({limit})")


def test_run_refuses_more_cpus_than_host_cores_under_kvm(cli: Cli) -> None:
    info = find_engine_info()
    if "kvm" not in info.accelerators.get("x86_64", ()):
        pytest.skip("no /dev/kvm here")
    cores = os.cpu_count() or 1
    proc = cli("run", "--arch", "x86_64", "--accel", "kvm", "--cpus", str(cores + 1))
    assert_clean_failure(cli, proc, 2, f"host's {cores} CPUs")


@pytest.mark.parametrize("args", [
    ("--user", "-oProxyCommand=touch /tmp/egpu-pwned"), ("--user=-oProxyCommand=x",),
    ("-l-F/dev/null",), ("--user", "ubuntu@evil"), ("--user", "a\n"), ("--user", ""),
])
def test_ssh_user_is_only_a_user_name(cli: Cli, args: tuple[str, ...]) -> None:
    # checked before the VM is looked up: no such VM, still a usage error
    assert_clean_failure(cli, cli("ssh", "novm", *args), 2, "bad --user")


def test_ssh_user_from_the_environment_is_checked_too(cli: Cli) -> None:
    proc = Cli(env={**cli.env, "EGPU_SSH_USER": "-oProxyCommand=x"}, home=cli.home)("ssh", "vm")
    assert_clean_failure(cli, proc, 2, "bad --user")


def test_ssh_argv_takes_plain_user_names() -> None:
    assert ssh_argv(2222, "ubuntu.dev_1")[-1] == "ubuntu.dev_1@127.0.0.1"
    with pytest.raises(UsageError, match="bad --user"):
        ssh_argv(2222, "-oProxyCommand=x")


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "-1"])
def test_stop_timeout_is_finite_and_positive(cli: Cli, value: str) -> None:
    assert_clean_failure(cli, cli("stop", "novm", "--timeout", value), 2,
                         "must be a finite, positive number of seconds")


def special_files(tmp_path: Path) -> Iterator[Path]:
    """A FIFO, a listening UNIX socket's node, a /dev/null twin (root only), a link to one."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    yield fifo
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock"))
    yield tmp_path / "sock"
    sock.close()
    if os.geteuid() == 0:
        null = tmp_path / "null"
        os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        yield null
    link = tmp_path / "link.png"
    link.symlink_to(fifo)
    yield link


def test_screenshot_refuses_a_target_that_is_not_a_regular_file(cli: Cli,
                                                               tmp_path: Path) -> None:
    for target in special_files(tmp_path):
        kind = stat.S_IFMT(os.stat(target).st_mode)
        proc = cli("screenshot", "novm", "-o", str(target))
        assert_clean_failure(cli, proc, 2, "is not a regular file")
        assert stat.S_IFMT(os.stat(target).st_mode) == kind  # untouched


def test_display_server_writes_only_regular_files(tmp_path: Path) -> None:
    display = create(vram=1 << 20)
    try:
        for target in special_files(tmp_path):
            kind = stat.S_IFMT(os.stat(target).st_mode)
            with pytest.raises(DeviceServerError, match="not a regular file"):
                display.write_screenshot(target)
            assert stat.S_IFMT(os.stat(target).st_mode) == kind
        regular = tmp_path / "shot.png"
        regular.write_bytes(b"old")
        display.write_screenshot(regular)
        with Image.open(regular) as image:
            assert image.format == "PNG"
        # the temp file was a fresh name beside the target, and is gone
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []
    finally:
        display.framebuffer.close()


def test_screenshot_request_carries_any_file_name(tmp_path: Path) -> None:
    display = create(vram=1 << 20)
    request = tmp_path / "screenshot.request"
    previous = signal.getsignal(SCREENSHOT_SIGNAL)
    try:
        serve_screenshots(display, request)
        # a separator str.splitlines() honours, a trailing space, a byte that is not UTF-8
        odd = tmp_path / os.fsdecode(b"shot\x1cnext \xff.png ")
        request_screenshot(ProcessRef.current(), request, odd, timeout=5)
        with Image.open(odd) as image:
            assert image.format == "PNG"
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("shot")) == [odd.name]
        with pytest.raises(UsageError, match="line break"):
            request_screenshot(ProcessRef.current(), request, tmp_path / "a\nlast-visible",
                               timeout=5)
    finally:
        signal.signal(SCREENSHOT_SIGNAL, previous)
        display.framebuffer.close()
