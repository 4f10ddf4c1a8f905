"""egpu signals, waits on or reports as running only processes proven to be the ones it started."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

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
    good = store.ServerRecord(name="display", function=0, socket="/s", log="/l",
                              options=("a=b",), process=ProcessRef(99, 1.5, "python"))
    assert store.ServerRecord.from_json(good.to_json()) == good
    bads: list[object] = [{**good.to_json(), "function": "0"},
                          {**good.to_json(), "options": "a=b"},
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


def test_no_command_signals_or_reports_a_reused_pid(egpu_home: Path) -> None:
    why = _can_reuse_pids()
    if why:
        pytest.skip(why)
    # a PID namespace of its own: ns_last_pid there puts a foreign process on an exact pid
    proc = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, str(DRIVER),
         str(egpu_home)],
        capture_output=True, text=True, timeout=DRIVER_TIMEOUT_S,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
