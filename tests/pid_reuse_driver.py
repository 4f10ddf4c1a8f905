"""Runs as pid 1 of a fresh PID namespace: lets a VM's processes die, puts foreign processes on
exactly their pids (through ns_last_pid) and checks that no egpu command signals them or calls
them running. Prints one line per failed check; exits 1 if there was any.

Usage: python pid_reuse_driver.py EGPU_HOME [fake|real]
fake: VM directories written by hand (no QEMU); real: a booted VM with the virtual eGPU.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from egpu.devices import DEVICE_MODULES
from egpu.devices.serve_spec import ServeSpec
from egpu.process import ProcessRef
from egpu.vm import store

NS_LAST_PID = Path("/proc/sys/kernel/ns_last_pid")
SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]  # the same program as egpu's
FOREIGN = ["sleep", "600"]  # another program altogether
PLACE_ATTEMPTS = 20
CLI_TIMEOUT_S = 120
REAL_PROCESSES = 4  # supervisor, QEMU, display server, nvme server
failures: list[str] = []


def check(ok: bool, what: str) -> None:
    if not ok:
        failures.append(what)


def egpu(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EGPU_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "egpu", *args], env=env, capture_output=True,
                          text=True, timeout=CLI_TIMEOUT_S)


def status_of(home: Path, name: str) -> dict[str, Any]:
    proc = egpu(home, "status", name, "--json")
    check(proc.returncode == 0, f"status {name}: {proc.stderr.strip()}")
    data = json.loads(proc.stdout) if proc.returncode == 0 else {}
    assert isinstance(data, dict)
    return data


def spawn(argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def place_on(pid: int, argv: list[str]) -> subprocess.Popen[bytes]:
    """Start ``argv`` so that it gets exactly ``pid`` (free by now)."""
    for _ in range(PLACE_ATTEMPTS):
        NS_LAST_PID.write_text(f"{pid - 1}\n")
        proc = spawn(argv)
        if proc.pid == pid:
            return proc
        proc.kill()
        proc.wait()
    try:
        holder = Path(f"/proc/{pid}/status").read_text().splitlines()[:4]
    except OSError:
        holder = ["nothing"]
    raise SystemExit(f"could not place a process on pid {pid} (held by {holder})")


def kill(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait()


def running(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is None


def make_vm(home: Path, name: str) -> store.VmDir:
    vm = store.VmDir(name, root=home / "data" / "vms")
    vm.create()
    vm.write_config(store.VmConfig(
        name=name, arch="aarch64", cpus=1, memory_mib=256, accel="tcg",
        gpu_path="user", qemu="test QEMU",
        qemu_version="test", argv=["qemu-system-aarch64"],
    ))
    return vm


def record(vm: store.VmDir, which: str, proc: subprocess.Popen[bytes]) -> ProcessRef:
    ref = ProcessRef.of_popen(proc)
    assert ref is not None
    vm.write_process(which, ref)
    return ref


def server(vm: store.VmDir, name: str, function: int, ref: ProcessRef | None) -> store.ServerRecord:
    request = vm.servers_dir / "screenshot.request" if name == "display" else None
    model = name if name in DEVICE_MODULES else "sample"  # any servable model will do
    spec = ServeSpec(model, vm.servers_dir / name, screenshot_request=request)
    return store.ServerRecord(name=name, function=function, spec=spec,
                              log=str(vm.servers_dir / f"{name}.log"), process=ref)


def dead_qmp_socket(path: Path) -> None:
    """A socket file nobody answers on: QEMU's monitor busy or wedged, so status says running."""
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))


def reused_pids(home: Path) -> list[subprocess.Popen[bytes]]:
    """A VM whose supervisor and device servers died and whose pids foreign processes took."""
    vm = make_vm(home, "vm1")
    vm.servers_dir.mkdir(mode=0o700)
    qemu = spawn(SLEEPER)
    supervisor, display, nvme = spawn(SLEEPER), spawn(SLEEPER), spawn(SLEEPER)
    qemu_ref = record(vm, store.QEMU_PID, qemu)
    record(vm, store.SUPERVISOR_PID, supervisor)
    refs = [ProcessRef.of_popen(p) for p in (display, nvme)]
    vm.write_servers([server(vm, "display", 0, refs[0]), server(vm, "nvme", 1, refs[1])])
    dead_qmp_socket(vm.qmp_socket)

    # the control: while they are egpu's own, egpu reports them
    before = status_of(home, "vm1")
    check(before.get("state") == "running" and before.get("pid") == qemu.pid,
          f"control: recorded processes not reported running: {before}")
    check(all(s["running"] for s in before.get("servers", [])), f"control: servers {before}")

    impostors = []
    for proc, argv in ((supervisor, FOREIGN), (display, SLEEPER), (nvme, FOREIGN)):
        kill(proc)
        impostors.append(place_on(proc.pid, argv))

    during = status_of(home, "vm1")
    check(not any(s["running"] for s in during.get("servers", [])),
          f"status calls a foreign process a device server: {during['servers']}")
    shot = egpu(home, "screenshot", "vm1", "-o", str(home / "shot.png"))
    check(shot.returncode == 1 and "not running" in shot.stderr,
          f"screenshot of a VM whose display pid was reused: {shot.returncode} {shot.stderr}")
    stop = egpu(home, "stop", "vm1", "--timeout", "0.01")
    check(stop.returncode == 0, f"stop: {stop.stderr}")
    check(not running(qemu), "stop left egpu's own (verified) QEMU running")
    check(all(map(running, impostors)), "stop signalled a foreign process")

    # now QEMU's pid is taken too, and the last run's record is gone: nothing is egpu's
    vm.file(store.EXIT_RECORD).unlink(missing_ok=True)
    impostors.append(place_on(qemu_ref.pid, SLEEPER))
    after = status_of(home, "vm1")
    check(after.get("state") == "crashed" and after.get("pid") is None,
          f"status calls a foreign process QEMU: {after}")
    listed = json.loads(egpu(home, "list", "--json").stdout)
    check([(v["name"], v["state"], v["pid"]) for v in listed] == [("vm1", "crashed", None)],
          f"list: {listed}")
    for args in (("stop", "vm1"), ("stop", "vm1", "--force"), ("screenshot", "vm1", "-o", "x.png")):
        egpu(home, *args)
    check(all(map(running, impostors)), "stop or screenshot signalled a foreign process")
    # a restart first clears what the crashed run left behind; QEMU then rejects an option
    again = egpu(home, "run", "--name", "vm1", "--gpu", "none", "--accel", "tcg",
                 "--detach", "-q", "--", "-no-such-option")
    check(again.returncode == 1 and "no-such-option" in again.stderr,
          f"restart: {again.returncode} {again.stderr}")
    check(all(map(running, impostors)), "the restart of a crashed name signalled a foreign pid")
    removed = egpu(home, "rm", "vm1")
    check(removed.returncode == 0, f"rm: {removed.stderr}")
    check(all(map(running, impostors)), "rm signalled a foreign process")
    return impostors


def records_without_identity(home: Path) -> list[subprocess.Popen[bytes]]:
    """Pid files and server records that name live foreign processes but prove nothing."""
    vm = make_vm(home, "legacy")
    vm.servers_dir.mkdir(mode=0o700)
    foreign = [spawn(FOREIGN), spawn(SLEEPER)]
    ref = ProcessRef.of_popen(foreign[1])
    assert ref is not None
    vm.file(store.QEMU_PID).write_text(f"{foreign[0].pid}\n")  # no start time, no program
    vm.file(store.SUPERVISOR_PID).write_text(f"{ref.pid} {ref.started}\n")  # no program
    vm.file(store.SERVERS_RECORD).write_text(json.dumps([
        {**server(vm, "display", 0, None).to_json(), "pid": -1, "started": 1.0, "program": "x"},
        {**server(vm, "nvme", 1, None).to_json(), "pid": 1, "started": 1.0, "program": "x"},
        {**server(vm, "extra", 2, None).to_json(), "pid": foreign[0].pid},
    ]))
    dead_qmp_socket(vm.qmp_socket)
    status = status_of(home, "legacy")
    check(status.get("pid") is None and status.get("state") not in ("running", "starting"),
          f"a pid file without identity adopted a live process: {status}")
    check(not any(s["running"] for s in status.get("servers", [])), f"servers: {status}")
    for args in (("stop", "legacy", "--force"), ("screenshot", "legacy", "-o", "x.png"),
                 ("rm", "legacy", "--force")):
        egpu(home, *args)
    check(all(map(running, foreign)), "a record without identity got a process signalled")
    return foreign


def end_all(pids: list[int]) -> None:
    """Kill a run's processes, supervisor first, and free their pids.

    The supervisor is stopped before its children die, so it records nothing; once it is gone
    its children are this namespace init's to reap. Its pid is also their session's and process
    group's id, so it is free only once they are all gone.
    """
    supervisor, *children = pids
    os.kill(supervisor, signal.SIGSTOP)
    for pid in children:
        os.kill(pid, signal.SIGKILL)
    os.kill(supervisor, signal.SIGKILL)
    for pid in pids:  # the supervisor first: its exit hands its children to us
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def real_vm(home: Path) -> list[subprocess.Popen[bytes]]:
    """A real run (QEMU through its loader, device servers, supervisor) whose pids get reused."""
    started = egpu(home, "run", "--name", "real", "--detach", "-q", "--accel", "tcg",
                   "--passthrough", "virtual", "--nvme-size", "16M")
    check(started.returncode == 0, f"run: {started.stderr}")
    before = status_of(home, "real")
    check(before.get("state") == "running" and all(s["running"] for s in before["servers"]),
          f"control: the real VM is not reported running: {before}")
    vm = store.VmDir("real", root=home / "data" / "vms")
    refs = [vm.read_process(store.SUPERVISOR_PID), vm.read_process(store.QEMU_PID),
            *(s.process for s in vm.read_servers())]
    check(None not in refs and len(refs) == REAL_PROCESSES, f"records: {refs}")
    impostors = []
    pids = [r.pid for r in refs if r is not None]
    end_all(pids)
    for i, pid in enumerate(pids):
        impostors.append(place_on(pid, SLEEPER if i % 2 else FOREIGN))
    after = status_of(home, "real")
    check(after.get("state") == "crashed" and after.get("pid") is None
          and not any(s["running"] for s in after.get("servers", [])),
          f"status calls foreign processes the VM's: {after}")
    listed = json.loads(egpu(home, "list", "--json").stdout)
    check([(v["state"], v["pid"]) for v in listed] == [("crashed", None)], f"list: {listed}")
    for args in (("screenshot", "real", "-o", str(home / "x.png")), ("stop", "real"),
                 ("stop", "real", "--force")):
        egpu(home, *args)
    again = egpu(home, "run", "--name", "real", "--detach", "-q", "--accel", "tcg",
                 "--gpu", "none", "--", "-no-such-option")
    check(again.returncode == 1 and "no-such-option" in again.stderr, f"restart: {again.stderr}")
    removed = egpu(home, "rm", "real")
    check(removed.returncode == 0, f"rm: {removed.stderr}")
    check(all(map(running, impostors)), "a command signalled a process that took a VM's pid")
    return impostors


def main() -> int:
    home = Path(sys.argv[1])
    mode = sys.argv[2] if len(sys.argv) > 2 else "fake"
    if mode == "real":
        spawned = real_vm(home)
    else:
        spawned = reused_pids(home) + records_without_identity(home)
    for proc in spawned:
        kill(proc)
    for failure in failures:
        print(failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
