"""Benchmark: boot of egpu's built ``base`` image against the built-in guest, one run.

Builds (or takes from the cache) ``egpu image build base``, then boots, alternating for
``--rounds`` rounds under the same accelerator: the built-in guest with ``egpu run -d`` until
``status`` says the guest is ready, and the base image with ``egpu run --base`` until the guest
agent answers (``status --json``: ``agent.answering``) and until ``egpu ssh NAME true`` logs in
with the seeded key. Prints each time, the medians and the ratios base/built-in: what a full
distribution (firmware, systemd, cloud-init's first boot) costs over egpu's busybox guest.

    .venv/bin/python bench/image_boot.py [--arch x86_64|aarch64] [--rounds 1]
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from egpu.paths import CACHE_ENV, HOME_ENV, dirs

POLL_S = 0.5
BUILD_TIMEOUT_S = 3 * 3600
BOOT_TIMEOUT_S = 1800.0


def egpu(env: dict[str, str], *args: str, timeout: float = 600,
         stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "egpu", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, input=stdin)


def status(env: dict[str, str], name: str) -> dict[str, Any]:
    proc = egpu(env, "status", name, "--json", timeout=60)
    if proc.returncode != 0:
        return {}
    data = json.loads(proc.stdout)
    return data if isinstance(data, dict) else {}


def wait(pred: Callable[[], bool], what: str, start: float) -> float:
    """Seconds from ``start`` until ``pred`` holds."""
    while not pred():
        if time.monotonic() - start > BOOT_TIMEOUT_S:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(POLL_S)
    return time.monotonic() - start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def boot_builtin(env: dict[str, str], arch: str) -> float:
    start = time.monotonic()
    proc = egpu(env, "run", "--name", "builtin", "--arch", arch, "--accel", "tcg", "--gpu",
                "none", "--detach", "--quiet")
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    ready = wait(lambda: bool(status(env, "builtin").get("guest_ready")), "the built-in guest",
                 start)
    egpu(env, "stop", "builtin", "--force")
    egpu(env, "rm", "builtin", "--force")
    return ready


def boot_base(env: dict[str, str], arch: str, image: Path) -> tuple[float, float]:
    start = time.monotonic()
    proc = egpu(env, "run", "--name", "base", "--base", str(image), "--arch", arch, "--accel",
                "tcg", "--gpu", "none", "--memory", "2G", "--ssh-port", str(free_port()),
                "--detach", "--quiet")
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    agent = wait(lambda: bool((status(env, "base").get("agent") or {}).get("answering")),
                 "the guest agent", start)
    ssh = wait(lambda: egpu(env, "ssh", "base", "true", timeout=60, stdin="").returncode == 0,
               "ssh", start)
    egpu(env, "stop", "base", "--force")
    egpu(env, "rm", "base", "--force")
    return agent, ssh


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="x86_64", choices=("x86_64", "aarch64"))
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="egpu-bench-", dir="/tmp"))
    env = {**os.environ, HOME_ENV: str(home), CACHE_ENV: str(dirs().cache)}
    try:
        proc = egpu(env, "image", "build", "base", "--arch", args.arch, "--json",
                    timeout=BUILD_TIMEOUT_S)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr)
        image = Path(json.loads(proc.stdout)["image"])
        builtin: list[float] = []
        agent: list[float] = []
        ssh: list[float] = []
        for n in range(args.rounds):
            builtin.append(boot_builtin(env, args.arch))
            a, s = boot_base(env, args.arch, image)
            agent.append(a)
            ssh.append(s)
            print(f"round {n + 1}: built-in ready {builtin[-1]:.1f} s, base agent {a:.1f} s, "
                  f"base ssh {s:.1f} s", flush=True)
        b = statistics.median(builtin)
        print(f"\n{args.arch} under TCG, median of {args.rounds} round(s):")
        print(f"  built-in guest to ready      {b:7.1f} s   1.00x")
        print(f"  base image to agent answers  {statistics.median(agent):7.1f} s   "
              f"{statistics.median(agent) / b:.2f}x")
        print(f"  base image to ssh answers    {statistics.median(ssh):7.1f} s   "
              f"{statistics.median(ssh) / b:.2f}x")
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
