"""The seed as real cloud-init reads it: Debian's cloud-init package (its Python code, run on
the host, never installed) reads the files egpu's ISO holds the way NoCloud reads a seed
directory, takes the user-data for a cloud-config, and validates it against its own schema
(strict). Booting an image with cloud-init inside is not done here."""

from __future__ import annotations

import io
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pycdlib
import pytest

from egpu import debpkg
from egpu.guest.assets import DEBIAN_ARCH, SUITES
from egpu.images import seed
from egpu.images.seed import SeedMount, SeedSpec
from egpu.images.seed_iso import seed_iso_bytes
from egpu.paths import dirs

pytestmark = pytest.mark.download  # the cloud-init package, once per cache
PACKAGE = "cloud-init"
LIB = "usr/lib/python3/dist-packages"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB jane@host"
USER_FILE = b"""#cloud-config
hostname: not-this
packages: [htop]
users:
- name: bob
  groups: [adm]
  shell: /bin/sh
runcmd:
- [touch, /run/from-the-user]
write_files:
- path: /etc/motd
  content: hello
timezone: Europe/Paris
"""
# runs inside cloud-init's own code: argv[1] its library, argv[2] a seed directory
PROBE = """
import json, sys
sys.path.append(sys.argv[1])
from cloudinit import util
from cloudinit.config.schema import get_schema, validate_cloudconfig_schema
from cloudinit.handlers import type_from_starts_with
md, ud, _, _ = util.read_seeded("file://" + sys.argv[2] + "/")
text = ud.decode()
cfg = util.load_yaml(text)
validate_cloudconfig_schema(cfg, get_schema(), strict=True)
print(json.dumps({"meta": md, "type": type_from_starts_with(text), "config": cfg}))
"""


@pytest.fixture(scope="module")
def cloud_init_lib() -> Path:
    """cloud-init's Python package from Debian, unpacked once into the cache (verified .deb)."""
    base = dirs().cache / "tests" / PACKAGE
    done = sorted(base.glob("root-*"))  # renamed in whole: present means complete
    if done:
        return done[-1] / LIB
    base.mkdir(parents=True, exist_ok=True)
    # the package is architecture "all": the host's own index lists it
    archive = debpkg.DebianArchive(base / "apt", SUITES, [DEBIAN_ARCH[platform.machine()]])
    archive.update(debpkg.find_mirror())
    deb = debpkg.download(archive.resolve_only([PACKAGE]), dirs().debs)[0]
    final = base / f"root-{deb.stem}"
    with tempfile.TemporaryDirectory(dir=base) as tree:
        debpkg.extract(deb, Path(tree) / "root")
        (Path(tree) / "root").rename(final)
    return final / LIB


def files_from_iso(data: bytes, out: Path) -> None:
    """What a guest's isofs shows: the Rock Ridge names and contents."""
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(data))
    try:
        for child in iso.list_children(rr_path="/"):
            name = child.rock_ridge.name().decode()
            if name not in (".", ".."):
                with (out / name).open("wb") as f:
                    iso.get_file_from_iso_fp(f, rr_path=f"/{name}")
    finally:
        iso.close()


def read_by_cloud_init(lib: Path, spec: SeedSpec, tmp: Path) -> dict[str, Any]:
    files_from_iso(seed_iso_bytes(seed.seed_files(spec)), tmp)
    proc = subprocess.run([sys.executable, "-c", PROBE, str(lib), str(tmp)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert isinstance(result, dict)
    return result


def test_cloud_init_reads_and_validates_the_seed(cloud_init_lib: Path, tmp_path: Path) -> None:
    theirs = seed.parse_user_cloud_config(USER_FILE, "user.yaml")
    spec = SeedSpec(hostname="web1", instance_id="iid-egpu-0123", user="jane",
                    public_keys=(KEY,), mounts=(SeedMount("home", "/mnt/home", True),),
                    user_data=theirs)
    result = read_by_cloud_init(cloud_init_lib, spec, tmp_path)
    assert result["meta"] == {"instance-id": "iid-egpu-0123", "local-hostname": "web1"}
    assert result["type"] == "text/cloud-config"
    config = result["config"]
    assert config["hostname"] == "web1"
    assert [u if isinstance(u, str) else u["name"] for u in config["users"]] == [
        "default", "jane", "bob"]
    assert config["mounts"] == [["home", "/mnt/home", "9p", "trans=virtio,version=9p2000.L,ro",
                                 "0", "0"]]
    assert config["timezone"] == "Europe/Paris"


def test_cloud_init_schema_check_can_fail(cloud_init_lib: Path, tmp_path: Path) -> None:
    # the probe is a real check: a cloud-config its schema refuses makes it fail
    spec = SeedSpec(hostname="web1", instance_id="iid", user="jane", public_keys=(KEY,),
                    user_data={"users": [{"name": 5}]})
    files_from_iso(seed_iso_bytes(seed.seed_files(spec)), tmp_path)
    proc = subprocess.run([sys.executable, "-c", PROBE, str(cloud_init_lib), str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "is not of type 'string'" in proc.stderr
