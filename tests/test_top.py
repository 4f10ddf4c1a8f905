"""egpu top: bad input refused in one line, and against a real VM (TCG, the built-in guest):
--json samples with CPU and memory from the guest agent, the live view drawn in a terminal
(tmux) and left with Ctrl-C, exit 0."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from conftest import Cli, InProcessCli
from egpu.vm import stats

BOOT_TIMEOUT_S = 180.0
AGENT_TIMEOUT_S = 120.0
DRAW_TIMEOUT_S = 60.0
POLL_S = 0.3
GUEST_MEMORY_MIB = 384


@pytest.mark.parametrize("interval", ["0", "-1", "nan", "inf", "1e9"])
def test_bad_interval_exits_2(inproc: InProcessCli, interval: str) -> None:
    proc = inproc("top", "nosuch", "--interval", interval)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "--interval" in proc.stderr


def test_unknown_vm_is_one_line(inproc: InProcessCli) -> None:
    proc = inproc("top", "nosuch", "--json")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: no VM named 'nosuch' (see 'egpu list')"]


def _top_json(cli: Cli, name: str) -> list[dict[str, object]]:
    """Two samples, once the guest agent answers (it starts late in the guest's boot)."""
    deadline = time.monotonic() + AGENT_TIMEOUT_S
    while True:
        proc = cli("top", name, "--json", "--interval", "0.5", "--count", "2", timeout=60)
        if proc.returncode == 0:
            return [json.loads(line) for line in proc.stdout.splitlines()]
        if time.monotonic() > deadline:
            raise AssertionError(f"egpu top never answered: {proc.stderr}")
        time.sleep(POLL_S)  # polling a condition with a deadline


@pytest.fixture
def tmux(cli: Cli) -> Iterator[list[str]]:
    """A private tmux server (its own socket), killed after the test."""
    argv = ["tmux", "-L", f"egpu-{cli.home.name}"]
    yield argv
    subprocess.run([*argv, "kill-server"], capture_output=True)


def _pane(tmux: list[str]) -> str:
    return subprocess.run([*tmux, "capture-pane", "-p", "-t", "top"], capture_output=True,
                          text=True).stdout


def _wait_pane(tmux: list[str], pred: str) -> str:
    deadline = time.monotonic() + DRAW_TIMEOUT_S
    while pred not in (text := _pane(tmux)):
        if time.monotonic() > deadline:
            raise AssertionError(f"{pred!r} never showed; the pane:\n{text}")
        time.sleep(POLL_S)
    return text


@pytest.mark.qemu
def test_top_against_the_built_in_guest(cli: Cli, tmux: list[str]) -> None:
    proc = cli("run", "--name", "topvm", "--accel", "tcg", "--detach", "--gpu", "none",
               "--memory", f"{GUEST_MEMORY_MIB}M")
    assert proc.returncode == 0, proc.stderr
    try:
        cli.wait_for("topvm", lambda s: s["guest_ready"], timeout=BOOT_TIMEOUT_S)
        samples = _top_json(cli, "topvm")
        assert len(samples) == 2
        for sample in samples:
            cpu = sample["cpu_percent"]
            assert isinstance(cpu, float | int) and 0 <= cpu <= 100
            memory = sample["memory"]
            assert isinstance(memory, dict)
            # the guest's own view: what it was given, less what the kernel keeps
            assert GUEST_MEMORY_MIB / 2 < memory["total_mib"] <= GUEST_MEMORY_MIB
            assert 0 < memory["used_mib"] < memory["total_mib"]
            assert sample["gpus"] == [] and sample["notes"] == [stats.NO_GPU_NOTE]

        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in cli.env.items()
                       if k.startswith("EGPU_"))
        command = (f"env {env} {shlex.quote(sys.executable)} -m egpu top topvm --interval 0.5;"
                   " echo EXIT=$?; sleep 600")
        subprocess.run([*tmux, "new-session", "-d", "-s", "top", "-x", "120", "-y", "40",
                        command], check=True)
        text = _wait_pane(tmux, "memory")
        assert "CPU" in text and "Ctrl-C to quit" in text and "no GPU driver" in text
        subprocess.run([*tmux, "send-keys", "-t", "top", "C-c"], check=True)
        text = _wait_pane(tmux, "EXIT=")
        assert "EXIT=0" in text and "Traceback" not in text and "error" not in text, text
    finally:
        cli("stop", "topvm", "--timeout", "30")
