"""pci.ids parsing and descriptions on discovered devices."""

from __future__ import annotations

from pathlib import Path

from egpu.host.facts import HostSource, discover
from egpu.host.pciids import parse_pci_ids

FIXTURES = Path(__file__).parent / "fixtures" / "host"

SAMPLE = """\
# pci.ids excerpt, written in the database's documented format
10de  NVIDIA Corporation
\t2684  AD102 [GeForce RTX 4090]
\t\t10de 167c  GeForce RTX 4090 Founders Edition
\t2b85  GB202 [GeForce RTX 5090]
14e4  Broadcom Inc. and subsidiaries
\t4433  BCM4387 802.11ax Wireless
C 03  Display controller
\t00  VGA compatible controller
"""


def test_parse_and_describe() -> None:
    ids = parse_pci_ids(SAMPLE)
    assert ids.describe(0x10DE, 0x2684) == "NVIDIA Corporation AD102 [GeForce RTX 4090]"
    assert ids.describe(0x10DE, 0x9999) == "NVIDIA Corporation"
    assert ids.describe(0x1234, 0x0001) is None
    assert (0x10DE, 0x167C) not in ids.devices  # subsystems are not devices
    assert 0x03 not in ids.vendors  # the class section is not vendors


def test_garbage_lines_are_skipped() -> None:
    ids = parse_pci_ids("zzzz  nope\n\tabcd  orphan device\n10de  NVIDIA\n\tzz  bad\n")
    assert ids.vendors == {0x10DE: "NVIDIA"} and ids.devices == {}


def test_discovery_fills_descriptions() -> None:
    found = discover(HostSource(ioreg=FIXTURES / "ioreg-rtx-bound.plist"), parse_pci_ids(SAMPLE))
    gpu = next(d for d in found.devices if d.address.bdf == "08:00.0")
    assert gpu.description == "NVIDIA Corporation GB202 [GeForce RTX 5090]"
    assert gpu.name == "display" and gpu.to_json()["description"] == gpu.description
