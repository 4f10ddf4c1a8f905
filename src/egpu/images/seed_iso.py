"""Write a NoCloud seed as an ISO 9660 image labelled ``cidata`` (the edge around images/seed.py).

Plain ISO 9660 names are 8.3 upper case, so the files also get Rock Ridge and Joliet names:
Linux's isofs reads the Rock Ridge name (``user-data``), which is what cloud-init opens.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path

import pycdlib

from egpu import atomic
from egpu.images.seed import LABEL

ROCK_RIDGE_VERSION = "1.09"
JOLIET_LEVEL = 3
INTERCHANGE_LEVEL = 1  # 8.3 names: the ones any reader takes
ISO_VERSION_SUFFIX = ";1"
ISO_NAME_CHARS = 8


def iso_name(name: str) -> str:
    """The plain ISO 9660 name of a seed file: ``user-data`` -> ``/USERDATA.;1``."""
    stem = "".join(c for c in name.upper() if c.isalnum())[:ISO_NAME_CHARS]
    return f"/{stem}.{ISO_VERSION_SUFFIX}"


def seed_iso_bytes(files: Mapping[str, bytes]) -> bytes:
    """The ISO image holding ``files`` (name -> content) at its root."""
    names = [iso_name(n) for n in files]
    if len(set(names)) != len(names):
        raise ValueError(f"seed file names collide in ISO 9660: {sorted(files)}")
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=INTERCHANGE_LEVEL, joliet=JOLIET_LEVEL,
            rock_ridge=ROCK_RIDGE_VERSION, vol_ident=LABEL)
    try:
        for name, data in files.items():
            iso.add_fp(io.BytesIO(data), len(data), iso_name(name), rr_name=name,
                       joliet_path=f"/{name}")
        out = io.BytesIO()
        iso.write_fp(out)
        return out.getvalue()
    finally:
        iso.close()


def write_seed_iso(path: Path, files: Mapping[str, bytes]) -> None:
    """Write the seed ISO to ``path`` atomically (0600: it holds the VM's login setup)."""
    atomic.write_bytes(path, seed_iso_bytes(files))  # mkstemp's 0600
