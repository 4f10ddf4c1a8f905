"""run --dry-run prints the exact command and starts or creates nothing.

Every test runs egpu in-process (InProcessCli): a dry run is what the command decides and
prints, and egpu's own ``main`` gives the exit codes and error lines a process would.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from conftest import Cli, InProcessCli
from egpu.images.store import ImageStore, RefRecord
from mac_app import Build, make_app


@pytest.fixture
def cli(inproc: InProcessCli) -> Cli:
    return inproc


@pytest.mark.parametrize("arch", ["aarch64", "x86_64"])
def test_dry_run_json_and_text_agree(inproc: InProcessCli, arch: str, tmp_path: Path) -> None:
    disk = tmp_path / "data.raw"
    disk.write_bytes(bytes(1 << 20))
    args = ("run", "--dry-run", "--arch", arch, "--accel", "tcg", "--cpus", "3",
            "--memory", "1G", "--name", "dr", "--disk", f"{disk}:ro", "--ssh-port", "2299",
            "--", "-device", "virtio-balloon-pci")
    argv = inproc.json(*args)["argv"]
    text = inproc(*args, check=True).stdout.strip()
    assert shlex.split(text) == argv
    joined = " ".join(argv)
    assert argv[argv.index("-m") + 1] == "1024M"
    assert argv[argv.index("-smp") + 1].startswith("3,")
    assert argv[argv.index("-accel") + 1].startswith("tcg")
    assert f"qemu-system-{arch}" in joined
    assert "hostfwd=tcp:127.0.0.1:2299-:22" in joined
    assert f"file={disk},format=raw,if=none,id=disk0,readonly=on" in argv
    assert argv[-2:] == ["-device", "virtio-balloon-pci"]
    assert "egpu.cpus=3 egpu.mem_mib=1024" in argv[argv.index("-append") + 1]
    assert not (inproc.home / "data" / "vms" / "dr").exists()


def test_dry_run_needs_no_engine(inproc: InProcessCli, tmp_path: Path) -> None:
    env = {**inproc.env, "EGPU_CACHE": str(tmp_path / "empty"), "PATH": "/usr/bin:/bin"}
    argv = InProcessCli(env=env, home=inproc.home).json("run", "--dry-run")["argv"]
    assert argv[0] == "/usr/bin/qemu-system-aarch64"
    assert not (tmp_path / "empty").exists()  # nothing was downloaded or built


FIXTURES = Path(__file__).parent / "fixtures" / "host"


def test_dry_run_apple_from_a_registry_dump(inproc: InProcessCli) -> None:
    out = inproc.json("run", "--dry-run", "--gpu", "apple", "--memory", "14G", "--cpus", "8",
                   "--ioreg", str(FIXTURES / "ioreg-rtx-bound.plist"), "--passthrough", "auto",
                   "--force")
    argv = out["argv"]
    assert out["gpu"]["path"] == "apple"
    assert out["gpu"]["host_guard"] == {
        "power_assertion": ["caffeinate", "-i", "-w", "{qemu_pid}"], "qos": "user-interactive"}
    assert argv[argv.index("-accel") + 1] == "hvf,tso=on"
    assert argv[argv.index("-cpu") + 1] == "host"
    assert "memory-backend-ram,id=pc.ram,size=14336M,prealloc=on,share=off" in argv
    apple = [a for a in argv if a.startswith("vfio-apple-pci,")]
    assert apple and all("dma-companion=on,rombar=0" in a for a in apple)
    assert all(",addr=0x1e." in a for a in apple)
    pflash = [a for a in argv if a.startswith("if=pflash")]
    assert len(pflash) == 2 and "readonly=on" in pflash[0]
    assert pflash[1].endswith("/data/vms/default/efivars.fd")


def test_dry_run_apple_no_tso(inproc: InProcessCli) -> None:
    argv = inproc.json("run", "--dry-run", "--gpu", "apple", "--no-tso",
                    "--passthrough", "03:00.0", "--force")["argv"]
    assert argv[argv.index("-accel") + 1] == "hvf"
    assert "vfio-apple-pci,host=03:00.0,addr=0x1e.0,dma-companion=on,rombar=0" in " ".join(argv)


def test_dry_run_with_a_malformed_dump_is_one_line(cli: Cli) -> None:
    proc = cli("run", "--dry-run", "--gpu", "apple",
               "--ioreg", str(FIXTURES / "ioreg-truncated.plist"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr  # a HostError
    assert len(proc.stderr.strip().splitlines()) == 1


def test_dry_run_apple_refuses_a_gpu_the_guest_cannot_drive(cli: Cli) -> None:
    dump = str(FIXTURES / "ioreg-rtx-bound.plist")
    proc = cli("run", "--dry-run", "--gpu", "apple", "--ioreg", dump)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "built-in guest has no NVIDIA GPU driver" in proc.stderr
    assert "kernel panic macOS" in proc.stderr and "--force" in proc.stderr
    forced = cli("run", "--dry-run", "--gpu", "apple", "--ioreg", dump, "--force", check=True)
    assert "--force: the built-in guest has no NVIDIA GPU driver" in forced.stderr
    assert "kernel panic macOS" in forced.stderr
    # no GPU, no rule
    cli("run", "--dry-run", "--gpu", "apple", "--passthrough", "none", check=True)


def _cached_image(cache: Path, ref: str, features: list[str]) -> None:
    """Record a pulled image in the real image store (its disk blob is not needed to plan)."""
    digest = "sha256:" + "ab" * 32
    ImageStore(cache / "images").write_ref(RefRecord(
        ref=ref, manifest_digest=digest, disk_digest=digest, size=1, file_name="disk.qcow2",
        layout="reference", metadata={"name": "x", "features": features}))


@pytest.mark.parametrize(("features", "ok"), [
    (["docker"], True), (["desktop"], True), (["nvidia"], True), ([], False), (["cuda"], False),
])
def test_dry_run_apple_image_features_decide(
    cli: Cli, tmp_path: Path, features: list[str], ok: bool
) -> None:
    cache = tmp_path / "cache"
    env = {**cli.env, "EGPU_CACHE": str(cache), "PATH": "/usr/bin:/bin"}
    ref = "ghcr.io/scottjg/qemu-vfio-apple-images:docker-latest"
    _cached_image(cache, ref, features)
    proc = InProcessCli(env=env, home=cli.home)(
        "run", "--dry-run", "--gpu", "apple", "--image", ref,
        "--ioreg", str(FIXTURES / "ioreg-rtx-bound.plist"))
    assert (proc.returncode == 0) == ok, proc.stderr
    if not ok:
        assert "has no NVIDIA GPU driver" in proc.stderr and "features" in proc.stderr


def test_dry_run_apple_two_egpus_and_allow_sleep(cli: Cli) -> None:
    out = cli.json("run", "--dry-run", "--gpu", "apple", "--force", "--allow-sleep",
                   "--ioreg", str(FIXTURES / "ioreg-dual-egpu.plist"))
    apple = [a for a in out["argv"] if a.startswith("vfio-apple-pci,")]
    assert apple == [
        "vfio-apple-pci,host=01:00.0,host-root=pcic1-bridge,addr=0x1e.0,dma-companion=on,rombar=0",
        "vfio-apple-pci,host=01:00.0,host-root=pcic2-bridge,addr=0x1d.0,dma-companion=on,rombar=0",
    ]
    assert out["gpu"]["host_guard"] == {"power_assertion": [], "qos": "user-interactive"}
    proc = cli("run", "--dry-run", "--gpu", "apple", "--force", "--passthrough", "01:00",
               "--ioreg", str(FIXTURES / "ioreg-dual-egpu.plist"))
    assert proc.returncode == 2 and "pcic1-bridge/01:00, pcic2-bridge/01:00" in proc.stderr


@pytest.mark.parametrize(("build", "expected"), [
    ("new", "vfio-apple-pci,host=08:00.0,host-root=pci-bridge2,addr=0x1e.0,dma-companion=on,"
            "rombar=0,dma-bounce-size=134217728"),
    ("old", None),
])
def test_dry_run_apple_with_an_app_bundle(
    cli: Cli, tmp_path: Path, build: Build, expected: str | None
) -> None:
    app = make_app(tmp_path, build)
    args = ("run", "--dry-run", "--json", "--gpu", "apple", "--force", "--qemu", str(app),
            "--ioreg", str(FIXTURES / "ioreg-rtx-bound.plist"), "--dma-bounce-size", "128M")
    proc = cli(*args)
    if expected is None:
        assert proc.returncode == 1 and "dma-bounce-size" in proc.stderr
        assert "QEMU 10.2.50" in proc.stderr and str(app) in proc.stderr
        # without the option the old build lacks
        argv = cli.json(*(a for a in args[:-2] if a != "--json"))["argv"]
        assert "vfio-apple-pci,host=08:00.0,addr=0x1e.0,dma-companion=on,rombar=0" in argv
    else:
        argv = json.loads(proc.stdout)["argv"]
        assert expected in argv
    assert argv[0] == str(app / "Contents/MacOS/qemu-system-aarch64")
    assert argv[1:3] == ["-L", str(app / "Contents/Resources/share/qemu")]
    code = next(a for a in argv if a.startswith("if=pflash") and "readonly=on" in a)
    assert code.endswith(str(app / "Contents/Resources/share/qemu/edk2-aarch64-code.fd"))
