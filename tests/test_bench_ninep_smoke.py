"""Smoke run of bench/ninep_vs_blk.py --quick so the benchmark does not rot.

Checks only that both sides produced figures and the table was printed; never the timing.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.qemu

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "ninep_vs_blk.py"
ROW = re.compile(r"^(virtio-blk|9p msize=\d+K)\s+([0-9.]+)", re.M)


def test_quick_run_prints_both_sides_and_the_ratio(egpu_home: Path) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick"], capture_output=True,
                          text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    rows = dict(ROW.findall(proc.stdout))
    assert set(rows) == {"virtio-blk", "9p msize=512K"}, proc.stdout
    assert all(float(v) > 0 for v in rows.values()), proc.stdout
    assert "ratio 9p/blk" in proc.stdout
