"""Benchmark: server CPU time and latency per config-space REGION_READ round trip.

Compiles a small C client (gcc), then drives, in the same run, (1) a minimal Python echo server
speaking the vfio-user header and (2) ``egpu vfio-user serve --function sample``; prints CPU per
op of each server, the client's latency (p50/p99) and the ratio egpu/echo (target <= 1.3).

    .venv/bin/python bench/server_roundtrip.py [--ops N] [--rounds R]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLIENT_SRC = HERE / "server_roundtrip_client.c"
ECHO = HERE / "server_roundtrip_echo.py"


@dataclass
class Sample:
    cpu_us_per_op: float
    p50_us: float
    p99_us: float
    ops_per_s: float


def cpu_seconds(pid: int) -> float:
    """CPU time the scheduler charged a process (all its threads), in ns resolution.

    /proc/PID/schedstat's first field is on-CPU time; utime+stime in /proc/PID/stat only
    counts in clock ticks (10 ms), too coarse for a few hundred ms of work.
    """
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def wait_for(path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"server did not start: {proc.args!r}")
        time.sleep(0.02)


def measure(server_argv: list[str], sock: Path, client: Path, ops: int) -> Sample:
    server = subprocess.Popen(server_argv, stdout=subprocess.DEVNULL)
    try:
        wait_for(sock, server)
        drv = subprocess.Popen([str(client), str(sock), str(ops)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
        assert drv.stdout is not None and drv.stdin is not None
        if drv.stdout.readline().strip() != "READY":
            raise SystemExit("client failed during warm-up")
        cpu0 = cpu_seconds(server.pid)
        drv.stdin.write("GO\n")
        drv.stdin.flush()
        line = drv.stdout.readline()
        cpu1 = cpu_seconds(server.pid)
        drv.wait(60)
        if not line.startswith("RESULT"):
            raise SystemExit(f"client failed: {line!r}")
        kv = dict(item.split("=") for item in line.split()[1:])
        total_s = int(kv["total_ns"]) / 1e9
        return Sample((cpu1 - cpu0) / ops * 1e6, int(kv["p50_ns"]) / 1e3,
                      int(kv["p99_ns"]) / 1e3, ops / total_s)
    finally:
        server.terminate()
        server.wait(30)
        sock.unlink(missing_ok=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", type=int, default=30000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="egpu-bench-"))
    os.chmod(work, 0o700)
    client = work / "client"
    subprocess.run(["gcc", "-O2", "-o", str(client), str(CLIENT_SRC)], check=True)
    sock = work / "s.sock"
    servers = {
        "echo": [sys.executable, str(ECHO), str(sock)],
        "egpu": [sys.executable, "-m", "egpu", "vfio-user", "serve", "--socket", str(sock),
                 "--function", "sample"],
    }
    results: dict[str, list[Sample]] = {name: [] for name in servers}
    for _ in range(args.rounds):  # interleaved, so drift on a shared machine hits both
        for name, argv in servers.items():
            results[name].append(measure(argv, sock, client, args.ops))
    print(f"config-space REGION_READ round trips: {args.ops} ops x {args.rounds} rounds "
          "(median of rounds)")
    med: dict[str, Sample] = {}
    for name, samples in results.items():
        med[name] = Sample(*(statistics.median(getattr(s, f) for s in samples)
                             for f in ("cpu_us_per_op", "p50_us", "p99_us", "ops_per_s")))
        m = med[name]
        print(f"  {name:5} server CPU {m.cpu_us_per_op:6.2f} us/op   latency p50 "
              f"{m.p50_us:6.1f} us  p99 {m.p99_us:6.1f} us   {m.ops_per_s:8.0f} ops/s")
    ratio = med["egpu"].cpu_us_per_op / med["echo"].cpu_us_per_op
    print(f"ratio egpu/echo server CPU per op: {ratio:.2f}x (target <= 1.30x)")
    print(f"ratio egpu/echo p50 latency:       {med['egpu'].p50_us / med['echo'].p50_us:.2f}x")


if __name__ == "__main__":
    main()
