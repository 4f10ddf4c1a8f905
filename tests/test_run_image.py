"""`egpu run` with full images: pulled from a loopback registry or a local --base, booted
through UEFI from a per-VM overlay; images/reset/ssh see the VM."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from conftest import Cli
from egpu.engine.qemu import find_engine
from egpu.guest.assets import ensure_guest
from registry_server import Registry, free_port, push_reference_image, registry
from uefi_image import build_uefi_image

__all__ = ["registry"]  # the fixture, imported so pytest sees it

pytestmark = pytest.mark.qemu
BOOT_TIMEOUT_S = 180  # firmware, systemd-boot, then the guest: about 7 s here


@pytest.fixture(scope="module")
def image_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    engine = find_engine()
    guest = ensure_guest("aarch64")
    out = tmp_path_factory.mktemp("img") / "guest.qcow2"
    return build_uefi_image(engine.qemu_img(), engine.env(), guest, out)


def test_run_image_pulls_boots_and_shows_in_images(
    cli: Cli, registry: Registry, image_file: Path
) -> None:
    pushed = push_reference_image(registry.host, "egpu/full", "docker-latest",
                                  image_file.read_bytes(), file_name="guest.qcow2")
    port = free_port()
    proc = cli("run", "--name", "full", "--image", pushed.ref, "--gpu", "none",
               "--accel", "tcg", "--detach", "--ssh-port", str(port), "--quiet", timeout=300)
    assert proc.returncode == 0, proc.stderr
    status = cli.wait_for("full", lambda s: s["guest_ready"], timeout=BOOT_TIMEOUT_S)
    assert status["ssh_port"] == port
    config = json.loads((cli.home / "data/vms/full/config.json").read_text())
    argv = config["argv"]
    assert "-kernel" not in argv  # booted by the firmware from the disk
    assert any(a.startswith("if=pflash") and "efivars.fd" in a for a in argv)
    overlay = cli.home / "data/vms/full/overlay.qcow2"
    assert any(a.startswith(f"file={overlay},format=qcow2") for a in argv)

    images = cli.json("images")
    mine = [i for i in images if i["ref"] == pushed.ref]
    assert len(mine) == 1 and mine[0]["used_by"] == ["full"]
    base = Path(mine[0]["path"])
    cli("stop", "full", check=True)
    # the VM wrote only to its overlay: the cached base is still what was pulled
    assert "sha256:" + hashlib.sha256(base.read_bytes()).hexdigest() == pushed.disk_digest
    # prune keeps an image an overlay uses; reset removes the overlay, then prune can go
    cli("prune", check=True)
    assert base.exists()
    cli("reset", "full", "--yes", check=True)
    assert not overlay.exists() and not (cli.home / "data/vms/full/efivars.fd").exists()
    cli("prune", check=True)
    assert not base.exists()


def test_run_base_keeps_the_user_disk_untouched(cli: Cli, image_file: Path) -> None:
    before = hashlib.sha256(image_file.read_bytes()).hexdigest()
    mode = image_file.stat().st_mode
    port = free_port()
    proc = cli("run", "--name", "local", "--base", str(image_file), "--gpu", "none",
               "--accel", "tcg", "--detach", "--ssh-port", str(port), timeout=300)
    assert proc.returncode == 0, proc.stderr
    cli.wait_for("local", lambda s: s["guest_ready"], timeout=BOOT_TIMEOUT_S)
    cli("stop", "local", "--force", check=True)
    assert hashlib.sha256(image_file.read_bytes()).hexdigest() == before
    assert image_file.stat().st_mode == mode
    assert (cli.home / "data/vms/local/overlay.qcow2").exists()


def test_image_dry_run_defaults(cli: Cli) -> None:
    out = cli.json("run", "--dry-run", "--image", "--gpu", "none")
    argv = out["argv"]
    assert "user,id=net0,hostfwd=tcp:127.0.0.1:2222-:22" in argv  # qemu-vfio-apple's port
    assert "-kernel" not in argv and "-append" not in argv
    assert "virtio-blk-pci,drive=disk0,bootindex=0" in argv


def test_image_and_base_together_is_usage_error(cli: Cli, image_file: Path) -> None:
    proc = cli("run", "--image", "x/y:z", "--base", str(image_file))
    assert proc.returncode == 2 and "not both" in proc.stderr


def test_ssh_runs_the_client_against_the_loopback_forward(cli: Cli, tmp_path: Path) -> None:
    # no sshd in the built-in guest: a stand-in `ssh` on PATH records how egpu calls it
    port = free_port()
    assert cli("run", "--name", "sh", "--gpu", "none", "--accel", "tcg", "--detach",
               "--ssh-port", str(port)).returncode == 0
    fake = tmp_path / "bin" / "ssh"
    fake.parent.mkdir()
    record = tmp_path / "argv.json"
    fake.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {record}\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    env = {**cli.env, "PATH": f"{fake.parent}{os.pathsep}{cli.env['PATH']}"}
    assert Cli(env=env, home=cli.home)("ssh", "sh", "--user", "me", "uname", "-a").returncode == 0
    argv = record.read_text().splitlines()
    assert argv[:2] == ["-p", str(port)]
    assert argv[-3:] == ["me@127.0.0.1", "uname", "-a"]
    cli("stop", "sh", "--force", check=True)
    stopped = cli("ssh", "sh")
    assert stopped.returncode == 1 and "is stopped" in stopped.stderr
