"""Overlays with the engine's real qemu-img, which VMs use which cached base, prune, reset,
and UEFI firmware lookup."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from egpu.errors import ImageError, NotFoundError, UsageError
from egpu.images.disk import plan_boot_disk, prepare_boot_disk
from egpu.images.firmware import UefiFirmware, ensure_vars, find_firmware
from egpu.images.overlay import (
    create_argv,
    create_overlay,
    disk_info,
    ensure_overlay,
    rebase_argv,
)
from egpu.images.qcow2 import read_backing_file
from egpu.images.reference import Digest
from egpu.images.store import ImageStore, overlay_bases
from egpu.paths import dirs
from egpu.process import ProcessRef
from egpu.vm import store as vm_store
from registry_server import (
    Registry,
    egpu,
    egpu_process,
    engine_tool,
    home,
    make_qcow2,
    push_reference_image,
    registry,
)

__all__ = ["home", "registry"]  # fixtures, imported so pytest sees them

BASE_MIB = 1
PATTERN = 0xAB
CLUSTER = 64 * 1024


@pytest.fixture(scope="module")
def tool() -> tuple[list[str], dict[str, str]]:
    return engine_tool("qemu-img")


@pytest.fixture(scope="module")
def bases(
    tmp_path_factory: pytest.TempPathFactory, tool: tuple[list[str], dict[str, str]]
) -> list[Path]:
    """Two real, different qcow2 bases."""
    work = tmp_path_factory.mktemp("bases")
    out = []
    for seed in (11, 12):
        path = work / f"base-{seed}.qcow2"
        path.write_bytes(make_qcow2(tool[0], tool[1], work, BASE_MIB, seed))
        out.append(path)
    return out


def qemu_io(overlay: Path, command: str) -> subprocess.CompletedProcess[str]:
    argv, env = engine_tool("qemu-io")
    return subprocess.run(
        [*argv, "-f", "qcow2", "-c", command, str(overlay)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=60,
    )


def to_raw(tool: tuple[list[str], dict[str, str]], image: Path, raw: Path) -> bytes:
    subprocess.run(
        [*tool[0], "convert", "-O", "raw", str(image), str(raw)],
        check=True,
        env={**os.environ, **tool[1]},
        capture_output=True,
    )
    return raw.read_bytes()


def test_argv() -> None:
    assert create_argv(["qemu-img"], Path("/c/base"), Path("/v/o.qcow2")) == [
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        "-b",
        "/c/base",
        "/v/o.qcow2",
    ]
    assert rebase_argv(["q"], Path("/n"), Path("/o"), unsafe=True) == [
        "q",
        "rebase",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        "-b",
        "/n",
        "-u",
        "/o",
    ]


def test_create_overlay(
    tmp_path: Path, tool: tuple[list[str], dict[str, str]], bases: list[Path]
) -> None:
    overlay = tmp_path / "vm" / "overlay.qcow2"
    assert ensure_overlay(tool[0], bases[0], overlay, tool[1]) == "created"
    info = disk_info(tool[0], overlay, tool[1])
    assert info.format == "qcow2"
    assert info.backing_file == str(bases[0])
    assert info.virtual_size == disk_info(tool[0], bases[0], tool[1]).virtual_size
    assert read_backing_file(overlay) == bases[0]  # our own header parser agrees
    assert sorted(p.name for p in overlay.parent.iterdir()) == ["overlay.qcow2"]
    assert ensure_overlay(tool[0], bases[0], overlay, tool[1]) == "kept"
    # The guest sees the base through the overlay.
    assert to_raw(tool, overlay, tmp_path / "o.raw") == to_raw(tool, bases[0], tmp_path / "b.raw")


def test_rebase_keeps_what_the_guest_wrote(
    tmp_path: Path, tool: tuple[list[str], dict[str, str]], bases: list[Path]
) -> None:
    overlay = tmp_path / "overlay.qcow2"
    create_overlay(tool[0], bases[0], overlay, tool[1])
    w = qemu_io(overlay, f"write -P {PATTERN} {CLUSTER} {CLUSTER}")
    assert w.returncode == 0, w.stderr
    before = to_raw(tool, overlay, tmp_path / "before.raw")
    assert ensure_overlay(tool[0], bases[1], overlay, tool[1]) == "rebased"
    assert disk_info(tool[0], overlay, tool[1]).backing_file == str(bases[1])
    assert qemu_io(overlay, f"read -P {PATTERN} {CLUSTER} {CLUSTER}").returncode == 0
    # A safe rebase keeps exactly what the guest saw, on top of the new base.
    assert to_raw(tool, overlay, tmp_path / "after.raw") == before


def test_rebase_refused_when_old_base_is_gone(
    tmp_path: Path, tool: tuple[list[str], dict[str, str]], bases: list[Path]
) -> None:
    old = tmp_path / "old.qcow2"
    old.write_bytes(bases[0].read_bytes())
    overlay = tmp_path / "overlay.qcow2"
    create_overlay(tool[0], old, overlay, tool[1])
    old.unlink()
    with pytest.raises(ImageError, match=r"old base .* is gone") as e:
        ensure_overlay(tool[0], bases[1], overlay, tool[1])
    assert e.value.hint is not None and "reset" in e.value.hint
    assert read_backing_file(overlay) == old  # untouched


def test_create_overlay_failure_leaves_nothing(
    tmp_path: Path, tool: tuple[list[str], dict[str, str]]
) -> None:
    overlay = tmp_path / "vm" / "overlay.qcow2"
    with pytest.raises(ImageError, match="cannot create overlay"):
        create_overlay(tool[0], tmp_path / "missing.qcow2", overlay, tool[1])
    assert list(overlay.parent.iterdir()) == []


def test_disk_info_rejects_garbage(tmp_path: Path, tool: tuple[list[str], dict[str, str]]) -> None:
    junk = tmp_path / "junk"
    with pytest.raises(ImageError, match="cannot probe"):
        disk_info(tool[0], junk, tool[1])


# -- who uses which cached base; images and prune ---------------------------------------------


def make_vm(name: str, base: Path | None, tool: tuple[list[str], dict[str, str]]) -> vm_store.VmDir:
    vm = vm_store.VmDir(name)
    vm.path.mkdir(parents=True, exist_ok=True)
    vm.write_config(
        vm_store.VmConfig(
            name=name,
            arch="aarch64",
            cpus=1,
            memory_mib=256,
            accel="tcg",
            gpu_path="none", qemu="test QEMU",
            qemu_version="11.1.3",
            argv=["qemu-system-aarch64"],
        )
    )
    if base is not None:
        create_overlay(tool[0], base, vm.file(vm_store.OVERLAY), tool[1])
    return vm


def test_images_and_prune(
    home: Path, registry: Registry, tool: tuple[list[str], dict[str, str]], bases: list[Path]
) -> None:
    assert egpu("images").stderr.strip() == "no cached images (see 'egpu pull')"
    assert json.loads(egpu("images", "--json").stdout) == []
    disk_a, disk_b = bases[0].read_bytes(), bases[1].read_bytes()
    a = push_reference_image(registry.host, "egpu/used", "v1", disk_a)
    b = push_reference_image(registry.host, "egpu/unused", "v1", disk_b)
    for ref in (a.ref, b.ref):
        assert egpu("pull", "--quiet", ref).returncode == 0
    store = ImageStore()
    base_a = store.blob_path(Digest.parse(a.disk_digest))
    make_vm("vm1", base_a, tool)
    make_vm("vm2", base_a, tool)
    make_vm("plain", None, tool)  # no overlay: uses nothing
    assert overlay_bases(dirs().vms) == {"vm1": base_a, "vm2": base_a}

    listed = {i["ref"]: i for i in json.loads(egpu("images", "--json").stdout)}
    assert listed[a.ref]["used_by"] == ["vm1", "vm2"] and listed[a.ref]["path"] == str(base_a)
    assert listed[b.ref]["used_by"] == []
    assert "vm1, vm2" in egpu("images").stdout

    pruned = json.loads(egpu("prune", "--json").stdout)
    assert [p["ref"] for p in pruned] == [b.ref]
    assert not store.has_blob(Digest.parse(b.disk_digest))
    assert not store.has_blob(Digest.parse(b.manifest_digest))
    assert store.has_blob(Digest.parse(a.disk_digest)) and store.has_blob(
        Digest.parse(a.manifest_digest)
    )
    assert [i["ref"] for i in json.loads(egpu("images", "--json").stdout)] == [a.ref]

    # A new build under the same tag: the old base stays listed (and kept) while VMs use it.
    a2 = push_reference_image(registry.host, "egpu/used", "v1", disk_b)
    assert egpu("pull", "--quiet", a2.ref).returncode == 0
    listed2 = json.loads(egpu("images", "--json").stdout)
    assert {(i["ref"], i["disk_digest"], tuple(i["used_by"])) for i in listed2} == {
        (a.ref, a2.disk_digest, ()),
        (None, a.disk_digest, ("vm1", "vm2")),
    }
    assert egpu("prune").returncode == 0
    assert store.has_blob(Digest.parse(a.disk_digest))  # still used
    assert not store.has_blob(Digest.parse(a2.disk_digest))  # nobody used the new one yet
    assert egpu("prune").stderr.strip() == "nothing to prune"


# -- reset ------------------------------------------------------------------------------------


def test_reset(home: Path, tool: tuple[list[str], dict[str, str]], bases: list[Path]) -> None:
    vm = make_vm("vm1", bases[0], tool)
    vm.file(vm_store.EFI_VARS).write_bytes(b"vars")
    declined = egpu_process("reset", "vm1", input="n\n")  # a real prompt: no echo
    # a "no" is click's Abort, which the CLI reports like an interrupted command
    assert declined.returncode == 130 and declined.stderr.endswith("[y/N]: error: aborted\n")
    assert vm.file(vm_store.OVERLAY).exists() and vm.file(vm_store.EFI_VARS).exists()
    done = egpu("reset", "vm1", "--yes")
    assert done.returncode == 0, done.stderr
    assert not vm.file(vm_store.OVERLAY).exists() and not vm.file(vm_store.EFI_VARS).exists()
    assert vm.exists()  # the VM itself stays
    again = egpu("reset", "vm1", "--yes")
    assert again.returncode == 0, again.stderr
    assert again.stderr.strip() == "VM 'vm1' has no overlay or EFI vars to reset"
    missing = egpu("reset", "nope", "--yes")
    assert missing.returncode == 1 and missing.stderr.startswith("error: no VM named 'nope'")


# -- UEFI firmware ----------------------------------------------------------------------------


def test_firmware_from_engine(tmp_path: Path) -> None:
    from egpu.engine.qemu import find_engine

    fw = find_firmware(find_engine().firmware_dirs(), "aarch64")
    assert fw.code.is_file() and fw.vars_template.is_file()
    dest = tmp_path / "vm" / "efivars.fd"
    assert ensure_vars(fw, dest) == dest
    assert dest.stat().st_size == fw.vars_template.stat().st_size
    assert dest.stat().st_mode & 0o777 == 0o600
    with open(dest, "r+b") as f:  # the guest wrote a boot entry
        f.write(b"BOOT")
    ensure_vars(fw, dest)
    assert dest.read_bytes()[:4] == b"BOOT"  # kept, not re-copied


def test_firmware_lookup_errors(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no UEFI firmware for x86_64 in"):
        find_firmware([tmp_path], "x86_64")
    with pytest.raises(ImageError, match="no UEFI firmware is known for mips"):
        find_firmware([tmp_path], "mips")
    (tmp_path / "OVMF_CODE_4M.fd").write_bytes(b"c")
    (tmp_path / "OVMF_VARS_4M.fd").write_bytes(b"v")
    assert find_firmware([tmp_path / "none", tmp_path], "x86_64") == UefiFirmware(
        tmp_path / "OVMF_CODE_4M.fd", tmp_path / "OVMF_VARS_4M.fd"
    )


# -- the boot disk of `run --image` / `run --base` --------------------------------------------


def test_boot_disk_from_base(
    tmp_path: Path, tool: tuple[list[str], dict[str, str]], bases: list[Path]
) -> None:
    with pytest.raises(UsageError):
        plan_boot_disk(tmp_path / "o.qcow2")
    with pytest.raises(UsageError):
        plan_boot_disk(tmp_path / "o.qcow2", image="r.io/x", base=str(bases[0]))
    with pytest.raises(NotFoundError, match="no such file"):
        plan_boot_disk(tmp_path / "o.qcow2", base=str(tmp_path / "missing.qcow2"))
    raw = tmp_path / "user.raw"
    raw.write_bytes(bytes(1024 * 1024))
    plan = plan_boot_disk(tmp_path / "vm" / "overlay.qcow2", base=str(raw))
    done, action = prepare_boot_disk(plan, tool[0], tool[1])
    assert action == "created" and done.base_format == "raw"
    assert disk_info(tool[0], done.overlay, tool[1]).backing_file == str(raw)
    assert raw.read_bytes() == bytes(1024 * 1024)  # the user's disk is never written


def test_boot_disk_from_image(
    home: Path, registry: Registry, tool: tuple[list[str], dict[str, str]], bases: list[Path]
) -> None:
    first = push_reference_image(registry.host, "egpu/boot", "v1", bases[0].read_bytes())
    overlay = dirs().vms / "vm1" / vm_store.OVERLAY
    plan = plan_boot_disk(overlay, image=first.ref)
    assert not plan.cached and plan.ref == first.ref
    done, action = prepare_boot_disk(plan, tool[0], tool[1])  # pulls, then creates the overlay
    store = ImageStore()
    assert action == "created" and done.base == store.blob_path(Digest.parse(first.disk_digest))
    assert read_backing_file(overlay) == done.base

    again = plan_boot_disk(overlay, image=first.ref)
    assert again.cached and prepare_boot_disk(again, tool[0], tool[1])[1] == "kept"

    # A newer build is pulled: the next run rebases the overlay onto it.
    second = push_reference_image(registry.host, "egpu/boot", "v1", bases[1].read_bytes())
    assert egpu("pull", "--quiet", second.ref).returncode == 0
    done, action = prepare_boot_disk(plan_boot_disk(overlay, image=second.ref), tool[0], tool[1])
    assert action == "rebased"
    assert read_backing_file(overlay) == store.blob_path(Digest.parse(second.disk_digest))


def test_reset_refuses_a_live_vm(
    home: Path, tool: tuple[list[str], dict[str, str]], bases: list[Path]
) -> None:
    vm = make_vm("busy", bases[0], tool)
    # A process recorded as this VM's QEMU, with the identity egpu records for one it started.
    fake_qemu = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", str(vm.qmp_socket)]
    )
    try:
        ref = ProcessRef.of_popen(fake_qemu)
        assert ref is not None
        vm.write_process(vm_store.QEMU_PID, ref)
        proc = egpu("reset", "busy", "--yes")
        assert proc.returncode == 1
        assert proc.stderr.startswith("error: VM 'busy' is starting")
        assert "egpu stop busy" in proc.stderr
        assert vm.file(vm_store.OVERLAY).exists()
    finally:
        fake_qemu.kill()
        fake_qemu.wait()


def test_boot_disk_never_switches_images_under_a_vm(
    tmp_path: Path, tool: tuple[list[str], dict[str, str]], bases: list[Path]
) -> None:
    overlay = tmp_path / "vm1" / "overlay.qcow2"
    first, _ = prepare_boot_disk(plan_boot_disk(overlay, base=str(bases[0])), tool[0], tool[1])
    assert first.source == str(bases[0])
    other = plan_boot_disk(overlay, base=str(bases[1]))
    with pytest.raises(ImageError, match=r"made from .*base-11") as e:
        prepare_boot_disk(other, tool[0], tool[1], previous_source=first.source)
    assert e.value.hint is not None and "egpu reset vm1" in e.value.hint
    assert read_backing_file(overlay) == bases[0]  # untouched
    # The same source again is fine (kept).
    again = plan_boot_disk(overlay, base=str(bases[0]))
    assert prepare_boot_disk(again, tool[0], tool[1], previous_source=first.source)[1] == "kept"
