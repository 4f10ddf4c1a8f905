"""A full image run with its NoCloud seed, booted for real: the guest sees a block device
labelled cidata holding egpu's meta-data and the merged user-data, the VM records the login
user and key `egpu ssh` uses, and the instance-id and host key file live as long as the disk.

The image is the UEFI test image (the built-in guest behind systemd-boot), which has no
cloud-init: what cloud-init then does with the seed is not exercised here.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from conftest import Cli
from egpu.engine.qemu import find_engine
from egpu.guest.assets import ensure_guest
from egpu.images import seed
from egpu.vm import lifecycle
from guest_helpers import shell_command
from registry_server import free_port
from uefi_image import build_uefi_image

pytestmark = pytest.mark.qemu
BOOT_TIMEOUT_S = 180  # firmware, systemd-boot, then the guest: about 7 s here
MARKER = "marker-from-the-user"


@pytest.fixture(scope="module")
def image_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    engine = find_engine()
    guest = ensure_guest("aarch64")
    out = tmp_path_factory.mktemp("img") / "guest.qcow2"
    return build_uefi_image(engine.qemu_img(), engine.env(), guest, out)


def record(cli: Cli, name: str) -> dict[str, Any]:
    data = json.loads((cli.home / "data/vms" / name / "config.json").read_text())
    assert isinstance(data, dict)
    return data


def test_seeded_boot(cli: Cli, image_file: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"  # a user with no ~/.ssh: egpu makes its own key
    home.mkdir()
    user = Cli(env={**cli.env, "HOME": str(home)}, home=cli.home)
    user_file = tmp_path / "ci.yaml"
    user_file.write_text(f"#cloud-config\nhostname: not-this\nruncmd:\n- [echo, {MARKER}]\n")
    port = free_port()
    proc = user("run", "--name", "seeded", "--base", str(image_file), "--gpu", "none",
                "--accel", "tcg", "--detach", "--ssh-port", str(port),
                "--cloud-init", str(user_file), "--quiet", timeout=300)
    assert proc.returncode == 0, proc.stderr
    cli.wait_for("seeded", lambda s: s["guest_ready"], timeout=BOOT_TIMEOUT_S)
    vm = cli.home / "data/vms/seeded"
    config = record(cli, "seeded")
    key = cli.home / "data/ssh/id_ed25519"
    assert config["ssh_user"] == seed.login_user(lifecycle.host_user())
    assert config["ssh_key"] == str(key) and stat.S_IMODE(key.stat().st_mode) == 0o600
    assert config["seed_instance_id"].startswith(seed.INSTANCE_ID_PREFIX)
    assert f"file={vm}/seed.iso,format=raw,if=none,id=seed,readonly=on" in config["argv"]

    # in the guest: a block device labelled cidata whose files are the seed egpu wrote
    pub = (key.parent / "id_ed25519.pub").read_text().split()[1]
    # short, as typing into the UART under TCG is slow; vdb: the second virtio-blk disk. The
    # guest has no blkid: the label is read where blkid reads it, the volume identifier of
    # the primary volume descriptor (ISO 9660: sector 16 of 2048 bytes, offset 40)
    shell_command(vm, b"until grep -qw iso9660 /proc/filesystems;do sleep 1;done;mkdir /s;"
                  b"mount -t iso9660 -r /dev/vdb /s;cat /s/*;"
                  b"echo label=$(dd if=/dev/vdb bs=1 skip=32808 count=6)\n",
                  "label=cidata", timeout=240)
    text = (vm / "serial.log").read_text(errors="replace").replace("\r", "")
    shown = text[text.rindex("instance-id: " + config["seed_instance_id"]):]  # cat's output
    assert "local-hostname: seeded" in shown and "\nhostname: seeded\n" in shown
    assert MARKER in shown and "not-this" not in shown  # the user's file merged, hostname ours
    assert shown.count(pub) == 2  # for egpu's login user and the image's default user

    # egpu ssh: that user, that key alone, this VM's own known_hosts
    fake = tmp_path / "bin" / "ssh"
    fake.parent.mkdir()
    args = tmp_path / "argv.txt"
    fake.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {args}\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    env = {**user.env, "PATH": f"{fake.parent}{os.pathsep}{cli.env['PATH']}"}
    env.pop("EGPU_SSH_USER", None)
    assert Cli(env=env, home=cli.home)("ssh", "seeded", "id").returncode == 0
    argv = args.read_text().splitlines()
    assert argv[:6] == ["-p", str(port), "-i", str(key), "-o", "IdentitiesOnly=yes"]
    assert f"UserKnownHostsFile={vm}/known_hosts" in argv
    assert argv[-2:] == [f"{config['ssh_user']}@127.0.0.1", "id"]

    # the next run keeps the instance-id and the host key; a reset disk forgets the host key
    (vm / "known_hosts").write_text("[127.0.0.1]:1 ssh-ed25519 AAAA\n")
    user("stop", "seeded", "--force", check=True)
    again = user("run", "--name", "seeded", "--base", str(image_file), "--gpu", "none",
                 "--accel", "tcg", "--detach", "--ssh-port", str(port), "--quiet", timeout=300)
    assert again.returncode == 0, again.stderr
    assert record(cli, "seeded")["seed_instance_id"] == config["seed_instance_id"]
    assert (vm / "known_hosts").exists()
    user("stop", "seeded", "--force", check=True)
    user("reset", "seeded", "--yes", check=True)
    third = user("run", "--name", "seeded", "--base", str(image_file), "--gpu", "none",
                 "--accel", "tcg", "--detach", "--ssh-port", str(port), "--quiet", timeout=300)
    assert third.returncode == 0, third.stderr
    assert not (vm / "known_hosts").exists()
    user("stop", "seeded", "--force", check=True)
