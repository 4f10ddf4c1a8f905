"""Automatic port forwarding: from a guest service starting to listen to the host's first answer.

Boots the built-in guest once under TCG (a private EGPU_HOME, the shared cache), then for each
round starts busybox httpd on a fresh port through the guest agent and times until an HTTP GET
on the host's 127.0.0.1 at that port answers; then stops it and waits for the forward to go.
Prints each round, the median and the median against the forwarder's poll interval (the
expectation: between half an interval and one, plus a guest-agent round trip).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import platformdirs

from egpu.errors import AgentError
from egpu.paths import CACHE_ENV, HOME_ENV
from egpu.vm import agent
from egpu.vm.forwarder import POLL_S

NAME = "bench-ports"
BOOT_WAIT_S = 180.0
AGENT_WAIT_S = 120.0
ANSWER_WAIT_S = 30.0
PROBE_S = 0.01  # between host connection attempts: fine against a 1 s poll interval
GREETING = "egpu-bench"


def egpu(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "egpu", *args], env=env, capture_output=True,
                          text=True, timeout=BOOT_WAIT_S)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2.0) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            return GREETING.encode() in s.recv(4096)
    except OSError:
        return False


def in_guest(sock: Path, script: str) -> None:
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            with agent.connect(sock, timeout=30.0) as client:
                result = client.run(["/bin/sh", "-c", script], timeout=30.0)
            break
        except AgentError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    if result.exit_code != 0:
        raise SystemExit(f"guest command failed: {script}: {result}")


def forwarded(vm: Path, port: int) -> bool:
    try:
        doc = json.loads((vm / "ports.json").read_text())
    except (OSError, ValueError):
        return False
    return any(f.get("host_port") == port for f in doc.get("forwards", []))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--arch", default="aarch64", choices=("aarch64", "x86_64"))
    args = ap.parse_args(argv)
    home = Path(tempfile.mkdtemp(prefix="egpu-b", dir="/tmp"))
    cache = os.environ.get(CACHE_ENV) or platformdirs.user_cache_dir("egpu")
    env = {**os.environ, HOME_ENV: str(home), CACHE_ENV: cache}
    vm = home / "data" / "vms" / NAME
    try:
        proc = egpu(env, "run", "--name", NAME, "--arch", args.arch, "--accel", "tcg",
                    "--detach", "--gpu", "none", "-q")
        if proc.returncode != 0:
            raise SystemExit(f"egpu run failed: {proc.stderr.strip()}")
        in_guest(vm / "agent.sock", f"mkdir -p /tmp/w && echo {GREETING} > /tmp/w/index.html")
        latencies = []
        for i in range(args.rounds):
            port = free_port()
            in_guest(vm / "agent.sock", f"httpd -p {port} -h /tmp/w")
            start = time.monotonic()  # httpd listens before the exec returns
            while not answers(port):
                if time.monotonic() - start > ANSWER_WAIT_S:
                    raise SystemExit(f"round {i}: port {port} never answered")
                time.sleep(PROBE_S)
            latency = time.monotonic() - start
            latencies.append(latency)
            print(f"round {i + 1}: port {port}: {latency * 1000:.0f} ms", flush=True)
            in_guest(vm / "agent.sock", "killall httpd")
            gone = time.monotonic()
            while forwarded(vm, port):
                if time.monotonic() - gone > ANSWER_WAIT_S:
                    raise SystemExit(f"round {i}: the forward of port {port} never went")
                time.sleep(PROBE_S)
        median = statistics.median(latencies)
        print(f"listen -> first host answer: median {median * 1000:.0f} ms over {len(latencies)} "
              f"rounds (min {min(latencies) * 1000:.0f}, max {max(latencies) * 1000:.0f})")
        print(f"poll interval {POLL_S * 1000:.0f} ms; "
              f"median / poll interval = {median / POLL_S:.2f}x")
    finally:
        egpu(env, "stop", NAME, "--force")
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
