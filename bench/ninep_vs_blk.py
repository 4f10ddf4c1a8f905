"""Benchmark: a shared folder (virtio-9p, as ``run --mount`` makes it) against virtio-blk, one run.

Boots the built-in guest once under TCG with a read-only share holding one file and a raw
virtio-blk disk holding the same bytes. In the guest a ``bench`` check reads the file over 9p
and the disk with ``dd bs=1M``, alternating for several rounds and dropping the guest's caches
before every read, so both see the same guest, the same host load and the same moment (the host
page cache holds both files throughout). Prints each side's median MiB/s, the ratio 9p/blk and
the per-round ratios (their spread is the run's noise).

    .venv/bin/python bench/ninep_vs_blk.py [--arch aarch64|x86_64] [--size-mib 256]
                                           [--rounds 3] [--msize BYTES ...] [--quick]

Several ``--msize`` values mount the share once per value (one guest, same rounds each).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import tempfile
from pathlib import Path

from egpu.engine.qemu import find_engine
from egpu.engine.qemu_options import option_string
from egpu.engine.shares import Share, share_args
from egpu.guest import cpio, protocol
from egpu.guest.assets import DEBIAN_ARCH, ensure_guest

MIB = 1 << 20
MEMORY_MIB = 512
CPUS = 2
SHARE_GUEST = "/mnt/bench"
DATA_FILE = "data.bin"
BLK_DEVICE = "/dev/vda"  # the only virtio-blk disk of this guest
BLK_SERIAL = "benchblk"
# Linux's 9p cache modes (Documentation/filesystems/9p.rst); egpu mounts with the default, none
CACHE_MODES = ("none", "readahead", "loose", "fscache", "mmap")
# BENCH ROUND SIDE MSIZE START END (seconds since the guest's boot, /proc/uptime: 10 ms ticks,
# against reads that take seconds under TCG)
BENCH_LINE = re.compile(r"^BENCH (\d+) (9p|blk) (\d+) ([\d.]+) ([\d.]+)\s*$", re.M)

CHECK_SCRIPT = f"""#!/bin/sh
# bench check (added by bench/ninep_vs_blk.py): dd over 9p and from the raw disk, alternating
rounds=${{EGPU_BENCH_ROUNDS:-3}}
mib=${{EGPU_BENCH_MIB:-256}}
msizes=$(echo "${{EGPU_BENCH_MSIZES:-{protocol.MOUNT_MSIZE}}}" | tr ',' ' ')
cache=${{EGPU_BENCH_CACHE:-}}
case "$cache" in ''|*[!a-z]*) cache= ;; *) cache=",cache=$cache" ;; esac
now() {{ cut -d' ' -f1 /proc/uptime; }}
umount {SHARE_GUEST} 2>/dev/null
r=1
while [ "$r" -le "$rounds" ]; do
    for msize in $msizes; do
        mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=$msize$cache egpu0 {SHARE_GUEST} || {{
            echo "CHECK bench fail cannot mount the share with msize=$msize"; exit 0; }}
        sync; echo 3 > /proc/sys/vm/drop_caches
        t0=$(now); dd if={SHARE_GUEST}/{DATA_FILE} of=/dev/null bs=1M 2>/dev/null; t1=$(now)
        echo "BENCH $r 9p $msize $t0 $t1"
        umount {SHARE_GUEST}
    done
    sync; echo 3 > /proc/sys/vm/drop_caches
    t0=$(now); dd if={BLK_DEVICE} of=/dev/null bs=1M count=$mib 2>/dev/null; t1=$(now)
    echo "BENCH $r blk 0 $t0 $t1"
    r=$((r + 1))
done
echo "CHECK bench ok $rounds rounds"
"""


def initrd(arch: str, work: Path) -> Path:
    """The built-in guest's initramfs with the bench check appended (a second cpio archive)."""
    guest = ensure_guest(arch)
    check = cpio.gzip_archive([cpio.directory("checks"),
                               cpio.regular("checks/90-bench.sh", CHECK_SCRIPT.encode(), 0o755)])
    path = work / f"initrd-{arch}"
    path.write_bytes(guest.initramfs.read_bytes() + check)
    return path


def boot(arch: str, rd: Path, share: Path, disk: Path, size_mib: int, rounds: int,
         msizes: list[int], cache: str | None) -> str:
    """One self-test boot running the bench check; the console text."""
    guest = ensure_guest(arch)
    engine = find_engine()
    budget = 60 + rounds * (len(msizes) + 1) * size_mib  # generous: TCG reads >= 1 MiB/s
    mounts = [protocol.GuestMount("egpu0", SHARE_GUEST, True)]
    append = protocol.kernel_cmdline(
        guest, selftest=True, cpus=CPUS, memory_mib=MEMORY_MIB, checks=["bench"], mounts=mounts,
        extra=(f"egpu.bench_rounds={rounds}", f"egpu.bench_mib={size_mib}",
               f"egpu.bench_msizes={','.join(map(str, msizes))}",
               f"egpu.check_timeout={budget}", *([f"egpu.bench_cache={cache}"] if cache else [])))
    argv = [*engine.qemu(arch), "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", str(CPUS),
            "-machine", "virt,highmem=on" if arch == "aarch64" else "q35",
            "-m", f"{MEMORY_MIB}M", "-kernel", str(guest.kernel), "-initrd", str(rd),
            "-append", append,
            *share_args([Share("egpu0", share, SHARE_GUEST, readonly=True)]),
            "-drive", option_string(None, {"file": disk, "if": "none", "id": "d0",
                                           "format": "raw", "readonly": True}),
            "-device", option_string("virtio-blk-pci", {"drive": "d0", "serial": BLK_SERIAL}),
            "-display", "none", "-nodefaults", "-no-user-config", "-serial", "stdio",
            "-no-reboot"]
    proc = subprocess.run(argv, env={**os.environ, **engine.env()}, capture_output=True,
                          timeout=budget + 600, check=False)
    console = proc.stdout.decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"QEMU failed: {proc.stderr.decode(errors='replace')[-2000:]}")
    return console


def parse(console: str, size_mib: int) -> dict[tuple[str, int], list[float]]:
    """MiB/s per (side, msize), one value per round, from the guest's BENCH lines."""
    out: dict[tuple[str, int], list[float]] = {}
    for _round, side, msize, t0, t1 in BENCH_LINE.findall(console):
        seconds = float(t1) - float(t0)
        out.setdefault((side, int(msize)), []).append(size_mib / seconds if seconds > 0
                                                      else float("inf"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--arch", default="aarch64", choices=sorted(DEBIAN_ARCH))
    ap.add_argument("--size-mib", type=int, default=256, help="size of the file read each time")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (median shown)")
    ap.add_argument("--msize", type=int, action="append", default=None,
                    help=f"9p msize to mount with (repeatable) [default: {protocol.MOUNT_MSIZE}]")
    ap.add_argument("--cache", default=None, choices=CACHE_MODES,
                    help="a 9p cache mode to compare [default: none, as egpu mounts]")
    ap.add_argument("--quick", action="store_true", help="1 round on 16 MiB (smoke)")
    args = ap.parse_args(argv)
    size_mib, rounds = (16, 1) if args.quick else (args.size_mib, args.rounds)
    msizes = args.msize or [protocol.MOUNT_MSIZE]
    if size_mib < 1 or rounds < 1 or any(m < 4096 for m in msizes):
        ap.error("--size-mib and --rounds must be at least 1, --msize at least 4096")
    with tempfile.TemporaryDirectory(prefix="egpu-bench-") as tmp:
        work = Path(tmp)
        share = work / "share"
        share.mkdir()
        data, disk = share / DATA_FILE, work / "disk.img"
        # the same non-zero bytes in both: reads move real data
        pattern = bytes(range(1, 256)) * (MIB // 255 + 1)
        for path in (data, disk):
            with open(path, "wb") as f:
                for _ in range(size_mib):
                    f.write(pattern[:MIB])
        console = boot(args.arch, initrd(args.arch, work), share, disk, size_mib, rounds, msizes,
                       args.cache)
    figures = parse(console, size_mib)
    blk = figures.get(("blk", 0), [])
    if len(blk) != rounds or any(len(figures.get(("9p", m), [])) != rounds for m in msizes):
        tail = "\n".join(console.splitlines()[-30:])
        raise SystemExit(f"dd figures missing on the console:\n{tail}")
    print(f"arch={args.arch} accel=tcg dd bs=1M of {size_mib} MiB x {rounds} rounds, "
          f"alternating in one guest, guest caches dropped before each read; "
          f"9p cache={args.cache or 'none'}")
    print(f"{'side':18} {'MiB/s (median)':>15} {'ratio 9p/blk':>13}  per-round MiB/s")
    print(f"{'virtio-blk':18} {statistics.median(blk):15.1f} {'':>13}  "
          + " ".join(f"{v:.1f}" for v in blk))
    for m in msizes:
        ninep = figures[("9p", m)]
        ratio = statistics.median(ninep) / statistics.median(blk)
        per_round = " ".join(f"{a / b:.2f}" for a, b in zip(ninep, blk, strict=True))
        print(f"{'9p msize=' + str(m // 1024) + 'K':18} {statistics.median(ninep):15.1f} "
              f"{ratio:13.2f}  " + " ".join(f"{v:.1f}" for v in ninep)
              + f"  (ratios {per_round})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
