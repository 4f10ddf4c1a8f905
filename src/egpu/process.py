"""Process identity: egpu signals, waits on or calls running only processes proven its own.

A pid alone names whatever process holds that number now (pids are reused, and -1 means every
process). A :class:`ProcessRef` records what egpu launched: pid, start time and the program it
ran (``argv[0]`` as given to exec, not the resolved executable: QEMU runs through its private
dynamic loader). :func:`signal_process` is the one way egpu sends a signal, and it refuses any
process that does not match its record.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psutil

from egpu.errors import EgpuError

START_SLACK_S = 0.05  # psutil start times are rounded to clock ticks
EXEC_WAIT_S = 5.0
EXEC_POLL_S = 0.005
MIN_PID = 2  # 0 is the caller's group, 1 is init, negatives are groups or everything
NO_OUTPUT = "(no output)"


@dataclass(frozen=True)
class ProcessRef:
    """A process identified by pid, start time and the program egpu launched."""

    pid: int
    started: float
    program: str

    @classmethod
    def of(cls, pid: int, program: str) -> ProcessRef | None:
        """Record a process egpu just launched with ``program`` as argv[0]; None if it is gone.

        Waits until its exec has finished: Popen can return while the kernel is still setting
        up the new program, when /proc/PID/cmdline reads empty and it could not be verified.
        """
        if pid < MIN_PID:
            return None
        deadline = time.monotonic() + EXEC_WAIT_S
        try:
            proc = psutil.Process(pid)
            while not proc.cmdline():
                if proc.status() == psutil.STATUS_ZOMBIE:
                    break  # already ended: recorded all the same, and never alive
                if time.monotonic() > deadline:
                    return None
                time.sleep(EXEC_POLL_S)
            return cls(pid, proc.create_time(), program)
        except psutil.Error:
            return None

    @classmethod
    def of_popen(cls, proc: subprocess.Popen[Any]) -> ProcessRef | None:
        """Record a child started with Popen (its argv[0] is what it was launched as)."""
        args = proc.args
        program = str(args[0] if isinstance(args, list | tuple) else args)
        return cls.of(proc.pid, program)

    @classmethod
    def current(cls) -> ProcessRef:
        """This very process."""
        proc = psutil.Process()
        return cls(proc.pid, proc.create_time(), proc.cmdline()[0])

    def alive(self) -> bool:
        """True while this very process runs: same pid, start time and program; not a zombie."""
        if self.pid < MIN_PID:
            return False
        try:
            proc = psutil.Process(self.pid)
            with proc.oneshot():
                if proc.status() == psutil.STATUS_ZOMBIE:
                    return False
                if abs(proc.create_time() - self.started) >= START_SLACK_S:
                    return False
                cmdline = proc.cmdline()
        except psutil.Error:
            return False
        return bool(cmdline) and cmdline[0] == self.program

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "started": self.started, "program": self.program}

    @classmethod
    def from_json(cls, data: object) -> ProcessRef | None:
        """A recorded identity, or None when the record lacks one (then it is never signalled)."""
        if not isinstance(data, dict):
            return None
        pid, started, program = data.get("pid"), data.get("started"), data.get("program")
        if (not isinstance(pid, int) or isinstance(pid, bool) or pid < MIN_PID
                or not isinstance(started, int | float) or isinstance(started, bool)
                or not isinstance(program, str) or not program):
            return None
        return cls(pid, float(started), program)


def signal_process(ref: ProcessRef | None, sig: int) -> bool:
    """Send ``sig`` to a recorded process if it is still that process; True if it was sent."""
    if ref is None or not ref.alive():
        return False
    try:
        os.kill(ref.pid, sig)
    except ProcessLookupError:
        return False
    return True


def wait_gone(ref: ProcessRef | None, timeout: float, poll: float) -> bool:
    """Wait until a recorded process has ended; False if it still runs at the deadline."""
    deadline = time.monotonic() + timeout
    while ref is not None and ref.alive():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll)
    return True



def last_line(text: str, fallback: str = NO_OUTPUT) -> str:
    """The last non-blank line of a tool's output (its error, by convention), or ``fallback``."""
    return (text.strip().splitlines() or [fallback])[-1]


def run_tool(
    argv: Sequence[str], fail: Callable[[str], EgpuError], *, timeout: float | None,
    env: Mapping[str, str] | None = None, stdin: str | None = None, fallback: str = NO_OUTPUT,
) -> str:
    """Run a tool to completion and return its stdout; raise ``fail(detail)`` if it fails.

    ``detail`` is why it could not start, or the last line of its stderr when it exits non-zero.
    """
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            env={**os.environ, **(env or {})}, check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise fail(f"cannot run {argv[0] if argv else 'a tool'}: {e}") from e
    if proc.returncode != 0:
        raise fail(last_line(proc.stderr, fallback))
    return proc.stdout
