"""The per-VM supervisor: a detached process that owns one run of a VM.

It starts the VM's device servers, then QEMU, records their pids in the VM directory, watches
them, and writes an exit record when QEMU ends, so ``status`` can tell a clean stop from a crash
after the CLI that started the VM is gone. A device server that dies while QEMU runs is
recorded and the VM is stopped (QEMU is never left talking to a dead device).

Run as ``python -m egpu.vm.supervisor VM_DIR``.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from egpu.devices.display import request_screenshot
from egpu.engine.safety import HostGuard, qos_preexec
from egpu.errors import EgpuError
from egpu.process import ProcessRef
from egpu.vm import qmp, store
from egpu.vm.forwarder import Forwarder, GuestTables, agent_tables
from egpu.vm.lifecycle import restore_bindings
from egpu.vm.status import last_line

POLL_S = 0.1
SERVER_SOCKET_WAIT_S = 30.0  # a cold Python start on a loaded 2-core host
SERVER_STOP_S = 3.0
FORWARDER_STOP_S = 10.0  # a round in progress ends within its QMP timeouts
POWERDOWN_GRACE_S = 10.0
RUN_STATE_POLL_S = 1.0  # how often QEMU's run state is checked for a crashed guest
RUN_STATE_QMP_TIMEOUT_S = 2.0
QUIT_GRACE_S = 5.0
# QEMU catches SIGTERM, SIGINT and SIGHUP, exits 0 and says so on stderr (qemu_kill_report):
# that line is the only trace of which signal ended it.
QEMU_KILL_REPORT = re.compile(r": terminating on signal (\d+)")
KILL_REPORT_TAIL = 4096  # the report is among QEMU's last words


# QEMU creates its sockets (QMP, console, guest agent) with its umask and never chmods them:
# this one makes them 0600 whatever umask the user's shell had (QEMU makes no directories)
QEMU_UMASK = 0o177


def exit_signal(returncode: int | None, qemu_output: str) -> int | None:
    """The signal that ended QEMU: from its exit status, else from QEMU's own report."""
    if returncode is not None and returncode < 0:
        return -returncode
    reports = QEMU_KILL_REPORT.findall(qemu_output)
    return int(reports[-1]) if reports else None


class Supervisor:
    """Owns the processes of one run."""

    def __init__(self, vmdir: store.VmDir) -> None:
        self.vm = vmdir
        self.config = vmdir.read_config()
        self.qemu: subprocess.Popen[bytes] | None = None
        self.servers: list[tuple[store.ServerLaunch, ProcessRef | None,
                                 subprocess.Popen[bytes]]] = []
        self.server_failure: str | None = None
        self.crash: tuple[str, str | None] | None = None  # run state and PC of a stuck guest
        self.terminating = False
        self.warnings: list[str] = []
        self.guard = HostGuard.from_json(self.config.host_guard)
        self.assertion: subprocess.Popen[bytes] | None = None
        self.forwarder: Forwarder

    def _on_term(self, signum: int, frame: FrameType | None) -> None:
        self.terminating = True
        # our own unreaped child: its pid cannot have been reused
        if self.qemu is not None and self.qemu.poll() is None:
            self.qemu.send_signal(signal.SIGTERM)

    def _record_servers(self) -> None:
        self.vm.write_servers(
            store.ServerRecord(name=launch.name, function=launch.function, spec=launch.spec,
                               log=launch.log, process=ref, returncode=proc.poll())
            for launch, ref, proc in self.servers)

    def start_servers(self) -> None:
        env = {**os.environ, **self.config.env}
        for launch in self.config.servers:
            store.write_json(Path(launch.spec_file), launch.spec.to_json())
            with open(launch.log, "ab") as log:
                proc = subprocess.Popen(list(launch.argv), stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, env=env)
            self.servers.append((launch, ProcessRef.of_popen(proc), proc))
        self._record_servers()
        deadline = time.monotonic() + SERVER_SOCKET_WAIT_S
        for launch, _, proc in self.servers:
            while not launch.spec.socket.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    why = last_line(Path(launch.log))
                    raise RuntimeError(f"device server {launch.name} did not start"
                                       + (f": {why}" if why else ""))
                time.sleep(0.02)

    def stop_servers(self) -> None:
        for _, _, proc in self.servers:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + SERVER_STOP_S
        for _, _, proc in self.servers:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.servers:
            self._record_servers()

    def dead_server(self) -> str | None:
        for launch, _, proc in self.servers:
            if proc.poll() is not None:
                return f"device server {launch.name} exited with status {proc.returncode}"
        return None

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        started = time.time()
        try:
            self.start_servers()
        except (OSError, RuntimeError) as e:
            self.stop_servers()
            self._write_exit(None, started, error=str(e))
            return 1
        with open(self.vm.file(store.QEMU_LOG), "ab") as log:
            log_start = os.fstat(log.fileno()).st_size  # earlier runs' output is not this run's
            try:
                self.qemu = subprocess.Popen(
                    self.config.argv, stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, env={**os.environ, **self.config.env},
                    preexec_fn=qos_preexec(self.guard), umask=QEMU_UMASK,
                )
            except OSError as e:
                self.stop_servers()
                self._write_exit(None, started, error=f"cannot run QEMU: {e}")
                return 1
        qemu_ref = ProcessRef.of_popen(self.qemu)
        if qemu_ref is not None:
            self.vm.write_process(store.QEMU_PID, qemu_ref)
        self.start_assertion(self.qemu.pid)
        forwarding = self.start_forwarder()
        powerdown_sent: float | None = None
        next_check = time.monotonic()
        while self.qemu.poll() is None:
            time.sleep(POLL_S)
            if self.server_failure is None and (failure := self.dead_server()):
                self.server_failure = failure
                self._record_servers()
                self._powerdown()
                powerdown_sent = time.monotonic()
            if powerdown_sent is not None and time.monotonic() - powerdown_sent > POWERDOWN_GRACE_S:
                self.qemu.terminate()
                powerdown_sent = None
            if self.crash is None and time.monotonic() >= next_check:
                next_check = time.monotonic() + RUN_STATE_POLL_S
                self._check_run_state()
        self.stop_forwarder(*forwarding)
        self.end_assertion()
        self.keep_last_screen()
        self.stop_servers()
        self.warnings += restore_bindings(self.vm)
        self._write_exit(self.qemu.returncode, started, qemu_output=self._qemu_output(log_start))
        return 0

    def guest_tables(self) -> GuestTables:
        """How the forwarder reads the guest's TCP tables: through the guest agent (every VM
        has its channel; a guest without qemu-ga reads as listeners unknown)."""
        return agent_tables(self.vm.agent_socket)

    def start_forwarder(self) -> tuple[threading.Thread, threading.Event]:
        """Keep QEMU's port forwards in step with the guest, on a thread of its own; a Docker
        VM's watcher (a second thread) feeds it the published container ports."""
        stop = threading.Event()
        watcher = None
        if self.config.docker:
            from egpu.vm.docker_mirror import DockerWatcher  # httpx: Docker VMs only

            watcher = DockerWatcher(self.vm.file(store.DOCKER_SOCKET), log=_log,
                                    on_change=lambda: self.forwarder.wake.set())
        self.forwarder = Forwarder(self.vm, self.config, self.guest_tables(), log=_log,
                                   docker=watcher.mirrors if watcher else None)
        thread = threading.Thread(target=self.forwarder.run, args=(stop,), name="ports",
                                  daemon=True)
        thread.start()
        if watcher is not None:
            # daemon: a read blocked on the guest never holds the supervisor's exit
            threading.Thread(target=watcher.run, args=(stop,), name="docker",
                             daemon=True).start()
        return thread, stop

    def stop_forwarder(self, thread: threading.Thread, stop: threading.Event) -> None:
        stop.set()
        self.forwarder.wake.set()
        thread.join(FORWARDER_STOP_S)

    def _check_run_state(self) -> None:
        """A guest QEMU stopped for good (internal-error, guest-panicked): record it, end QEMU."""
        if self.qemu is None or not self.vm.qmp_socket.exists():
            return
        state = qmp.query_status(self.vm.qmp_socket, RUN_STATE_QMP_TIMEOUT_S)
        if state not in qmp.CRASH_RUN_STATES:
            return
        assert state is not None
        self.crash = (state, qmp.query_pc(self.vm.qmp_socket, RUN_STATE_QMP_TIMEOUT_S))
        with contextlib.suppress(EgpuError):
            qmp.execute(self.vm.qmp_socket, "quit", timeout=RUN_STATE_QMP_TIMEOUT_S)
        try:
            self.qemu.wait(QUIT_GRACE_S)
        except subprocess.TimeoutExpired:
            self.qemu.kill()

    def _qemu_output(self, since: int) -> str:
        """The end of what QEMU wrote to its log in this run."""
        try:
            with open(self.vm.file(store.QEMU_LOG), "rb") as log:
                log.seek(max(since, os.fstat(log.fileno()).st_size - KILL_REPORT_TAIL))
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def start_assertion(self, qemu_pid: int) -> None:
        """Hold the host awake while a passed-through GPU runs (caffeinate -i -w QEMU_PID)."""
        if self.guard is None or not self.guard.power_assertion:
            return
        argv = self.guard.assertion_argv(qemu_pid)
        try:
            self.assertion = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except OSError as e:
            self.warnings.append(f"no power assertion ({argv[0]}: {e.strerror or e}): "
                                 "the host may sleep under the GPU")
            return
        ref = ProcessRef.of_popen(self.assertion)
        if ref is not None:
            self.vm.write_process(store.POWER_ASSERTION_PID, ref)

    def end_assertion(self) -> None:
        """Release the power assertion (``-w`` ends it with QEMU; this makes sure)."""
        if self.assertion is None:
            return
        if self.assertion.poll() is None:
            self.assertion.terminate()
        try:
            self.assertion.wait(SERVER_STOP_S)
        except subprocess.TimeoutExpired:
            self.assertion.kill()
            self.assertion.wait()

    def keep_last_screen(self) -> None:
        """Ask a live display server for the last picture the guest showed (post-mortem)."""
        for launch, ref, proc in self.servers:
            request = launch.spec.screenshot_request
            if request is None or proc.poll() is not None:
                continue
            with contextlib.suppress(EgpuError):
                request_screenshot(ref, request, self.vm.file(store.LAST_SCREEN),
                                   last_visible=True)

    def _powerdown(self) -> None:
        with contextlib.suppress(Exception):
            qmp.execute(self.vm.qmp_socket, "system_powerdown", timeout=2.0)

    def _write_exit(self, returncode: int | None, started: float, error: str | None = None,
                    qemu_output: str = "") -> None:
        record: dict[str, Any] = {
            "returncode": returncode,
            "signal": exit_signal(returncode, qemu_output),
            "started": started,
            "ended": time.time(),
            "stop_requested": self.vm.file(store.STOP_REQUEST).exists() or self.terminating,
            "server_failure": self.server_failure,
            "error": error,
            "run_state": self.crash[0] if self.crash else None,
            "pc": self.crash[1] if self.crash else None,
            "warnings": self.warnings,
        }
        store.write_json(self.vm.file(store.EXIT_RECORD), record)


def _log(message: str) -> None:
    """One line in supervisor.log (the supervisor's stdout and stderr)."""
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m egpu.vm.supervisor VM_DIR", file=sys.stderr)
        return 2
    path = Path(argv[0])
    return Supervisor(store.VmDir(path.name, root=path.parent)).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
