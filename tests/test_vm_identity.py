"""egpu signals, waits on or reports as running only processes proven to be the ones it started."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from egpu.devices.serve_spec import ServeSpec
from egpu.process import ProcessRef, signal_process
from egpu.vm import store

DRIVER = Path(__file__).with_name("pid_reuse_driver.py")
DRIVER_TIMEOUT_S = 280
SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


def _sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen(SLEEPER)


def test_process_ref_refuses_what_it_cannot_prove() -> None:
    proc = _sleeper()
    try:
        ref = ProcessRef.of_popen(proc)
        assert ref is not None and ref.alive() and ref.program == sys.executable
        for impostor in (replace(ref, started=ref.started + 1), replace(ref, program="sleep"),
                         replace(ref, pid=-1), replace(ref, pid=0), replace(ref, pid=1)):
            assert not impostor.alive()
            assert not signal_process(impostor, signal.SIGKILL)
        assert proc.poll() is None
        assert not signal_process(None, signal.SIGKILL)
        assert signal_process(ref, signal.SIGKILL)
        proc.wait()
        assert not ref.alive()
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("text", ["", "123", "123 1.5", "-1 1.5 python", "1 1.5 python",
                                  "x 1.5 python", "123 nan-ish python", "0 1.5 python"])
def test_pid_files_without_full_identity_name_nothing(tmp_path: Path, text: str) -> None:
    vm = store.VmDir("vm", root=tmp_path)
    vm.create()
    vm.file(store.QEMU_PID).write_text(text)
    assert vm.read_process(store.QEMU_PID) is None


def test_pid_file_round_trip_keeps_a_program_with_spaces(tmp_path: Path) -> None:
    vm = store.VmDir("vm", root=tmp_path)
    vm.create()
    ref = ProcessRef(1234, 1700000000.123456, "/opt/my qemu/ld-linux-aarch64.so.1")
    vm.write_process(store.QEMU_PID, ref)
    assert vm.read_process(store.QEMU_PID) == ref


def test_server_record_validates_types() -> None:
    spec = ServeSpec("display", Path("/s"), screenshot_request=Path("/r"))
    good = store.ServerRecord(name="display", function=0, spec=spec, log="/l",
                              process=ProcessRef(99, 1.5, "python"))
    assert store.ServerRecord.from_json(good.to_json()) == good
    bads: list[object] = [{**good.to_json(), "function": "0"},
                          {**good.to_json(), "spec": {**spec.to_json(), "options": ["a=b"]}},
                          {**good.to_json(), "returncode": True}, [], "x"]
    for bad in bads:
        with pytest.raises(ValueError):
            store.ServerRecord.from_json(bad)
    # a record without full identity parses, but names no process
    assert store.ServerRecord.from_json({**good.to_json(), "program": None}).process is None


def _can_reuse_pids() -> str | None:
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                           capture_output=True, text=True)
    return None if probe.returncode == 0 else f"no PID namespaces here: {probe.stderr.strip()}"


@pytest.mark.parametrize("mode", ["fake", pytest.param("real", marks=pytest.mark.qemu)])
def test_no_command_signals_or_reports_a_reused_pid(egpu_home: Path, mode: str) -> None:
    why = _can_reuse_pids()
    if why:
        pytest.skip(why)
    # a PID namespace of its own: ns_last_pid there puts a foreign process on an exact pid
    proc = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, str(DRIVER),
         str(egpu_home), mode],
        capture_output=True, text=True, timeout=DRIVER_TIMEOUT_S,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


RACE_ROUNDS = 2000
SPAWN_ROUNDS = 20


def test_a_pid_file_being_rewritten_always_reads_whole(tmp_path: Path) -> None:
    # the restart that failed with "unknown error": a reader saw a pid file mid-rewrite (empty),
    # took the supervisor for gone and the VM for stopped
    vm = store.VmDir("vm", root=tmp_path)
    vm.create()
    me = ProcessRef.current()
    vm.write_process(store.SUPERVISOR_PID, me)
    done = threading.Event()

    def rewrite() -> None:
        for _ in range(RACE_ROUNDS):
            vm.write_process(store.SUPERVISOR_PID, me)
        done.set()

    writer = threading.Thread(target=rewrite)
    writer.start()
    misses = 0
    while not done.is_set():
        misses += vm.read_process(store.SUPERVISOR_PID) != me
    writer.join()
    assert misses == 0
    assert [p.name for p in vm.path.iterdir()] == [store.SUPERVISOR_PID]  # no temp files left


def test_a_process_is_verifiable_as_soon_as_it_is_recorded() -> None:
    # Popen can return before the kernel finished the exec (cmdline still empty)
    for _ in range(SPAWN_ROUNDS):
        proc = subprocess.Popen(["sleep", "30"], start_new_session=True, close_fds=True)
        try:
            ref = ProcessRef.of_popen(proc)
            assert ref is not None and ref.alive(), ref
        finally:
            proc.kill()
            proc.wait()


def test_config_round_trip_keeps_every_field(tmp_path: Path) -> None:
    config = store.VmConfig(
        name="vm", arch="x86_64", cpus=2, memory_mib=512, accel="tcg",
        gpu_path="user", qemu="test QEMU",
        qemu_version="11", argv=["qemu"], env={"A": "b"}, ssh_port=2222, selftest=True,
        image="ref", bind_functions=["0000:01:00.0"], host_guard={"power_assertion": []},
        gpu_bound_at_start=["pcic1/01:00.0"],
        servers=[store.ServerLaunch(
            name="nvme", function=1, log="/l", spec_file="/f",
            spec=ServeSpec.parse("nvme", Path("/s"), {"size": "1G", "backing": "/b"}))],
    )
    vm = store.VmDir("vm", root=tmp_path)
    vm.create()
    vm.write_config(config)
    assert vm.read_config() == config


def test_config_of_an_older_version_reads_its_engine_field(tmp_path: Path) -> None:
    """Older versions wrote the GPU path and the QEMU into one "engine" field."""
    old = {"name": "vm", "arch": "aarch64", "cpus": 1, "memory_mib": 256, "accel": "tcg",
           "engine": "user (private QEMU 11.1.3)", "qemu_version": "11.1.3", "argv": ["qemu"]}
    config = store.VmConfig.from_json(old)
    assert (config.gpu_path, config.qemu) == ("user", "private QEMU 11.1.3")
    data = config.to_json()
    assert "engine" not in data and data["gpu_path"] == "user"
    assert store.VmConfig.from_json(data) == config


def test_status_names_the_gpu_path_and_the_qemu_apart(tmp_path: Path) -> None:
    """``status --json`` and the status/list table keep the GPU path and the QEMU separate."""
    from egpu.cli.vm_commands import STATUS_COLUMNS, _status_row
    from egpu.vm.status import inspect

    vm = store.VmDir("vm", root=tmp_path)
    vm.create()
    vm.write_config(store.VmConfig(
        name="vm", arch="aarch64", cpus=1, memory_mib=256, accel="tcg", gpu_path="vfio",
        qemu="system QEMU 10.2.0", qemu_version="10.2.0", argv=["qemu"],
    ))
    status = inspect(vm)
    doc = status.to_json()
    assert "engine" not in doc
    assert (doc["gpu_path"], doc["qemu"]) == ("vfio", "system QEMU 10.2.0")
    row = dict(zip(STATUS_COLUMNS, _status_row(status), strict=True))
    assert (row["GPU"], row["QEMU"]) == ("vfio", "system QEMU 10.2.0")
    assert "ENGINE" not in STATUS_COLUMNS
