"""Smoke run of bench/nvme_vs_builtin.py --quick so the benchmark does not rot.

Checks only that both devices produced figures and the table was printed; never the timing.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

# fio comes from Debian's archive the first time (then from the cache)
pytestmark = [pytest.mark.qemu, pytest.mark.download]

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "nvme_vs_builtin.py"
ROW = re.compile(r"^(4k randread QD1 IOPS|1M seq read MB/s)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)",
                 re.M)


def test_quick_run_prints_ratios(egpu_home: Path) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick"], capture_output=True,
                          text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    rows = ROW.findall(proc.stdout)
    assert {r[0] for r in rows} == {"4k randread QD1 IOPS", "1M seq read MB/s"}, proc.stdout
    for _, builtin, virtual, _ratio in rows:
        assert float(builtin) > 0 and float(virtual) > 0, proc.stdout
    cpu = re.search(r"^nvme server CPU per I/O: 4k randread (\d+) us \((\d+) I/Os\), "
                    r"1M read (\d+) us \((\d+) I/Os\)$", proc.stdout, re.M)
    assert cpu is not None, proc.stdout
    assert all(int(n) > 0 for n in cpu.groups()), proc.stdout
