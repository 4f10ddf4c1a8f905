"""Shared fixtures and policy: a private EGPU_HOME per test, one shared cache, a CLI runner,
the hypothesis profile and the test tiers (markers declared in pyproject.toml)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import platformdirs
import pytest
from hypothesis import HealthCheck, settings

from egpu.paths import CACHE_ENV, HOME_ENV
from egpu.process import ProcessRef, signal_process
from egpu.vm import store
from inprocess import run_main

# Engine and guest assets are provisioned once by ./run-tests (egpu setup) into the user cache.
SHARED_CACHE = Path(os.environ.get(CACHE_ENV) or platformdirs.user_cache_dir("egpu"))

# One hypothesis policy for every property test. No deadline and no too-slow check: the two
# cores are shared, so how long an example takes says nothing about the code. CI (any CI
# environment sets CI) tries more examples and prints a blob to replay a failure with.
CI_ENV = "CI"
settings.register_profile(
    "dev", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "ci", settings.get_profile("dev"), max_examples=300, print_blob=True
)
settings.load_profile("ci" if os.environ.get(CI_ENV) else "dev")

QEMU_MARK = "qemu"
SERIAL_TAIL_BYTES = 4096  # of a VM's console log, in a timed-out wait's message

# Where the suite's child processes (python -m egpu, device servers, drivers) cache bytecode
# when PYTHONDONTWRITEBYTECODE keeps it out of the tree: without a cache each of them compiles
# egpu from source again, a quarter of the CPU of a short CLI call.
PYCACHE_DIR = SHARED_CACHE / "tests" / "pycache"
NO_BYTECODE_ENV = "PYTHONDONTWRITEBYTECODE"
PYCACHE_PREFIX_ENV = "PYTHONPYCACHEPREFIX"


# pytest-xdist starts its workers with COLUMNS=80 and LINES=24; egpu's consoles would take
# them as the width of every command run in the process, unlike a real run's
TERMINAL_SIZE_ENV = ("COLUMNS", "LINES")


def pytest_configure(config: pytest.Config) -> None:
    for name in TERMINAL_SIZE_ENV:
        os.environ.pop(name, None)
    if os.environ.pop(NO_BYTECODE_ENV, None):
        os.environ.setdefault(PYCACHE_PREFIX_ENV, str(PYCACHE_DIR))
    # A suite started in the background by a non-interactive shell inherits SIGINT ignored, and
    # so would every egpu it starts (Python then installs no KeyboardInterrupt): the tests that
    # press Ctrl-C would see it ignored. A handler here is reset to the default in each child.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)

# Fixtures that run a server on loopback: a test using one is a network test, marked here so
# that no such test can miss the marker.
NETWORK_FIXTURES = frozenset({"registry"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if NETWORK_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.network)


@dataclass
class Cli:
    """Runs ``python -m egpu`` in a subprocess with the test's environment."""

    env: dict[str, str]
    home: Path

    def __call__(self, *args: str, timeout: float = 120, check: bool = False,
                 input: str | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "egpu", *args], env=self.env, capture_output=True,
            text=True, timeout=timeout, input=input,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"egpu {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
        return proc

    def json(self, *args: str, timeout: float = 120) -> Any:
        # right after the command, so it never lands among extra args after "--"
        argv = (args[0], "--json", *args[1:])
        return json.loads(self(*argv, timeout=timeout, check=True).stdout)

    def popen(self, *args: str, **kw: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "egpu", *args], env=self.env, **kw)

    def status(self, name: str) -> dict[str, Any]:
        data = self.json("status", name)
        assert isinstance(data, dict)
        return data

    def wait_for(self, name: str, pred: Any, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            proc = self("status", name, "--json")
            # the VM may not exist yet while a concurrent `run` is still preparing it
            if proc.returncode == 0:
                last = json.loads(proc.stdout)
                if pred(last):
                    return last
            time.sleep(0.3)
        # the console's end says what the guest did (the VM dir goes with the test's home)
        serial = self.home / "data" / "vms" / name / "serial.log"
        tail = serial.read_bytes()[-SERIAL_TAIL_BYTES:] if serial.is_file() else b""
        raise AssertionError(f"timed out waiting on VM {name}: last status {last}\n"
                             f"serial log tail:\n{tail.decode(errors='replace')}")


@dataclass
class InProcessCli(Cli):
    """Runs egpu's ``main`` in this process, with the same environment and results as Cli.

    For tests about what a command decides and prints (a dry run's argv, a listing); tests about
    the process itself (signals, terminals, a real interpreter's exit) keep Cli.
    """

    def __call__(self, *args: str, timeout: float = 120, check: bool = False,
                 input: str | None = None) -> subprocess.CompletedProcess[str]:
        proc = run_main(args, self.env, input)
        if check and proc.returncode != 0:
            raise AssertionError(f"egpu {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
        return proc


@pytest.fixture
def egpu_home(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A private, short EGPU_HOME (UNIX socket paths must stay short) with the shared cache.

    A test that started a VM under it without the qemu marker fails: the quick tier stays quick.
    """
    home = Path(tempfile.mkdtemp(prefix="egpu-t", dir="/tmp"))
    monkeypatch.setenv(HOME_ENV, str(home))
    monkeypatch.setenv(CACHE_ENV, str(SHARED_CACHE))
    yield home
    started = started_qemu(home)
    _stop_leftovers(home)
    shutil.rmtree(home, ignore_errors=True)
    if started and request.node.get_closest_marker(QEMU_MARK) is None:
        pytest.fail(f"started QEMU (VM {started[0].name}) without the {QEMU_MARK} marker")


def started_qemu(home: Path) -> list[Path]:
    """VM directories under an EGPU_HOME where the supervisor started QEMU.

    It opens QEMU's log, starts QEMU and records its pid; tests that fake a running VM write
    only the pid file, so both must be there.
    """
    return sorted(d for d in home.glob("data/vms/*")
                  if (d / store.QEMU_LOG).is_file() and (d / store.QEMU_PID).is_file())


def _recorded_processes(home: Path) -> Iterator[ProcessRef]:
    """Every process egpu recorded under this home, with its identity (pid, start, program)."""
    for path in home.glob("data/vms/*"):
        if not path.is_dir() or not store.NAME_RE.match(path.name):
            continue
        vm = store.VmDir(path.name, root=path.parent)
        for which in (store.QEMU_PID, store.SUPERVISOR_PID):
            ref = vm.read_process(which)
            if ref is not None:
                yield ref
        yield from (s.process for s in vm.read_servers() if s.process is not None)


def _stop_leftovers(home: Path) -> None:
    """Kill what a failed test left running under its home: only processes proven egpu's own."""
    for ref in list(_recorded_processes(home)):
        signal_process(ref, signal.SIGKILL)


@pytest.fixture
def cli(egpu_home: Path) -> Cli:
    env = {**os.environ, HOME_ENV: str(egpu_home), CACHE_ENV: str(SHARED_CACHE)}
    return Cli(env=env, home=egpu_home)


@pytest.fixture
def inproc(egpu_home: Path) -> InProcessCli:
    env = {**os.environ, HOME_ENV: str(egpu_home), CACHE_ENV: str(SHARED_CACHE)}
    return InProcessCli(env=env, home=egpu_home)
