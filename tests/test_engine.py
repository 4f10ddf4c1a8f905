"""The engine: probing the real provisioned QEMU, and provisioning from nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import Cli, InProcessCli
from egpu.engine.qemu import (
    APPLE_DEVICE,
    choose_engine,
    find_engine_info,
    survey_engines,
)
from egpu.errors import EngineError
from mac_app import make_app, make_qemu_dir


@pytest.fixture
def cli(inproc: InProcessCli) -> Cli:
    """What ``egpu engine`` finds and prints, in-process (the interrupted provision runs one)."""
    return inproc

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


def test_app_bundle_engine_layout(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    info = find_engine_info(str(app), APPLE_DEVICE)
    e = info.engine
    assert e.bundle == app and e.bindir == app / "Contents/MacOS"
    assert e.qemu("aarch64") == [str(app / "Contents/MacOS/qemu-system-aarch64"),
                                 "-L", str(app / "Contents/Resources/share/qemu")]
    assert e.qemu_img() == [str(app / "Contents/MacOS/qemu-img")]
    assert e.firmware_dirs() == [app / "Contents/Resources/share/qemu"]
    assert info.to_json()["pci_ids"] == str(app / "Contents/Resources/pci.ids")
    assert info.version == (10, 2, 50)


def test_vfio_apple_pci_properties_of_two_builds(tmp_path: Path) -> None:
    new = find_engine_info(str(make_app(tmp_path / "n", "new")), APPLE_DEVICE)
    old = find_engine_info(str(make_app(tmp_path / "o", "old", version="10.0.0")), APPLE_DEVICE)
    assert {"host-root", "dma-bounce-size", "dma-companion"} <= new.property_names(APPLE_DEVICE)
    assert "host-root" not in old.property_names(APPLE_DEVICE)
    companion = {i.version: next(p for p in i.properties[APPLE_DEVICE] if p.name == "dma-companion")
                 for i in (new, old)}
    assert companion[(10, 2, 50)].default == "false" and companion[(10, 0, 0)].default == "true"


def test_a_qemu_without_vfio_apple_pci_is_never_chosen_for_apple(tmp_path: Path) -> None:
    brew = make_qemu_dir(tmp_path / "homebrew" / "bin", "homebrew", "11.2.0")
    with pytest.raises(EngineError, match=r"QEMU 11\.2\.0 .*has no vfio-apple-pci"):
        find_engine_info(str(brew), APPLE_DEVICE)
    # the app beats a newer QEMU on PATH that lacks the device; the skip is said
    apps = tmp_path / "Applications"
    make_app(apps, "new")
    cands = survey_engines(None, APPLE_DEVICE, exhaustive=True, apps=[apps])
    assert cands[0].chosen and cands[0].engine.source == "app"
    info = choose_engine(cands, None, APPLE_DEVICE)
    assert info.engine.source == "app"


def test_homebrew_on_path_is_skipped_with_a_notice(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    brew = make_qemu_dir(tmp_path / "brew", "homebrew", "11.2.0")
    monkeypatch.setenv("PATH", f"{brew}:/usr/bin:/bin")
    apps = tmp_path / "Applications"
    make_app(apps, "old", version="10.0.0")
    cands = survey_engines(None, APPLE_DEVICE, exhaustive=True, apps=[apps])
    by_source = {c.engine.source: c for c in cands}
    assert by_source["app"].chosen and not by_source["path"].chosen
    assert "has no vfio-apple-pci" in by_source["path"].reason
    info = choose_engine(cands, None, APPLE_DEVICE)
    assert any("skipping path QEMU" in n and str(brew) in n for n in info.notices)
    # nothing with the device at all: the error lists what was tried
    with pytest.raises(EngineError, match=str(brew)):
        choose_engine(survey_engines(None, APPLE_DEVICE, apps=[]), None, APPLE_DEVICE)


def test_engine_cli_lists_candidates(cli: Cli, tmp_path: Path) -> None:
    app = make_app(tmp_path)
    doc = cli.json("engine", "--for", "apple", "--qemu", str(app))
    assert doc["source"] == "explicit" and doc["bundle"] == str(app) and doc["need"] == APPLE_DEVICE
    (cand,) = doc["candidates"]
    assert cand["chosen"] and cand["has_vfio_apple_pci"] and "host-root" in cand["properties"]
    names = [p["name"] for p in doc["properties"][APPLE_DEVICE]]
    assert "dma-bounce-size" in names
    text = cli("engine", "--for", "apple", "--qemu", str(app), check=True).stdout
    assert "candidates:" in text and "vfio-apple-pci options:" in text and "host-root" in text
    brew = make_qemu_dir(tmp_path / "brew", "homebrew", "11.2.0")
    proc = cli("engine", "--for", "apple", "--qemu", str(brew))
    assert proc.returncode == 1 and "has no vfio-apple-pci" in proc.stderr
