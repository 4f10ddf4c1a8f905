"""The engine: probing the real provisioned QEMU, and provisioning from nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import Cli


def test_engine_json_reports_real_capabilities(cli: Cli) -> None:
    info = cli.json("engine")
    major, minor, _ = (int(x) for x in info["version"].split("."))
    assert (major, minor) >= (10, 1)
    assert set(info["arches"]) == {"aarch64", "x86_64"}
    for arch in info["arches"]:
        assert "tcg" in info["accelerators"][arch]
        assert "vfio-user-pci" in info["devices"][arch]
    where = Path(info["root"] or info["path"])
    assert where.is_dir()
    # the command egpu reports really runs
    version = subprocess.run([*info["command"]["aarch64"], "--version"], capture_output=True,
                             text=True, check=True, env={**os.environ}).stdout
    assert info["version"] in version


def test_engine_text_output(cli: Cli) -> None:
    text = cli("engine", check=True).stdout
    assert "QEMU" in text and "vfio-user-pci" in text and "aarch64" in text


@pytest.mark.download  # the engine's Debian packages, into a fresh cache
def test_provision_survives_interruption_and_is_idempotent(cli: Cli, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    env = {**cli.env, "EGPU_CACHE": str(cache), "PATH": "/usr/bin:/bin"}
    fresh = Cli(env=env, home=cli.home)
    proc = fresh.popen("engine", "--provision", "--quiet", stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, start_new_session=True)
    # interrupt it once it is downloading or unpacking
    deadline = time.monotonic() + 120
    debs = cache / "debs"
    while time.monotonic() < deadline and proc.poll() is None:
        if debs.is_dir() and sum(1 for _ in debs.iterdir()) >= 5:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "provisioning ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (cache / "engine" / "root" / ".egpu-engine.json").exists()

    info = fresh.json("engine", "--provision", "--quiet", timeout=600)
    assert info["source"] == "private"
    marker = cache / "engine" / "root" / ".egpu-engine.json"
    stamp = marker.stat().st_mtime_ns
    again = fresh.json("engine", "--provision", "--quiet")
    assert again["root"] == info["root"]
    assert marker.stat().st_mtime_ns == stamp  # nothing was redone
    assert not (cache / "engine" / "root.partial").exists()
    assert not any(p.name.endswith(".part") for p in (cache / "debs").iterdir())
