"""Which signal ended QEMU, as the supervisor writes it into the VM's exit record."""

from __future__ import annotations

import signal

import pytest

from egpu.vm.supervisor import exit_signal

# QEMU's own words when it exits on a signal it catches (qemu_kill_report), both forms
FROM_PID = "qemu-system-aarch64: terminating on signal 15 from pid 4242 (python3)\n"
NO_PID = "qemu-system-x86_64: terminating on signal 2\n"


@pytest.mark.parametrize(
    ("returncode", "output", "expected"),
    [
        (0, "", None),  # the guest powered off
        (0, "qemu-system-aarch64: warning: host doesn't support requested feature\n", None),
        (0, FROM_PID, signal.SIGTERM),  # QEMU caught SIGTERM and exited 0
        (0, NO_PID, signal.SIGINT),
        (-9, "", signal.SIGKILL),  # uncatchable: only the exit status tells
        (-9, FROM_PID, signal.SIGKILL),  # SIGTERM was ignored, then SIGKILL: the status wins
        (1, "qemu-system-aarch64: -device nope: 'nope' is not a valid device model name\n", None),
    ],
)
def test_exit_signal(returncode: int, output: str, expected: int | None) -> None:
    assert exit_signal(returncode, output) == expected
