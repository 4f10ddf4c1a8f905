"""One name, one VM: concurrent runs, failed starts, crashed guests, broken directories, rm."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from conftest import Cli, InProcessCli
from egpu.process import ProcessRef, wait_gone
from egpu.vm import qmp, store
from egpu.vm.status import derive_state

NO_GPU = ("--gpu", "none", "--accel", "tcg")
# x86's ISA pvpanic device, paused on a panic: QEMU's run state becomes guest-panicked
PVPANIC = ("--", "-device", "pvpanic", "-action", "panic=pause")
PVPANIC_PORT_WRITE = "o /b 0x505 1"  # HMP: write the "panicked" event to the device's port
NVME_SIZE = 64 << 20
# QEMU creates its monitor and console sockets before it looks at devices
BAD_DEVICE = ("--", "-device", "no-such-device")
SELFTEST_TIMEOUT_S = 400
SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


def vms(cli: Cli) -> Path:
    return cli.home / "data" / "vms"


def fake_vm(cli: Cli, name: str) -> store.VmDir:
    """A VM directory as a stopped VM leaves it (no QEMU needed to inspect or remove one)."""
    vm = store.VmDir(name, root=vms(cli))
    vm.create()
    vm.write_config(store.VmConfig(
        name=name, arch="aarch64", cpus=1, memory_mib=256, accel="tcg",
        gpu_path="none", qemu="test QEMU",
        qemu_version="test", argv=["qemu-system-aarch64"]))
    store.write_json(vm.file(store.EXIT_RECORD), {"returncode": 0})
    return vm


def fake_live(vm: store.VmDir) -> subprocess.Popen[bytes]:
    """Make a fake VM read as running: a verified stand-in QEMU and a monitor socket."""
    proc = subprocess.Popen(SLEEPER)
    ref = ProcessRef.of_popen(proc)
    assert ref is not None
    vm.write_process(store.QEMU_PID, ref)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(vm.qmp_socket))
    return proc


def one_line_error(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    err = proc.stderr.strip()
    assert proc.returncode != 0 and len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and all(w in err for w in words), err


def test_derive_state_reads_crashed_run_states() -> None:
    alive = {"exit_record": None, "qemu_alive": True, "supervisor_alive": True,
             "pid_recorded": True, "qmp_up": True}
    assert derive_state(**alive, run_state="running") == "running"  # type: ignore[arg-type]
    for state in qmp.CRASH_RUN_STATES:
        assert derive_state(**alive, run_state=state) == "crashed"  # type: ignore[arg-type]
    # QEMU quit by the supervisor exits 0, but the guest had crashed
    ended = {"returncode": 0, "run_state": "internal-error"}
    assert derive_state(exit_record=ended, qemu_alive=False, supervisor_alive=False,
                        pid_recorded=True, qmp_up=False) == "crashed"


@pytest.mark.parametrize(("registers", "pc"), [
    ("RAX=0000000000000000 RBX=1\nRIP=ffffffff81000000 RFL=00000002", "ffffffff81000000"),
    ("EAX=00000000\nEIP=0000fff0 EFL=00000002", "0000fff0"),
    (" PC=ffff800080000000 X00=0000000000000000", "ffff800080000000"),
    ("no registers here", None),
])
def test_program_counter_of_info_registers(registers: str, pc: str | None) -> None:
    assert qmp.program_counter(registers) == pc


def test_write_json_never_shares_a_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "x.json"
    store.write_json(target, {"a": 1})
    store.write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temp file left behind


def test_run_refused_while_another_command_holds_the_name(cli: Cli) -> None:
    with store.VmDir("held", root=vms(cli)).lock():
        proc = cli("run", "--name", "held", "--detach", *NO_GPU)
        one_line_error(proc, "'held' is already starting")
    assert not (vms(cli) / "held").exists()
    assert [p.name for p in vms(cli).iterdir()] == []  # the lock file went with its holder


def test_broken_vm_dirs_never_break_list_status_or_other_vms(cli: Cli, inproc: InProcessCli
                                                             ) -> None:
    # listings and removals in-process (same home); the refused run as a real process
    fake_vm(cli, "good")
    contents = {"list": "[]", "garbage": "\x00\xffnot json", "truncated": '{"name": "trun',
                "wrongtype": json.dumps({"name": "w", "cpus": "two"})}
    for name, text in contents.items():
        (vms(cli) / name).mkdir(mode=0o700)
        (vms(cli) / name / store.CONFIG).write_text(text, errors="surrogateescape")
    (vms(cli) / "empty").mkdir(mode=0o700)  # missing files
    listed = {v["name"]: v for v in inproc.json("list")}
    assert listed["good"]["state"] == "stopped"
    broken = {*contents, "empty"}
    assert {n for n, v in listed.items() if v["state"] == "broken"} == broken
    assert all(listed[n]["problems"] for n in broken)
    assert "missing config.json" in listed["empty"]["problems"][0]
    table = inproc("list", check=True)
    assert "broken" in table.stdout and "egpu rm garbage" in table.stderr
    assert inproc("status", check=True).stdout.count("broken") == len(broken)
    assert inproc.status("garbage")["state"] == "broken"
    assert inproc.status("good")["state"] == "stopped"
    one_line_error(cli("run", "--name", "garbage", "--detach", *NO_GPU), "broken", "egpu rm")
    assert (vms(cli) / "garbage" / store.CONFIG).exists()
    for name in broken:
        inproc("rm", name, check=True)
    assert [v["name"] for v in inproc.json("list")] == ["good"]


def test_rm_refuses_a_live_vm_unless_forced(cli: Cli, tmp_path: Path) -> None:
    stopped = fake_vm(cli, "old")
    outside = tmp_path / "precious"
    outside.write_text("keep")
    (stopped.path / "link").symlink_to(outside)
    cli("rm", "old", check=True)
    assert not stopped.path.exists() and outside.read_text() == "keep"

    live = fake_vm(cli, "live")
    qemu = fake_live(live)
    try:
        assert cli.status("live")["state"] == "running"
        one_line_error(cli("rm", "live"), "'live' is running", "--force")
        assert live.path.exists() and qemu.poll() is None
        cli("rm", "--force", "live", check=True)
        assert qemu.wait(timeout=30) is not None
        assert not live.path.exists()
    finally:
        qemu.kill()
        qemu.wait()
    one_line_error(cli("rm", "live"), "no VM named 'live'")


def _processes_under(home: Path) -> list[int]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(str(home) in arg for arg in proc.info["cmdline"] or ()):
            found.append(proc.pid)
    return found


@pytest.mark.qemu
def test_two_runs_of_one_name_at_once_exactly_one_starts(cli: Cli) -> None:
    runs = [cli.popen("run", "--name", "race", "--detach", "-q", *NO_GPU,
                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            for _ in range(2)]
    results = [(p.wait(timeout=180), p.communicate()[1].decode()) for p in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    loser = next(err for code, err in results if code == 1).strip()
    assert len(loser.splitlines()) == 1, loser
    assert "'race' is already starting" in loser or "'race' is already running" in loser, loser
    # nothing was deleted under the winner: it boots to the end
    ready = cli.wait_for("race", lambda s: s["guest_ready"], timeout=120)
    assert ready["state"] == "running"
    assert not [p for p in vms(cli).iterdir() if p.name != "race"]  # no stray temp or lock files
    one_line_error(cli("rm", "race"), "'race' is running")
    cli("rm", "--force", "race", check=True)
    assert not (vms(cli) / "race").exists()
    assert _processes_under(cli.home) == []


@pytest.mark.qemu
def test_failed_start_takes_only_what_it_made(cli: Cli) -> None:
    # a VM directory from before: a stopped VM with its NVMe storage and a user's own file
    vm = fake_vm(cli, "keep")
    before = {store.CONFIG: vm.file(store.CONFIG).read_bytes(), store.NVME_BACKING: b"disk" * 64,
              "notes.txt": b"mine"}
    for name, data in before.items():
        vm.file(name).write_bytes(data)
    os.truncate(vm.file(store.NVME_BACKING), NVME_SIZE)  # the size this run asks for
    # QEMU rejects this after creating its sockets, with the virtual eGPU's servers up
    proc = cli("run", "--name", "keep", "--detach", "--accel", "tcg", "--passthrough", "virtual",
               "--nvme-size", f"{NVME_SIZE >> 20}M", *BAD_DEVICE, timeout=180)
    one_line_error(proc, "failed to start", "qemu-system-aarch64:", "no-such-device")
    assert vm.file("notes.txt").read_bytes() == before["notes.txt"]
    backing = vm.file(store.NVME_BACKING).read_bytes()
    assert len(backing) == NVME_SIZE and backing.startswith(before[store.NVME_BACKING])
    assert vm.file(store.CONFIG).exists()
    assert not vm.servers_dir.exists() and not vm.qmp_socket.exists()
    assert _processes_under(cli.home) == []

    fresh = cli("run", "--name", "fresh", "--detach", "-q", *NO_GPU, *BAD_DEVICE)
    one_line_error(fresh, "failed to start", "'no-such-device' is not a valid device model")
    assert sorted(p.name for p in vms(cli).iterdir()) == ["keep"]


def _panic(cli: Cli, name: str) -> None:
    """Make a running x86 guest's pvpanic device report a panic (QEMU pauses in guest-panicked)."""
    sock = vms(cli) / name / store.QMP_SOCKET
    qmp.execute(sock, "human-monitor-command", {"command-line": PVPANIC_PORT_WRITE})


def _assert_crashed_with_pc(status: dict[str, object]) -> None:
    assert status["state"] == "crashed", status
    problems = " ".join(str(p) for p in status["problems"])  # type: ignore[attr-defined]
    assert "guest stopped in guest-panicked (PC=" in problems, status


@pytest.mark.qemu
def test_panicked_guest_reads_as_crashed_and_its_name_restarts(cli: Cli) -> None:
    proc = cli("run", "--name", "pan", "--arch", "x86_64", "--detach", "-q", *NO_GPU, *PVPANIC)
    assert proc.returncode == 0, proc.stderr
    running = cli.status("pan")
    assert running["state"] == "running" and running["run_state"] == "running"
    _panic(cli, "pan")
    crashed = cli.wait_for("pan", lambda s: s["state"] == "crashed" and s["exit"], timeout=60)
    _assert_crashed_with_pc(crashed)
    assert crashed["exit"]["run_state"] == "guest-panicked"
    assert not psutil.pid_exists(int(running["pid"]))  # the supervisor ended the stuck QEMU
    listed = cli.json("list")
    assert [v["state"] for v in listed] == ["crashed"]
    _assert_crashed_with_pc(listed[0])
    again = cli("run", "--name", "pan", "--arch", "x86_64", "--detach", "-q", *NO_GPU)
    assert again.returncode == 0, again.stderr
    assert cli.status("pan")["state"] == "running"
    cli("stop", "pan", "--force", check=True)


@pytest.mark.qemu
@pytest.mark.parametrize("mode", ["--self-test", "attached"])
def test_panicked_guest_ends_self_test_and_attached_run(cli: Cli, mode: str) -> None:
    flags = ("--self-test",) if mode == "--self-test" else ()
    run = cli.popen("run", "--name", "pan", "--arch", "x86_64", *flags, *NO_GPU, *PVPANIC,
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        cli.wait_for("pan", lambda s: s["run_state"] == "running", timeout=120)
        _panic(cli, "pan")
        out, err = (b.decode() for b in run.communicate(timeout=120))  # never hangs on a crash
    finally:
        run.kill()
        run.wait()
    assert run.returncode == 1, (out, err)
    assert "guest stopped in guest-panicked (PC=" in out + err, (out, err)
    _assert_crashed_with_pc(cli.status("pan"))


@pytest.mark.qemu
def test_nested_kvm_internal_error_ends_self_test_as_crashed(cli: Cli) -> None:
    if not Path("/dev/kvm").exists():
        pytest.skip("no /dev/kvm on this host")
    # nested KVM here stops the guest in internal-error during boot; QEMU itself keeps running
    proc = cli("run", "--self-test", "--name", "kvm", "--arch", "x86_64", "--accel", "kvm",
               "--gpu", "none", timeout=SELFTEST_TIMEOUT_S)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "guest stopped in internal-error (PC=" in proc.stdout, proc.stdout + proc.stderr
    status = cli.status("kvm")
    assert status["state"] == "crashed" and status["run_state"] == "internal-error", status
    assert any("internal-error (PC=" in p for p in status["problems"]), status
    assert [(v["name"], v["state"]) for v in cli.json("list")] == [("kvm", "crashed")]


@pytest.mark.qemu
def test_panicked_guest_with_no_supervisor_reads_crashed_and_stop_ends_it(cli: Cli) -> None:
    proc = cli("run", "--name", "orph", "--arch", "x86_64", "--detach", "-q", *NO_GPU, *PVPANIC)
    assert proc.returncode == 0, proc.stderr
    vm = store.VmDir("orph", root=vms(cli))
    supervisor = vm.read_process(store.SUPERVISOR_PID)
    qemu = vm.read_process(store.QEMU_PID)
    assert supervisor is not None and qemu is not None
    os.kill(supervisor.pid, signal.SIGKILL)  # nobody is left to end a stuck QEMU
    assert wait_gone(supervisor, 30, 0.05)
    _panic(cli, "orph")
    crashed = cli.wait_for("orph", lambda s: s["state"] == "crashed", timeout=60)
    _assert_crashed_with_pc(crashed)  # read from QEMU's own monitor: it still runs
    assert qemu.alive() and crashed["run_state"] == "guest-panicked"
    assert cli.json("list")[0]["state"] == "crashed"
    stop = cli("stop", "orph", check=True)
    assert "already crashed" in stop.stderr
    assert wait_gone(qemu, 30, 0.05)  # stop ended what the crashed run left behind


@pytest.mark.qemu
def test_detach_reports_success_only_once_the_guest_runs(cli: Cli) -> None:
    # -S: QEMU's sockets and monitor are up, but its guest never starts running
    proc = cli("run", "--name", "held", "--detach", "-q", *NO_GPU, "--", "-S", timeout=180)
    one_line_error(proc, "'held'", "prelaunch, not running")
    assert not (vms(cli) / "held").exists()
    assert _processes_under(cli.home) == []
