"""The attached console is a real terminal: `egpu run` and `egpu console` in tmux, typed at as
a person would (send-keys), read off the screen (capture-pane)."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import Cli

pytestmark = pytest.mark.qemu

WIDTH, HEIGHT = 120, 50
BOOT_TIMEOUT_S = 180  # a TCG boot on 2 cores shared with the rest of the suite
ANSWER_TIMEOUT_S = 60
TMUX_TIMEOUT_S = 10
PROMPT = "/ # "
# what a terminal's echo of control characters or a leaked cursor-position reply looks like
ESCAPE_RESIDUE = re.compile(r"\^\[|\x1b|\[\d+;\d+R")
POLL_S = 0.1


@dataclass
class Tmux:
    """A tmux server of the test's own, started with the test's environment."""

    socket_name: str
    env: dict[str, str]

    def __call__(self, *args: str) -> str:
        proc = subprocess.run(["tmux", "-L", self.socket_name, "-f", os.devnull, *args],
                              env=self.env, capture_output=True, text=True,
                              timeout=TMUX_TIMEOUT_S)
        assert proc.returncode == 0, f"tmux {' '.join(args)}: {proc.stderr}"
        return proc.stdout

    def start(self, window: str, *egpu_args: str) -> None:
        """Run ``egpu ARGS`` in a new window (a new session for the first one)."""
        command = "exec " + shlex.join([sys.executable, "-m", "egpu", *egpu_args])
        if window == "main":
            self("new-session", "-d", "-s", "t", "-n", window, "-x", str(WIDTH),
                 "-y", str(HEIGHT), command)
        else:
            self("new-window", "-d", "-t", "t", "-n", window, command)
        # keep the screen of a command that ended, to read its last words
        self("set-option", "-w", "-t", f"t:{window}", "remain-on-exit", "on")

    def screen(self, window: str) -> str:
        """The window's whole text: history and visible screen, wrapped lines joined."""
        return self("capture-pane", "-p", "-J", "-S", "-", "-t", f"t:{window}")

    def type(self, window: str, text: str) -> None:
        """Type text and Enter, as a person at the keyboard."""
        self("send-keys", "-t", f"t:{window}", "-l", text)
        self("send-keys", "-t", f"t:{window}", "Enter")

    def keys(self, window: str, *keys: str) -> None:
        self("send-keys", "-t", f"t:{window}", *keys)

    def wait(self, window: str, pred: Callable[[str], object],
             timeout: float = ANSWER_TIMEOUT_S) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen(window)
            if pred(text):
                return text
            assert time.monotonic() < deadline, f"timed out; screen:\n{text}"
            time.sleep(POLL_S)

    def dead(self, window: str) -> bool:
        return self("display-message", "-p", "-t", f"t:{window}", "#{pane_dead}").strip() == "1"


@pytest.fixture
def tmux(cli: Cli) -> Iterator[Tmux]:
    server = Tmux(f"egpu-test-{uuid.uuid4().hex[:12]}", {**cli.env, "TERM": "xterm"})
    yield server
    subprocess.run(["tmux", "-L", server.socket_name, "kill-server"], capture_output=True,
                   timeout=TMUX_TIMEOUT_S)


def lines(screen: str) -> list[str]:
    return [line.rstrip() for line in screen.splitlines()]


def at_prompt(screen: str) -> bool:
    """The shell waits for a command: the last non-empty line is its bare prompt."""
    nonempty = [line for line in lines(screen) if line]
    return bool(nonempty) and nonempty[-1] == PROMPT.rstrip()


def answered(output: str) -> Callable[[str], bool]:
    """The command's output line is on screen and the shell is back at its prompt."""
    return lambda screen: output in lines(screen) and at_prompt(screen)


def run_attached(cli: Cli, tmux: Tmux, name: str) -> None:
    tmux.start("main", "run", "--name", name, "--gpu", "none", "--accel", "tcg")
    cli.wait_for(name, lambda s: s["guest_ready"], timeout=BOOT_TIMEOUT_S)
    tmux.wait("main", at_prompt)


def test_attached_run_is_the_guests_terminal(cli: Cli, tmux: Tmux) -> None:
    run_attached(cli, tmux, "tty")
    # the typed command and its output differ, so each can be counted on its own
    tmux.type("main", "echo the''re")
    screen = tmux.wait("main", answered("there"))
    assert lines(screen).count("there") == 1, screen
    assert sum(line.endswith("echo the''re") for line in lines(screen)) == 1, screen

    # Ctrl-C is the guest's: it interrupts the guest's command, not egpu
    tmux.type("main", "echo sleep''ing; sleep 100; echo slept")
    tmux.wait("main", lambda s: "sleeping" in lines(s))
    tmux.keys("main", "C-c")
    # the shell answers well before the sleep would have ended
    tmux.type("main", "echo after=$((20+22))")
    screen = tmux.wait("main", answered("after=42"))
    assert "slept" not in lines(screen)
    assert cli.status("tty")["state"] == "running"

    # a second typing session is refused while this one holds the console
    second = cli("console", "tty", input="")
    assert second.returncode == 1 and "already has a console attached" in second.stderr

    # Ctrl-] leaves; the VM keeps running
    tmux.keys("main", "C-]")
    screen = tmux.wait("main", lambda s: tmux.dead("main"))
    assert "detached from VM 'tty'" in screen, screen
    assert cli.status("tty")["state"] == "running"

    # `egpu console` comes back to the same shell
    tmux.start("again", "console", "tty")
    tmux.wait("again", lambda s: "attached to the console of VM 'tty'" in s)
    tmux.type("again", "echo back=$((6*7+1))")
    screen = tmux.wait("again", answered("back=43"))
    for text in (screen, tmux.screen("main")):
        assert not ESCAPE_RESIDUE.search(text), text
    tmux.keys("again", "C-]")
    tmux.wait("again", lambda s: tmux.dead("again"))
    assert cli.status("tty")["state"] == "running"

    # closing the terminal of a session that only looked in leaves the VM running
    tmux.start("look", "console", "tty")
    tmux.wait("look", lambda s: "attached to the console of VM 'tty'" in s)
    pid = int(tmux("display-message", "-p", "-t", "t:look", "#{pane_pid}"))
    tmux("kill-window", "-t", "t:look")
    deadline = time.monotonic() + ANSWER_TIMEOUT_S
    while Path(f"/proc/{pid}").exists():
        assert time.monotonic() < deadline, "egpu console outlived its terminal"
        time.sleep(POLL_S)
    assert cli.status("tty")["state"] == "running"

    # not at a terminal, `egpu console` types what it is given, every byte of it
    piped = cli("console", "tty", input="echo piped=$((3*3))\n")
    assert piped.returncode == 0, piped.stderr
    log = Path(cli.status("tty")["serial_log"])
    deadline = time.monotonic() + ANSWER_TIMEOUT_S
    while "piped=9" not in log.read_text(errors="replace").splitlines():
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-2000:]
        time.sleep(POLL_S)
    cli("stop", "tty", check=True)
    stopped = cli("console", "tty", input="")
    assert stopped.returncode == 1 and "VM 'tty' is stopped" in stopped.stderr
    unknown = cli("console", "nosuch", input="")
    assert unknown.returncode == 1 and "no VM named 'nosuch'" in unknown.stderr


def test_closing_the_terminal_stops_the_vm_cleanly(cli: Cli, tmux: Tmux) -> None:
    tmux.start("main", "run", "--name", "hup", "--gpu", "none", "--accel", "tcg")
    cli.wait_for("hup", lambda s: s["guest_ready"], timeout=BOOT_TIMEOUT_S)
    pid = cli.status("hup")["pid"]
    tmux("kill-session", "-t", "t")  # the terminal closes: SIGHUP
    final = cli.wait_for("hup", lambda s: s["state"] in ("stopped", "crashed"),
                         timeout=ANSWER_TIMEOUT_S)
    assert final["state"] == "stopped", final
    assert final["exit"]["returncode"] == 0  # the guest powered off: a clean stop
    assert not Path(f"/proc/{pid}").exists()


def _default_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


def test_sigterm_stops_a_vm_attached_without_a_terminal(cli: Cli) -> None:
    attached = cli.popen("run", "--name", "term", "--accel", "tcg", "--gpu", "none",
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, preexec_fn=_default_signals)
    cli.wait_for("term", lambda s: s["guest_ready"], timeout=BOOT_TIMEOUT_S)
    attached.send_signal(signal.SIGTERM)
    out, err = attached.communicate(timeout=ANSWER_TIMEOUT_S)
    assert attached.returncode == 0, err
    assert b"EGPU-GUEST-READY" in out and out.count(b"EGPU-GUEST-READY") == 1
    assert b"Fatal Python error" not in err and b"Traceback" not in err, err
    final = cli.status("term")
    assert final["state"] == "stopped" and final["exit"]["returncode"] == 0
