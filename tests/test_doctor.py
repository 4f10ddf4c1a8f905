"""doctor: pure checks over HostFacts from fixtures, and the command's output and exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from egpu.errors import UsageError
from egpu.host.doctor import Check, blocking, run_checks
from egpu.host.facts import (
    DevVfio,
    EngineCandidateFacts,
    EngineFacts,
    GuestDriverFacts,
    HostFacts,
    HostSource,
    dext_bundle_id,
    gather_facts,
)
from egpu.host.ioreg import parse_ioreg
from egpu.host.sysext import parse_systemextensions
from egpu.host.sysfs import read_sysfs
from egpu.process import ProcessRef
from egpu.vm import store
from inprocess import run_main
from mac_app import make_app
from test_host_sysfs import T

FIXTURES = Path(__file__).parent / "fixtures" / "host"
GIB = 1 << 30
MAC_ENGINE = EngineFacts(True, "10.2.0", "explicit", ("vfio-apple-pci",), ("hvf",))
LINUX_ENGINE = EngineFacts(True, "11.1.3", "private", ("vfio-user-pci", "vfio-pci"), ("kvm",))


def mac(ioreg: str = "ioreg-rtx-bound.plist", sysext: str = "sysext-enabled.txt",
        **kw: object) -> HostFacts:
    devices = tuple(parse_ioreg((FIXTURES / ioreg).read_bytes()))
    dext = parse_systemextensions((FIXTURES / sysext).read_text(), "scottjg.VFIOUserHostApp."
                                  "VFIOUserPCIDriver")
    base = HostFacts(platform="macos", system="Darwin 24.1.0", machine="arm64", devices=devices,
                     dext=dext, engine=MAC_ENGINE, host_memory=32 * GIB, guest_memory=14 * GIB)
    return replace(base, **kw)  # type: ignore[arg-type]


def linux(tmp_path: Path, fns: list[object] | None = None, **kw: object) -> HostFacts:
    snap = read_sysfs(T.build(tmp_path, fns if fns is not None else T.host_functions(),
                              thunderbolt=kw.pop("thunderbolt", None)))
    base = HostFacts(
        platform="linux", system="Linux 6.12.0", machine="x86_64", devices=snap.devices,
        iommu_enabled=snap.iommu_enabled, vfio_pci_loaded=snap.vfio_pci_loaded,
        vfio_pci_available=True, dev_vfio=DevVfio(True, True, {12: True}),
        thunderbolt=snap.thunderbolt, engine=LINUX_ENGINE, host_memory=64 * GIB,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def statuses(f: HostFacts) -> dict[str, str]:
    return {c.name: c.status for c in run_checks(f)}


def test_healthy_mac() -> None:
    checks = run_checks(mac())
    s = {c.name: c.status for c in checks}
    assert s == {"os-cpu": "ok", "engine": "ok", "engine-candidates": "ok", "accelerator": "ok",
                 "driver-extension": "ok", "egpu": "ok", "root-ports": "ok",
                 "thunderbolt5": "ok", "bars": "ok", "pcie-link": "warn", "memory": "ok",
                 "guest-driver": "ok"}
    assert not blocking(checks)
    assert all(c.fix for c in checks if c.status != "ok")


@pytest.mark.parametrize(
    ("sysext", "status", "words"),
    [("sysext-waiting.txt", "fail", "System Settings"),
     ("sysext-none.txt", "fail", "Install the host app"),
     ("sysext-upgrade.txt", "ok", None)],
)
def test_extension_states(sysext: str, status: str, words: str | None) -> None:
    c = by_name(run_checks(mac(sysext=sysext)))["driver-extension"]
    assert c.status == status
    if words:
        assert words in (c.fix or "")


def test_unbound_egpu_fails() -> None:
    c = by_name(run_checks(mac("ioreg-unbound.plist")))["egpu"]
    assert c.status == "fail" and "08:00.0" in c.message and "match list" in (c.fix or "")


def test_tb5_and_data_center_gpu() -> None:
    c = by_name(run_checks(mac("ioreg-datacenter-tb5.plist")))
    assert c["thunderbolt5"].status == "warn" and "TB3 or TB4" in (c["thunderbolt5"].fix or "")
    assert c["egpu"].status == "ok" and "2330" in c["egpu"].message


def test_unassigned_bars_fail() -> None:
    c = by_name(run_checks(mac("ioreg-unassigned-bars.plist")))
    assert c["bars"].status == "fail" and "BAR1, BAR3" in c["bars"].message
    assert c["egpu"].status == "fail"


def test_intel_mac_and_missing_device_in_engine() -> None:
    c = by_name(run_checks(mac(machine="x86_64", engine=LINUX_ENGINE)))
    assert c["os-cpu"].status == "fail" and c["engine"].status == "fail"
    assert "vfio-apple-pci" in c["engine"].message
    c = by_name(run_checks(mac(engine=EngineFacts(False, error="no QEMU"))))
    assert c["engine"].status == "fail" and "--qemu" in (c["engine"].fix or "")


@pytest.mark.parametrize(("guest", "status"), [(8, "ok"), (28, "warn"), (32, "fail"), (40, "fail")])
def test_memory(guest: int, status: str) -> None:
    assert by_name(run_checks(mac(guest_memory=guest * GIB)))["memory"].status == status


def test_accelerator(tmp_path: Path) -> None:
    no_kvm = replace(LINUX_ENGINE, accelerators=("tcg",))
    c = by_name(run_checks(linux(tmp_path, engine=no_kvm)))["accelerator"]
    assert c.status == "fail" and "/dev/kvm" in (c.fix or "")
    c = by_name(run_checks(linux(tmp_path / "b", engine=no_kvm, from_dump=True)))["accelerator"]
    assert c.status == "warn"
    assert by_name(run_checks(mac()))["accelerator"].status == "ok"


def test_healthy_linux(tmp_path: Path) -> None:
    checks = run_checks(linux(tmp_path))
    s = {c.name: c.status for c in checks}
    assert s["iommu"] == s["vfio-pci"] == s["dev-vfio"] == s["egpu"] == s["iommu-group"] == "ok"
    assert not blocking(checks)


def test_linux_card_on_host_driver_warns_with_bind(tmp_path: Path) -> None:
    c = by_name(run_checks(linux(tmp_path, T.host_functions("nvidia", "snd_hda_intel"))))
    assert c["egpu"].status == "warn" and "--bind" in (c["egpu"].fix or "")


def test_linux_non_viable_group(tmp_path: Path) -> None:
    fns = T.host_functions("nvidia", "snd_hda_intel")
    fns[2].group = 12
    checks = run_checks(linux(tmp_path, fns))
    c = by_name(checks)
    assert c["iommu-group"].status == "fail" and "0000:00:1f.3" in c["iommu-group"].message
    assert c["egpu"].status == "fail" and blocking(checks)


def test_linux_iommu_off_and_no_vfio(tmp_path: Path) -> None:
    fns = T.host_functions("nvidia", "snd_hda_intel")
    for f in fns:
        f.group = None
    f = linux(tmp_path, fns, vfio_pci_available=False, vfio_pci_loaded=False,
              dev_vfio=DevVfio(False, False, {}))
    c = by_name(run_checks(f))
    assert c["iommu"].status == "fail" and "intel_iommu=on" in (c["iommu"].fix or "")
    assert c["vfio-pci"].status == "fail" and c["dev-vfio"].status == "fail"


def test_linux_dev_vfio_permissions(tmp_path: Path) -> None:
    c = by_name(run_checks(linux(tmp_path, dev_vfio=DevVfio(True, True, {12: False}))))
    assert c["dev-vfio"].status == "fail" and "/dev/vfio/12" in c["dev-vfio"].message
    c = by_name(run_checks(linux(tmp_path / "b", dev_vfio=DevVfio(True, False, {}))))
    assert c["dev-vfio"].status == "fail" and "udev" in (c["dev-vfio"].fix or "")


def test_linux_tb5_and_unauthorized(tmp_path: Path) -> None:
    tb5 = [T.Tb("0-1", "Dock", rx_speed="40.0 Gb/s")]
    c = by_name(run_checks(linux(tmp_path, thunderbolt=tb5)))
    assert c["thunderbolt5"].status == "warn" and "Dock" in c["thunderbolt5"].message
    locked = [T.Tb("0-1", "Core X", authorized=0)]
    c = by_name(run_checks(linux(tmp_path / "b", thunderbolt=locked)))
    assert c["thunderbolt5"].status == "warn" and "boltctl" in (c["thunderbolt5"].fix or "")


def test_gather_from_dumps(tmp_path: Path) -> None:
    f = gather_facts(HostSource(ioreg=FIXTURES / "ioreg-rtx-bound.plist",
                                systemextensions=FIXTURES / "sysext-waiting.txt"))
    assert f.platform == "macos" and f.from_dump and f.dext is not None
    assert f.dext.state == "waiting"
    T.build(tmp_path / "sys", T.host_functions())
    (tmp_path / "dev/vfio").mkdir(parents=True)
    (tmp_path / "dev/vfio/vfio").write_text("")
    f = gather_facts(HostSource(sysfs=tmp_path / "sys", dev=tmp_path / "dev"))
    assert f.platform == "linux" and f.iommu_enabled and f.dev_vfio is not None
    assert f.dev_vfio.container_exists and f.dext is None


def egpu(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in-process, in the test's environment: what it decides and prints."""
    return run_main(args, os.environ)


def test_cli_doctor_json_and_exit_codes(egpu_home: Path, tmp_path: Path) -> None:
    p = egpu("doctor", "--json", "--ioreg", str(FIXTURES / "ioreg-rtx-bound.plist"),
             "--systemextensions", str(FIXTURES / "sysext-waiting.txt"))
    assert p.returncode == 1, p.stderr
    doc = json.loads(p.stdout)
    assert doc["ok"] is False and doc["platform"] == "macos"
    checks = {c["name"]: c for c in doc["checks"]}
    assert checks["driver-extension"]["status"] == "fail" and checks["egpu"]["status"] == "ok"
    assert all({"name", "status", "message", "fix"} <= set(c) for c in doc["checks"])

    T.build(tmp_path, T.host_functions())
    p = egpu("doctor", "--sysfs", str(tmp_path))
    lines = p.stdout.splitlines()
    assert any(ln.startswith("ok   iommu ") for ln in lines), p.stdout
    assert any(ln.startswith("ok   egpu ") for ln in lines), p.stdout
    # this host's engine is not the dumped host's: never a failure on its account
    assert not any(ln.startswith("fail engine") for ln in lines)


def test_cli_doctor_bad_dump_is_one_line(egpu_home: Path) -> None:
    p = egpu("doctor", "--ioreg", str(FIXTURES / "ioreg-truncated.plist"))
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
    assert "not a readable plist" in p.stderr


def test_cli_devices(egpu_home: Path, tmp_path: Path) -> None:
    p = egpu("devices", "--json", "--ioreg", str(FIXTURES / "ioreg-rtx-bound.plist"))
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    gpu = next(d for d in doc if d["address"] == "08:00.0")
    assert gpu["passthrough_ready"] is True and gpu["class_code"] == "030000"
    assert all({"address", "vendor_id", "device_id", "class_code", "name", "driver",
                "passthrough_ready"} <= set(d) for d in doc)
    assert all("why_not" in d for d in doc if not d["passthrough_ready"])
    p = egpu("devices", "--ioreg", str(FIXTURES / "ioreg-unassigned-bars.plist"))
    assert p.returncode == 0 and "BAR1, BAR3 left unassigned" in p.stdout
    T.build(tmp_path, T.host_functions())
    p = egpu("devices", "--sysfs", str(tmp_path), "--all")
    assert p.returncode == 0 and "00:01.0" in p.stdout and "pcieport" in p.stdout
    for bad in (FIXTURES / "ioreg-foreign.plist", FIXTURES / "ioreg-malformed.plist"):
        p = egpu("devices", "--ioreg", str(bad))
        assert p.returncode == 1 and "Traceback" not in p.stderr and p.stderr.startswith("error:")


def test_passthrough_options_for_run(tmp_path: Path) -> None:
    """The options and resolver the run command reuses."""
    import click
    from click.testing import CliRunner

    from egpu.cli.host_commands import passthrough_options, run_passthrough
    from egpu.engine.passthrough import RunPassthrough

    seen: dict[str, RunPassthrough] = {}

    @click.command()
    @passthrough_options
    def fake_run(force: bool, **kw: object) -> None:
        seen["run"] = run_passthrough(**kw)  # type: ignore[arg-type]

    r = CliRunner().invoke(fake_run, ["--ioreg", str(FIXTURES / "ioreg-rtx-bound.plist"),
                                      "--passthrough", "08:00", "--no-tso"])
    assert r.exit_code == 0, r.output
    got = seen["run"]
    assert got.plan is not None
    assert got.path == "apple" and got.plan.accel_options == ()
    assert got.plan.functions == ("0000:08:00.0",)  # the extension refuses the audio function
    T.build(tmp_path, T.host_functions("nvidia", "snd_hda_intel"))
    r = CliRunner().invoke(fake_run, ["--sysfs", str(tmp_path), "--gpu", "vfio", "--bind"])
    assert r.exit_code == 0, r.output
    got = seen["run"]
    assert got.plan is not None
    assert got.path == "vfio" and len(got.plan.functions) == 2
    r = CliRunner().invoke(fake_run, ["--gpu", "bogus"])
    assert r.exit_code == 2


def test_engine_is_a_hidden_alias_of_gpu(tmp_path: Path) -> None:
    """``--engine`` (the GPU path's old name) still works, is not shown, and must agree."""
    import click
    from click.testing import CliRunner

    from egpu.cli import cli
    from egpu.cli.host_commands import passthrough_options, run_passthrough
    from egpu.engine.passthrough import RunPassthrough

    seen: dict[str, RunPassthrough] = {}

    @click.command()
    @passthrough_options
    def fake_run(force: bool, **kw: object) -> None:
        seen["run"] = run_passthrough(**kw)  # type: ignore[arg-type]

    T.build(tmp_path, T.host_functions("nvidia", "snd_hda_intel"))
    for args in (["--engine", "vfio"], ["--gpu", "vfio", "--engine", "vfio"]):
        r = CliRunner().invoke(fake_run, ["--sysfs", str(tmp_path), "--bind", *args])
        assert r.exit_code == 0, r.output
        assert seen.pop("run").path == "vfio"
    r = CliRunner().invoke(fake_run, ["--sysfs", str(tmp_path), "--gpu", "vfio",
                                      "--engine", "user"])
    # egpu's UsageError (exit 2 once the CLI's main prints it), not click's
    assert isinstance(r.exception, UsageError) and "disagree" in str(r.exception), r.output
    help_text = CliRunner().invoke(cli, ["run", "--help"]).output
    assert "--gpu" in help_text and "how the GPU reaches the VM" in help_text
    assert "--engine" not in help_text, help_text


NEW_APPLE = ("addr", "dma-bounce-size", "dma-companion", "host", "host-root")
OLD_APPLE = ("addr", "dma-companion", "host")


def candidates(*chosen_props: tuple[str, ...] | None) -> tuple[EngineCandidateFacts, ...]:
    return tuple(
        EngineCandidateFacts(src, f"/{src}", "10.2.50", props, i == 0, "why")
        for i, (src, props) in enumerate(zip(("app", "path"), chosen_props, strict=False))
    )


def test_engine_candidates_and_their_options() -> None:
    e = replace(MAC_ENGINE, candidates=candidates(NEW_APPLE, None))
    c = by_name(run_checks(mac(engine=e)))["engine-candidates"]
    assert c.status == "ok" and "*app /app" in c.message and "host-root" in c.message
    assert "-path /path: QEMU 10.2.50, no vfio-apple-pci" in c.message
    # an old build and two eGPUs on two root ports: it cannot tell them apart
    e = replace(MAC_ENGINE, candidates=candidates(OLD_APPLE))
    c = by_name(run_checks(mac("ioreg-dual-egpu.plist", engine=e)))["engine-candidates"]
    assert c.status == "warn" and "host-root" in (c.fix or "")


def test_root_ports_of_each_egpu() -> None:
    c = by_name(run_checks(mac("ioreg-dual-egpu.plist")))["root-ports"]
    assert c.status == "ok"
    assert "pcic1-bridge: 01:00.0" in c.message and "pcic2-bridge: 01:00.0" in c.message
    flat = by_name(run_checks(mac("ioreg-flat.plist")))["root-ports"]
    assert flat.status == "ok" and "?: 08:00.0" in flat.message


def test_dext_bundle_id_as_the_app_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EGPU_DEXT_BUNDLE_ID", raising=False)
    assert dext_bundle_id("com.example.App") == "com.example.App.VFIOUserPCIDriver"
    assert dext_bundle_id(None) == "scottjg.VFIOUserHostApp.VFIOUserPCIDriver"
    c = by_name(run_checks(mac(dext_bundle_id="com.example.App.VFIOUserPCIDriver")))
    assert c["driver-extension"].status == "warn"
    assert "com.example.App.VFIOUserPCIDriver" in c["driver-extension"].message
    c = by_name(run_checks(mac(sysext="sysext-none.txt",
                               dext_bundle_id="com.example.App.VFIOUserPCIDriver")))
    assert "com.example.App.VFIOUserPCIDriver" in c["driver-extension"].message


def test_guest_driver_check() -> None:
    c = by_name(run_checks(mac(guest=GuestDriverFacts("the built-in guest", "no driver"))))
    assert c["guest-driver"].status == "warn" and "panic macOS" in (c["guest-driver"].fix or "")
    c = by_name(run_checks(mac(guest=GuestDriverFacts("image x", None))))
    assert c["guest-driver"].status == "ok" and "image x" in c["guest-driver"].message


def test_cli_doctor_for_mac_users(egpu_home: Path, tmp_path: Path) -> None:
    other = egpu("doctor", "--json", "--qemu", str(make_app(tmp_path / "other")),
                 "--ioreg", str(FIXTURES / "ioreg-dual-egpu.plist"),
                 "--systemextensions", str(FIXTURES / "sysext-enabled.txt"))
    doc = json.loads(other.stdout)
    # the stand-in app's own bundle id names the extension: the default app's one warns
    assert doc["dext_bundle_id"] == "com.example.VFIOUserHostApp.VFIOUserPCIDriver"
    assert {c["name"]: c for c in doc["checks"]}["driver-extension"]["status"] == "warn"

    app = make_app(tmp_path, bundle_id="scottjg.VFIOUserHostApp")
    p = egpu("doctor", "--json", "--qemu", str(app),
             "--ioreg", str(FIXTURES / "ioreg-dual-egpu.plist"),
             "--systemextensions", str(FIXTURES / "sysext-enabled.txt"))
    doc = json.loads(p.stdout)
    checks = {c["name"]: c for c in doc["checks"]}
    (cand,) = doc["engine_candidates"]
    assert cand["chosen"] and cand["has_vfio_apple_pci"] and "host-root" in cand["properties"]
    assert doc["dext_bundle_id"] == "scottjg.VFIOUserHostApp.VFIOUserPCIDriver"
    assert checks["driver-extension"]["status"] == "ok"
    assert "pcic2-bridge: 01:00.0" in checks["root-ports"]["message"]
    assert checks["guest-driver"]["status"] == "warn"
    assert "built-in guest" in checks["guest-driver"]["message"]
    assert doc["guest"]["label"] == "the built-in guest"
    assert [g["root"] for g in doc["gpus"]] == ["pcic1-bridge", "pcic2-bridge"]
    tb5 = egpu("doctor", "--json", "--qemu", str(app),
               "--ioreg", str(FIXTURES / "ioreg-datacenter-tb5.plist"))
    tb5_checks = {c["name"]: c for c in json.loads(tb5.stdout)["checks"]}
    assert tb5_checks["thunderbolt5"]["status"] == "warn"


def test_gpu_bound_after_the_vm_started_says_restart(egpu_home: Path) -> None:
    # an apple VM that started with the first eGPU claimed; the second was bound later
    vm = store.VmDir("mac")
    vm.create()
    vm.write_config(store.VmConfig(
        name="mac", arch="aarch64", cpus=8, memory_mib=14336, accel="hvf",
        gpu_path="apple", qemu="app QEMU 10.2.50", qemu_version="10.2.50", argv=["qemu"],
        gpu_bound_at_start=["pcic1-bridge/01:00.0", "pcic1-bridge/01:00.1"],
    ))
    dump = str(FIXTURES / "ioreg-dual-egpu.plist")
    # a live process stands in for its QEMU (the VM reads as up while it runs)
    with subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                          stdin=subprocess.PIPE) as qemu:
        try:
            ref = ProcessRef.of_popen(qemu)
            assert ref is not None
            vm.write_process(store.QEMU_PID, ref)
            p = egpu("devices", "--ioreg", dump)
            assert p.returncode == 0, p.stderr
            assert ("pcic2-bridge/01:00.0 was bound to the driver extension after VM 'mac' "
                    "started; restart the VM to attach it") in p.stderr
            assert "pcic1-bridge/01:00.0 was bound" not in p.stderr
            doc = json.loads(egpu("devices", "--json", "--ioreg", dump).stdout)
            late = {f"{d['root']}/{d['address']}": d["bound_after_start_of"] for d in doc
                    if d["bound_after_start_of"]}
            assert late == {"pcic2-bridge/01:00.0": ["mac"]}
            st = json.loads(egpu("status", "mac", "--json", "--ioreg", dump).stdout)
            assert len(st["hotplug"]) == 1 and "pcic2-bridge/01:00.0" in st["hotplug"][0]
            text = egpu("status", "mac", "--ioreg", dump)
            assert "restart the VM to attach it" in text.stderr
        finally:
            assert qemu.stdin is not None
            qemu.stdin.close()
    # once the VM is down, nothing is late any more
    p = egpu("devices", "--ioreg", dump)
    assert "restart the VM" not in p.stderr
