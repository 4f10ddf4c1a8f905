"""Benchmark: NVMe through the virtual eGPU versus QEMU's built-in emulated ``nvme``, one run.

Boots the built-in guest twice under TCG with the same kernel, VM config and backing size: once
with ``-device nvme`` on a raw file, once with ``egpu vfio-user serve --function nvme`` attached
through ``vfio-user-pci``. In the guest, fio (Debian trixie's, with its shared-library closure,
appended to the initrd as an extra cpio archive) runs 4 KiB random read at QD1 and 1 MiB
sequential read with direct=1 against /dev/nvme0n1. Prints IOPS / throughput of both, the ratio
(targets: >= 0.5x IOPS, >= 0.8x throughput) and the device server's CPU time per I/O.

    .venv/bin/python bench/nvme_vs_builtin.py [--arch aarch64|x86_64] [--seconds S] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from egpu import debpkg
from egpu.engine.qemu import find_engine
from egpu.guest import cpio, protocol
from egpu.guest.assets import DEBIAN_ARCH, SUITES, ensure_guest
from egpu.paths import dirs

MIB = 1 << 20
SLOT = "0x10.0"
MEMORY_MIB = 512
CPUS = 2
IOPS_TARGET = 0.5
THROUGHPUT_TARGET = 0.8
LD_SO = {"aarch64": "ld-linux-aarch64.so.1", "x86_64": "ld-linux-x86-64.so.2"}
TRIPLET = {"aarch64": "aarch64-linux-gnu", "x86_64": "x86_64-linux-gnu"}
FIO_ROOT = "/opt/fio"
# fio terse v3 (0-based fields): 5 read KiB total, 6 read bandwidth KiB/s, 7 read IOPS
TERSE_READ_BW_KIB, TERSE_READ_IOPS, TERSE_READ_KIB = 6, 7, 5
BENCH_LINE = re.compile(r"^BENCH (\S+) (\S+)\s*$", re.M)

CHECK_SCRIPT = f"""#!/bin/sh
# bench check (added by bench/nvme_vs_builtin.py): fio on the first NVMe namespace
secs=${{EGPU_BENCH_SECONDS:-10}}
tries=0
while [ ! -b /dev/nvme0n1 ] && [ "$tries" -lt 600 ]; do tries=$((tries + 1)); usleep 100000; done
[ -b /dev/nvme0n1 ] || {{ echo "CHECK bench fail no /dev/nvme0n1"; exit 0; }}
fio() {{
    {FIO_ROOT}/ld.so --library-path {FIO_ROOT}/lib {FIO_ROOT}/fio "$@"
}}
for job in randread:4k read:1M; do
    rw=${{job%%:*}}; bs=${{job#*:}}
    out=$(fio --name="$rw" --filename=/dev/nvme0n1 --direct=1 --ioengine=psync --rw="$rw" \\
        --bs="$bs" --iodepth=1 --time_based --runtime="$secs" --output-format=terse \\
        --terse-version=3 2>&1) || {{ echo "CHECK bench fail fio: $(echo "$out" | tail -n 1)"; \\
        exit 0; }}
    echo "BENCH $rw $(echo "$out" | tail -n 1 | tr ' ' _)"
done
echo "CHECK bench ok"
"""


@dataclass
class Result:
    """One device's figures."""

    iops_4k: float
    bw_1m: float  # bytes/s
    ios: int
    server_cpu_s: float | None


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


def parse(console: str) -> tuple[float, float, int]:
    """(4k IOPS, 1M bytes/s, total I/Os) from the guest's BENCH lines."""
    found = {name: line.split(";") for name, line in BENCH_LINE.findall(console)}
    if set(found) != {"randread", "read"}:
        tail = "\n".join(console.splitlines()[-30:])
        raise SystemExit(f"no fio figures on the console:\n{tail}")
    r, s = found["randread"], found["read"]
    ios = int(r[TERSE_READ_KIB]) * 1024 // 4096 + int(s[TERSE_READ_KIB]) * 1024 // MIB
    return float(r[TERSE_READ_IOPS]), float(s[TERSE_READ_BW_KIB]) * 1024, ios


def boot(arch: str, rd: Path, device_args: list[str], seconds: int) -> str:
    guest = ensure_guest(arch)
    engine = find_engine()
    append = protocol.kernel_cmdline(guest, selftest=True, cpus=CPUS, memory_mib=MEMORY_MIB,
                                     checks=["bench"],
                                     extra=(f"egpu.bench_seconds={seconds}",
                                            f"egpu.check_timeout={seconds * 4 + 120}"))
    argv = [*engine.qemu(arch), "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", str(CPUS),
            "-object", f"memory-backend-memfd,id=ram0,size={MEMORY_MIB}M,share=on",
            "-machine", ("virt,highmem=on" if arch == "aarch64" else "q35")
            + ",memory-backend=ram0", "-m", f"{MEMORY_MIB}M",
            "-kernel", str(guest.kernel), "-initrd", str(rd), "-append", append, *device_args,
            "-display", "none", "-nodefaults", "-no-user-config", "-serial", "stdio", "-no-reboot"]
    proc = subprocess.run(argv, env={**os.environ, **engine.env()}, capture_output=True,
                          timeout=seconds * 4 + 600, check=False)
    console = proc.stdout.decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"QEMU failed: {proc.stderr.decode(errors='replace')[-2000:]}")
    return console


def run_builtin(arch: str, rd: Path, backing: Path, seconds: int) -> Result:
    args = ["-drive", f"file={backing},if=none,id=n0,format=raw",
            "-device", f"nvme,drive=n0,serial=egpu0,addr={SLOT}"]
    iops, bw, ios = parse(boot(arch, rd, args, seconds))
    return Result(iops, bw, ios, None)


def run_virtual(arch: str, rd: Path, backing: Path, size_mib: int, seconds: int,
                work: Path) -> Result:
    sock = work / "nvme.sock"
    log = open(work / "nvme.log", "wb")  # noqa: SIM115 - lives as long as the server
    server = subprocess.Popen([sys.executable, "-m", "egpu", "vfio-user", "serve", "--socket",
                               str(sock), "--function", "nvme", "-o", f"backing={backing}",
                               "-o", f"size={size_mib}M"], stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"nvme server did not start: {(work / 'nvme.log').read_text()}")
            time.sleep(0.05)
        print(f"nvme server pid {server.pid} (profile with: py-spy record --pid {server.pid})",
              file=sys.stderr)
        dev = {"driver": "vfio-user-pci", "socket": {"type": "unix", "path": str(sock)},
               "addr": SLOT, "multifunction": True}
        cpu0 = cpu_seconds(server.pid)
        console = boot(arch, rd, ["-device", json.dumps(dev)], seconds)
        cpu = cpu_seconds(server.pid) - cpu0
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
    iops, bw, ios = parse(console)
    return Result(iops, bw, ios, cpu)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--arch", default="aarch64", choices=sorted(DEBIAN_ARCH))
    ap.add_argument("--seconds", type=int, default=20, help="fio runtime per job")
    ap.add_argument("--size-mib", type=int, default=256, help="backing size of both devices")
    ap.add_argument("--quick", action="store_true", help="2 s jobs on 16 MiB (smoke run)")
    args = ap.parse_args(argv)
    seconds, size_mib = (2, 16) if args.quick else (args.seconds, args.size_mib)
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
        builtin = run_builtin(args.arch, rd, backing_b, seconds)
        virtual = run_virtual(args.arch, rd, backing_v, size_mib, seconds, work)
    rows = [("4k randread QD1 IOPS", builtin.iops_4k, virtual.iops_4k, IOPS_TARGET),
            ("1M seq read MB/s", builtin.bw_1m / 1e6, virtual.bw_1m / 1e6, THROUGHPUT_TARGET)]
    print(f"arch={args.arch} accel=tcg fio runtime={seconds}s backing={size_mib} MiB")
    print(f"{'metric':24} {'built-in':>10} {'virtual':>10} {'ratio':>6} {'target':>7}  verdict")
    for name, b, v, target in rows:
        ratio = v / b if b else 0.0
        verdict = "pass" if ratio >= target else "FAIL"
        print(f"{name:24} {b:10.1f} {v:10.1f} {ratio:6.2f} {'>=' + str(target):>7}  {verdict}")
    if virtual.server_cpu_s is not None and virtual.ios:
        print(f"nvme server CPU: {virtual.server_cpu_s:.2f} s for {virtual.ios} I/Os "
              f"({virtual.server_cpu_s / virtual.ios * 1e6:.0f} us/IO, includes boot)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
