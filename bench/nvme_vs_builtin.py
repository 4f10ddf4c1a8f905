"""Benchmark: NVMe through the virtual eGPU versus QEMU's built-in emulated ``nvme``, one run.

Boots the built-in guest once under TCG with both controllers attached side by side, each on a
raw backing file of the same size and content: QEMU's ``-device nvme`` and ``egpu vfio-user
serve --function nvme`` through ``vfio-user-pci``. In the guest, fio (Debian trixie's, with its
shared-library closure, appended to the initrd as an extra cpio archive) runs 4 KiB random read
at QD1 and 1 MiB sequential read with direct=1, alternating between the two devices for several
rounds, so both see the same guest, the same host load and the same moment. Prints each
device's median, the ratio against the target (>= 1.0x for both), the spread of the per-round
ratios, and the device server's CPU time per I/O of each job (sampled as each fio run ends).

    .venv/bin/python bench/nvme_vs_builtin.py [--arch aarch64|x86_64] [--seconds S]
                                              [--rounds N] [--quick]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from egpu import debpkg
from egpu.engine.qemu import find_engine
from egpu.engine.qemu_options import json_option, option_string
from egpu.guest import cpio, protocol
from egpu.guest.assets import DEBIAN_ARCH, SUITES, ensure_guest
from egpu.paths import dirs

MIB = 1 << 20
VIRTUAL_SLOT = "0x10.0"  # where egpu puts the virtual eGPU
BUILTIN_SLOT = "0x11.0"
VIRTUAL_MODEL = "egpu"  # prefix of the controller model our NVMe function reports
MEMORY_MIB = 512
CPUS = 2
IOPS_TARGET = 1.0
THROUGHPUT_TARGET = 1.0
CONSOLE_POLL_S = 0.05  # how often the console is read for finished fio runs
LD_SO = {"aarch64": "ld-linux-aarch64.so.1", "x86_64": "ld-linux-x86-64.so.2"}
TRIPLET = {"aarch64": "aarch64-linux-gnu", "x86_64": "x86_64-linux-gnu"}
FIO_ROOT = "/opt/fio"
# fio terse v3 (0-based fields): 5 read KiB total, 6 read bandwidth KiB/s, 7 read IOPS
TERSE_READ_BW_KIB, TERSE_READ_IOPS, TERSE_READ_KIB = 6, 7, 5
JOBS = ("randread", "read")
JOB_LABELS = {"randread": "4k randread", "read": "1M read"}
DEVICES = ("builtin", "virtual")
BENCH_LINE = re.compile(r"^BENCH (\d+) (builtin|virtual) (randread|read) (\S+)\s*$", re.M)
# The check's output reaches the console only when it ends; this line goes there at once.
RUN_DONE = "FIO-DONE"
RUN_DONE_LINE = re.compile(rf"^{RUN_DONE} (builtin|virtual) (randread|read)\s*$", re.M)

CHECK_SCRIPT = f"""#!/bin/sh
# bench check (added by bench/nvme_vs_builtin.py): fio on both NVMe namespaces, alternating
secs=${{EGPU_BENCH_SECONDS:-10}}
rounds=${{EGPU_BENCH_ROUNDS:-3}}
builtin= virtual= tries=0
while [ -z "$builtin" ] || [ -z "$virtual" ]; do
    if [ "$tries" -ge 600 ]; then
        echo "CHECK bench fail namespaces: builtin=$builtin virtual=$virtual"; exit 0
    fi
    tries=$((tries + 1)); usleep 100000
    for b in /sys/block/nvme*n1; do
        [ -e "$b/device/model" ] || continue
        case "$(cat "$b/device/model")" in
            {VIRTUAL_MODEL}*) virtual=/dev/${{b##*/}} ;;
            *) builtin=/dev/${{b##*/}} ;;
        esac
    done
    [ -b "$builtin" ] || builtin=; [ -b "$virtual" ] || virtual=
done
fio() {{
    {FIO_ROOT}/ld.so --library-path {FIO_ROOT}/lib {FIO_ROOT}/fio "$@"
}}
round=1
while [ "$round" -le "$rounds" ]; do
    for job in randread:4k read:1M; do
        rw=${{job%%:*}}; bs=${{job#*:}}
        for dev in builtin virtual; do
            eval path=\\$$dev
            out=$(fio --name="$rw" --filename="$path" --direct=1 --ioengine=psync --rw="$rw" \\
                --bs="$bs" --iodepth=1 --time_based --runtime="$secs" --output-format=terse \\
                --terse-version=3 2>&1) || {{
                echo "CHECK bench fail fio: $(echo "$out" | tail -n 1)"; exit 0; }}
            echo "{RUN_DONE} $dev $rw" > /dev/console
            echo "BENCH $round $dev $rw $(echo "$out" | tail -n 1 | tr ' ' _)"
        done
    done
    round=$((round + 1))
done
echo "CHECK bench ok"
"""


@dataclass
class Figures:
    """Per-round fio results of both devices: figures[device][job] is one value per round."""

    figures: dict[str, dict[str, list[float]]]
    virtual_ios: dict[str, int]  # per job: I/Os the virtual device served in its runs

    def median(self, device: str, job: str) -> float:
        return statistics.median(self.figures[device][job])

    def round_ratios(self, job: str) -> list[float]:
        return [v / b if b else 0.0
                for b, v in zip(self.figures["builtin"][job], self.figures["virtual"][job],
                                strict=True)]


def cpu_seconds(pid: int) -> float:
    """CPU time of a process (all threads) from /proc/PID/task/*/schedstat, ns resolution."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total / 1e9


def _needed(path: Path) -> list[str]:
    out = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True,
                         check=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


def fio_archive(arch: str) -> Path:
    """A gzip'd cpio with fio, its loader and its needed libraries under /opt/fio (cached)."""
    base = dirs().cache / "bench"
    out = base / f"fio-{arch}.cpio.gz"
    if out.exists():
        return out
    debarch = DEBIAN_ARCH[arch]
    archive = debpkg.DebianArchive(base / "apt", SUITES, [debarch])
    archive.update(debpkg.find_mirror())
    files = archive.resolve([f"fio:{debarch}"])
    debs = debpkg.download(files, dirs().debs)
    tree = Path(tempfile.mkdtemp(prefix="fio-", dir=base))
    try:
        for deb in debs:
            debpkg.extract(deb, tree)
        # some libraries live in subdirectories (ceph/); index every file of the closure by name
        index = {p.name: p for p in tree.rglob("*.so*") if p.is_file() or p.is_symlink()}

        def find(name: str) -> Path:
            if name not in index:
                raise SystemExit(f"{name} not in the fio closure")
            return index[name].resolve()

        fio = tree / "usr/bin/fio"
        libs: dict[str, Path] = {}
        todo = _needed(fio)
        while todo:
            name = todo.pop()
            if name in libs:
                continue
            libs[name] = find(name)
            todo += _needed(libs[name])
        entries = [cpio.directory("opt"), cpio.directory(FIO_ROOT[1:]),
                   cpio.directory(f"{FIO_ROOT[1:]}/lib"),
                   cpio.regular(f"{FIO_ROOT[1:]}/fio", fio.read_bytes(), 0o755),
                   cpio.regular(f"{FIO_ROOT[1:]}/ld.so", find(LD_SO[arch]).read_bytes(), 0o755)]
        entries += [cpio.regular(f"{FIO_ROOT[1:]}/lib/{n}", p.read_bytes(), 0o755)
                    for n, p in sorted(libs.items())]
        tmp = out.with_suffix(".tmp")
        tmp.write_bytes(cpio.gzip_archive(entries))
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tree, ignore_errors=True)
    return out


def initrd(arch: str, work: Path) -> Path:
    """The built-in guest's initramfs + fio + the bench check, concatenated."""
    guest = ensure_guest(arch)
    check = cpio.gzip_archive([cpio.directory("checks"),
                               cpio.regular("checks/90-bench.sh", CHECK_SCRIPT.encode(), 0o755)])
    path = work / f"initrd-{arch}"
    path.write_bytes(guest.initramfs.read_bytes() + fio_archive(arch).read_bytes() + check)
    return path


def parse(console: str, rounds: int) -> Figures:
    """Per-round figures (IOPS for 4k, bytes/s for 1M) from the guest's BENCH lines."""
    figures: dict[str, dict[str, list[float]]] = {d: {j: [] for j in JOBS} for d in DEVICES}
    ios = dict.fromkeys(JOBS, 0)
    for _round, device, job, line in BENCH_LINE.findall(console):
        fields = line.split(";")
        value = (float(fields[TERSE_READ_IOPS]) if job == "randread"
                 else float(fields[TERSE_READ_BW_KIB]) * 1024)
        figures[device][job].append(value)
        if device == "virtual":
            block = 4096 if job == "randread" else MIB
            ios[job] += int(fields[TERSE_READ_KIB]) * 1024 // block
    if any(len(figures[d][j]) != rounds for d in DEVICES for j in JOBS):
        tail = "\n".join(console.splitlines()[-30:])
        raise SystemExit(f"fio figures missing on the console:\n{tail}")
    return Figures(figures, ios)


def boot(arch: str, rd: Path, device_args: list[str], seconds: int, rounds: int,
         work: Path, server_pid: int) -> tuple[str, dict[str, float]]:
    """Run the guest to its end; returns the console and the server's CPU seconds per job.

    The server works only while fio runs on the virtual device, so its CPU from the end of the
    run before such a run to the end of the run itself is that run's cost (boot I/O excluded).
    """
    guest = ensure_guest(arch)
    engine = find_engine()
    budget = seconds * rounds * len(JOBS) * len(DEVICES)
    append = protocol.kernel_cmdline(guest, selftest=True, cpus=CPUS, memory_mib=MEMORY_MIB,
                                     checks=["bench"],
                                     extra=(f"egpu.bench_seconds={seconds}",
                                            f"egpu.bench_rounds={rounds}",
                                            f"egpu.check_timeout={budget * 2 + 120}"))
    argv = [*engine.qemu(arch), "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", str(CPUS),
            "-object", f"memory-backend-memfd,id=ram0,size={MEMORY_MIB}M,share=on",
            "-machine", ("virt,highmem=on" if arch == "aarch64" else "q35")
            + ",memory-backend=ram0", "-m", f"{MEMORY_MIB}M",
            "-kernel", str(guest.kernel), "-initrd", str(rd), "-append", append, *device_args,
            "-display", "none", "-nodefaults", "-no-user-config", "-serial", "stdio", "-no-reboot"]
    console_path, errors_path = work / "console.log", work / "qemu.err"
    job_cpu = dict.fromkeys(JOBS, 0.0)
    with open(console_path, "wb") as out, open(errors_path, "wb") as err:
        proc = subprocess.Popen(argv, env={**os.environ, **engine.env()}, stdout=out,
                                stderr=err)
        deadline = time.monotonic() + budget * 2 + 600
        seen, mark = 0, cpu_seconds(server_pid)
        try:
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    raise SystemExit("the guest did not finish in time")
                time.sleep(CONSOLE_POLL_S)
                done = RUN_DONE_LINE.findall(console_path.read_text(errors="replace"))
                for device, job in done[seen:]:
                    now = cpu_seconds(server_pid)
                    if device == "virtual":
                        job_cpu[job] += now - mark
                    mark = now
                seen = len(done)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if proc.returncode != 0:
        raise SystemExit(f"QEMU failed: {errors_path.read_text(errors='replace')[-2000:]}")
    return console_path.read_text(errors="replace"), job_cpu


def run_both(arch: str, rd: Path, backing_b: Path, backing_v: Path, size_mib: int,
             seconds: int, rounds: int, work: Path, shadow: bool
             ) -> tuple[Figures, dict[str, float]]:
    """Boot once with both controllers; returns the figures and the server's CPU per job."""
    sock = work / "nvme.sock"
    log = open(work / "nvme.log", "wb")  # noqa: SIM115 - lives as long as the server
    server = subprocess.Popen([sys.executable, "-m", "egpu", "vfio-user", "serve", "-v", "--socket",
                               str(sock), "--function", "nvme", "-o", f"backing={backing_v}",
                               "-o", f"size={size_mib}M", "-o",
                               f"shadow_doorbells={'on' if shadow else 'off'}"],
                              stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"nvme server did not start: {(work / 'nvme.log').read_text()}")
            time.sleep(0.05)
        print(f"nvme server pid {server.pid} (profile with: py-spy record --pid {server.pid})",
              file=sys.stderr)
        virtual = {"driver": "vfio-user-pci", "socket": {"type": "unix", "path": str(sock)},
                   "addr": VIRTUAL_SLOT, "multifunction": True}
        args = ["-device", json_option(virtual),
                "-drive", option_string(None, {"file": backing_b.absolute(), "if": "none",
                                               "id": "n0", "format": "raw"}),
                "-device", option_string("nvme", {"drive": "n0", "serial": "builtin0",
                                                  "addr": BUILTIN_SLOT,
                                                  "dbcs": "on" if shadow else "off"})]
        console, cpu = boot(arch, rd, args, seconds, rounds, work, server.pid)
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
    # The server logs the guest's Doorbell Buffer Config: proof the guest driver used it.
    configured = "shadow doorbells at" in (work / "nvme.log").read_text(errors="replace")
    print(f"guest configured the server's shadow doorbells: {'yes' if configured else 'no'}",
          file=sys.stderr)
    return parse(console, rounds), cpu


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--arch", default="aarch64", choices=sorted(DEBIAN_ARCH))
    ap.add_argument("--seconds", type=int, default=5, help="fio runtime per job and round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (median is shown)")
    ap.add_argument("--size-mib", type=int, default=256, help="backing size of both devices")
    ap.add_argument("--quick", action="store_true", help="1 round of 2 s jobs on 16 MiB (smoke)")
    ap.add_argument("--shadow-doorbells", choices=("on", "off"), default="on",
                    help="Doorbell Buffer Config on both devices (QEMU nvme's dbcs, the "
                         "server's shadow_doorbells)")
    args = ap.parse_args(argv)
    seconds, rounds, size_mib = ((2, 1, 16) if args.quick
                                 else (args.seconds, args.rounds, args.size_mib))
    if seconds < 1 or rounds < 1 or size_mib < 1:
        ap.error("--seconds, --rounds and --size-mib must be at least 1")
    with tempfile.TemporaryDirectory(prefix="egpu-bench-") as tmp:
        work = Path(tmp)
        rd = initrd(args.arch, work)
        backing_b, backing_v = work / "builtin.img", work / "virtual.img"
        # non-zero data so reads move real bytes; same content for both
        pattern = bytes(range(1, 256)) * (MIB // 255 + 1)
        with open(backing_b, "wb") as f:
            for _ in range(size_mib):
                f.write(pattern[:MIB])
        shutil.copyfile(backing_b, backing_v)
        figures, server_cpu = run_both(args.arch, rd, backing_b, backing_v, size_mib, seconds,
                                       rounds, work, args.shadow_doorbells == "on")
    rows = [("4k randread QD1 IOPS", "randread", 1.0, IOPS_TARGET),
            ("1M seq read MB/s", "read", 1e6, THROUGHPUT_TARGET)]
    print(f"arch={args.arch} accel=tcg fio runtime={seconds}s x {rounds} rounds, alternating "
          f"devices in one guest; backing={size_mib} MiB; "
          f"shadow doorbells {args.shadow_doorbells} on both")
    print(f"{'metric':24} {'built-in':>10} {'virtual':>10} {'ratio':>6} {'target':>7}  verdict"
          "  per-round ratios")
    for name, job, unit, target in rows:
        b, v = figures.median("builtin", job), figures.median("virtual", job)
        ratio = v / b if b else 0.0
        verdict = "pass" if ratio >= target else "FAIL"
        spread = " ".join(f"{r:.2f}" for r in figures.round_ratios(job))
        print(f"{name:24} {b / unit:10.1f} {v / unit:10.1f} {ratio:6.2f} {'>=' + str(target):>7}"
              f"  {verdict:7}  {spread}")
    per_io = [f"{JOB_LABELS[job]} {server_cpu[job] / figures.virtual_ios[job] * 1e6:.0f} us"
              f" ({figures.virtual_ios[job]} I/Os)" for job in JOBS if figures.virtual_ios[job]]
    print("nvme server CPU per I/O: " + ", ".join(per_io))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
