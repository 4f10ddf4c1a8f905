"""Golden argv for GPU paths apple and vfio, and the vfio command against the real QEMU."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from egpu.engine.argv import Disk, Firmware, VmSpec, build_argv
from egpu.engine.passthrough import (
    AppleDeviceBuild,
    apple_device_args,
    apple_plan,
    resolve_run,
    vfio_group_closure,
    vfio_plan,
)
from egpu.engine.qemu import DeviceProperty, Engine, EngineInfo
from egpu.errors import EngineError, HostError, UsageError
from egpu.host.address import PciAddress
from egpu.host.device import PciDevice
from egpu.host.facts import Discovery
from egpu.host.ioreg import parse_ioreg
from egpu.host.slots import resolve_passthrough
from egpu.host.sysfs import read_sysfs
from test_host_sysfs import T

FIXTURES = Path(__file__).parent / "fixtures" / "host"
QEMU = ["qemu-system-aarch64"]


def mac_devices(name: str = "ioreg-rtx-bound.plist") -> list[PciDevice]:
    return parse_ioreg((FIXTURES / name).read_bytes())


def usb_c_function(card: PciDevice) -> PciDevice:
    """The USB-C controller function some GPUs carry at .2 (class 0x0c0330), bound like fn 0."""
    a = card.address
    return replace(card, address=PciAddress(a.domain, a.bus, a.device, 2), device_id=0x1AD8,
                   class_code=0x0C0330, name="usb-c")


def spec(arch: str = "aarch64", **kw: object) -> VmSpec:
    base = dict(
        name="gpu", arch=arch, cpus=8, memory_mib=14336, accel="tcg",
        qmp_socket=Path("/v/qmp.sock"), console_socket=Path("/v/console.sock"),
        serial_log=Path("/v/serial.log"), ssh_port=2222,
    )
    base.update(kw)
    return VmSpec(**base)  # type: ignore[arg-type]


def test_apple_golden() -> None:
    sel = resolve_passthrough("08:00", mac_devices(), apple=True)
    assert sel.notices and "DART" in sel.notices[0]  # the audio function stays home
    plan = apple_plan((*sel.functions, usb_c_function(sel.functions[0])))
    vm = plan.apply(spec(
        firmware=Firmware(Path("/fw/AAVMF_CODE.fd"), Path("/v/efivars.fd")),
        boot_disk=Disk(Path("/v/overlay.qcow2"), "qcow2"),
    ))
    assert build_argv(QEMU, vm) == [
        "qemu-system-aarch64",
        "-name", "guest=gpu,process=egpu-gpu",
        "-accel", "hvf,tso=on",
        "-cpu", "host",
        "-smp", "8,sockets=1,cores=8,threads=1",
        "-object", "memory-backend-ram,id=pc.ram,size=14336M,prealloc=on,share=off",
        "-machine", "virt,highmem=on,memory-backend=pc.ram", "-m", "14336M",
        "-drive", "if=pflash,format=raw,unit=0,readonly=on,file=/fw/AAVMF_CODE.fd",
        "-drive", "if=pflash,format=raw,unit=1,file=/v/efivars.fd",
        "-boot", "menu=on,splash-time=0",
        "-drive", "file=/v/overlay.qcow2,format=qcow2,if=none,id=disk0,discard=unmap,"
                  "detect-zeroes=unmap",
        "-device", "virtio-blk-pci,drive=disk0,bootindex=0",
        "-netdev", "user,id=net0,hostfwd=tcp:127.0.0.1:2222-:22",
        "-device", "virtio-net-pci,netdev=net0,romfile=",
        "-device", "virtio-rng-pci",
        "-device", "vfio-apple-pci,host=08:00.0,host-root=pci-bridge2,addr=0x1e.0,"
                   "dma-companion=on,rombar=0,multifunction=on",
        "-device", "vfio-apple-pci,host=08:00.2,host-root=pci-bridge2,addr=0x1e.2,"
                   "dma-companion=on,rombar=0",
        "-device", "qemu-xhci,id=egpu-xhci",
        "-device", "usb-kbd,bus=egpu-xhci.0",
        "-device", "usb-tablet,bus=egpu-xhci.0",
        "-chardev", "socket,id=console,path=/v/console.sock,server=on,wait=off,"
                    "logfile=/v/serial.log,logappend=on",
        "-serial", "chardev:console",
        "-chardev", "socket,id=qmp,path=/v/qmp.sock,server=on,wait=off",
        "-qmp", "chardev:qmp",
        "-display", "none", "-nodefaults", "-no-user-config",
    ]


def test_apple_no_tso_and_single_function() -> None:
    sel = resolve_passthrough(None, mac_devices())  # auto: audio skipped
    plan = apple_plan(sel.functions, tso=False, usb_input=False)
    assert plan.accel == "hvf" and plan.accel_options == ()
    assert plan.devices == (("-device", "vfio-apple-pci,host=08:00.0,host-root=pci-bridge2,"
                                         "addr=0x1e.0,dma-companion=on,rombar=0"),)
    argv = build_argv(QEMU, plan.apply(spec(firmware=Firmware(Path("/c"), Path("/v")))))
    assert argv[argv.index("-accel") + 1] == "hvf"


def test_apple_lone_nonzero_function_becomes_function_0() -> None:
    card = resolve_passthrough("08:00.0", mac_devices(), apple=True).functions[0]
    assert apple_device_args([usb_c_function(card)]) == (
        ("-device", "vfio-apple-pci,host=08:00.2,host-root=pci-bridge2,addr=0x1e.0,"
                    "dma-companion=on,rombar=0"),
    )


def test_apple_needs_firmware_and_refuses_audio_and_repeats() -> None:
    devs = mac_devices()
    sel = resolve_passthrough("08:00", devs, apple=True)
    with pytest.raises(UsageError, match="UEFI"):
        apple_plan(sel.functions).apply(spec())
    audio = next(d for d in devs if d.is_audio)
    with pytest.raises(UsageError, match="DART"):
        apple_device_args([*sel.functions, audio])
    with pytest.raises(UsageError):
        apple_device_args([])
    with pytest.raises(UsageError, match="twice"):
        apple_device_args([sel.functions[0], sel.functions[0]])


def test_apple_two_egpus_on_two_root_ports_golden() -> None:
    sel = resolve_passthrough(None, mac_devices("ioreg-dual-egpu.plist"), apple=True)
    assert apple_device_args(sel.functions) == (
        ("-device", "vfio-apple-pci,host=01:00.0,host-root=pcic1-bridge,addr=0x1e.0,"
                    "dma-companion=on,rombar=0"),
        ("-device", "vfio-apple-pci,host=01:00.0,host-root=pcic2-bridge,addr=0x1d.0,"
                    "dma-companion=on,rombar=0"),
    )


def test_apple_flat_dump_golden_has_no_host_root() -> None:
    sel = resolve_passthrough(None, mac_devices("ioreg-flat.plist"), apple=True)
    assert apple_device_args(sel.functions) == (
        ("-device", "vfio-apple-pci,host=08:00.0,addr=0x1e.0,dma-companion=on,rombar=0"),
    )


OLD_BUILD = AppleDeviceBuild(frozenset({"host", "dma-companion"}), "QEMU 10.0.0 (app Old.app)")


def test_apple_older_build_without_host_root() -> None:
    one = resolve_passthrough("08:00.0", mac_devices(), apple=True).functions
    assert apple_device_args(one, build=OLD_BUILD) == (
        ("-device", "vfio-apple-pci,host=08:00.0,addr=0x1e.0,dma-companion=on,rombar=0"),
    )
    # two cards at 01:00.0: the build cannot tell them apart, and the error names the build
    two = resolve_passthrough(None, mac_devices("ioreg-dual-egpu.plist"), apple=True).functions
    with pytest.raises(EngineError, match=r"QEMU 10\.0\.0 \(app Old\.app\).*host-root"):
        apple_device_args(two, build=OLD_BUILD)


def test_apple_dma_bounce_size_on_request_only_where_supported() -> None:
    one = resolve_passthrough("08:00.0", mac_devices(), apple=True).functions
    (arg,) = apple_device_args(one, dma_bounce_size=128 << 20)
    assert arg[1].endswith(",dma-bounce-size=134217728")
    with pytest.raises(EngineError, match=r"Old\.app.*dma-bounce-size"):
        apple_device_args(one, build=OLD_BUILD, dma_bounce_size=128 << 20)
    lacking = AppleDeviceBuild(frozenset({"host"}), "QEMU 9.2.0 (explicit /x)")
    with pytest.raises(EngineError, match="dma-companion"):
        apple_device_args(one, build=lacking)


def linux_devices(tmp_path: Path, *drivers: str) -> list[PciDevice]:
    return list(read_sysfs(T.build(tmp_path, T.host_functions(*drivers))).devices)


def vfio_golden_tail() -> list[str]:
    return [
        "-device", "pcie-root-port,id=egpu-rp0,chassis=1,slot=1",
        "-device", "vfio-pci,host=0000:01:00.0,bus=egpu-rp0,addr=0x0.0,multifunction=on",
        "-device", "vfio-pci,host=0000:01:00.1,bus=egpu-rp0,addr=0x0.1",
    ]


def test_vfio_golden(tmp_path: Path) -> None:
    devs = linux_devices(tmp_path)
    sel = resolve_passthrough(None, devs)  # auto skips audio, the group brings it back
    plan = vfio_plan(sel.functions, devs)
    assert plan.functions == ("0000:01:00.0", "0000:01:00.1")
    assert plan.notices and "01:00.1" in plan.notices[0]
    vm = plan.apply(spec("x86_64", kernel=Path("/g/vmlinuz"), initrd=Path("/g/initrd")))
    argv = build_argv(["qemu-system-x86_64"], vm)
    assert argv[:12] == [
        "qemu-system-x86_64", "-name", "guest=gpu,process=egpu-gpu", "-accel", "kvm",
        "-cpu", "host", "-smp", "8,sockets=1,cores=8,threads=1", "-machine", "q35", "-m",
    ]
    start = argv.index("virtio-rng-pci") + 1
    assert argv[start:start + 6] == vfio_golden_tail()
    assert "memory-backend" not in " ".join(argv)


def test_vfio_refuses_unbound_without_bind(tmp_path: Path) -> None:
    devs = linux_devices(tmp_path, "nvidia", "snd_hda_intel")
    sel = resolve_passthrough("01:00", devs, rebind=True)
    with pytest.raises(HostError, match="--bind"):
        vfio_plan(sel.functions, devs)
    assert vfio_plan(sel.functions, devs, bind=True).functions == ("0000:01:00.0", "0000:01:00.1")


def test_vfio_refuses_non_viable_group(tmp_path: Path) -> None:
    fns = T.host_functions()
    fns[2].group = 12  # the host's audio shares the card's group
    devs = list(read_sysfs(T.build(tmp_path, fns)).devices)
    gpu = next(d for d in devs if d.address.bdf == "01:00.0")
    with pytest.raises(HostError, match="not viable"):
        vfio_plan([gpu], devs, bind=True)


def test_vfio_group_closure_refuses_another_slot(tmp_path: Path) -> None:
    fns = T.host_functions()
    fns[2].group = 12
    fns[2].driver = None  # unbound: the kernel calls the group viable, egpu still refuses
    devs = list(read_sysfs(T.build(tmp_path, fns)).devices)
    gpu = next(d for d in devs if d.address.bdf == "01:00.0")
    with pytest.raises(HostError, match="another slot"):
        vfio_group_closure([gpu], devs)


def test_vfio_no_group(tmp_path: Path) -> None:
    fns = T.host_functions()
    for f in fns:
        f.group = None
    devs = list(read_sysfs(T.build(tmp_path, fns)).devices)
    gpu = next(d for d in devs if d.address.bdf == "01:00.0")
    with pytest.raises(HostError, match="no IOMMU group"):
        vfio_plan([gpu], devs)


def test_vfio_command_parses_in_real_qemu(tmp_path: Path) -> None:
    """QEMU accepts every option; the only error is the missing host device."""
    from egpu.engine.qemu import find_engine

    try:
        engine = find_engine()
    except EngineError as e:
        pytest.fail(f"the engine must be provisioned for this test (egpu setup): {e}")
    devs = linux_devices(tmp_path)
    plan = vfio_plan(resolve_passthrough("01:00", devs).functions, devs)
    # kvm is not usable on these machines (nested KVM crashed guests); the device options,
    # the part under test, parse the same under tcg.
    vm = plan.apply(spec("x86_64", ssh_port=None,
                         qmp_socket=tmp_path / "q.sock", console_socket=tmp_path / "c.sock",
                         serial_log=tmp_path / "s.log"))
    argv = build_argv(engine.qemu("x86_64"), vm)
    i = argv.index("-accel")
    argv[i + 1] = "tcg"
    argv[argv.index("-cpu") + 1] = "max"
    argv += ["-S"]  # never run guest code even if realize succeeded
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                          env={**engine.env(), "PATH": "/usr/bin:/bin"}, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1  # QEMU's exit status when a device fails to realize
    err = proc.stderr.strip()
    assert "vfio" in err and "0000:01:00.0" in err, err
    assert "no such host device" in err, err  # and not, say, "Property 'vfio-pci.x' not found"
    assert len(err.splitlines()) == 1, err


def mac_discovery(name: str = "ioreg-rtx-bound.plist") -> Discovery:
    return Discovery("macos", tuple(parse_ioreg((FIXTURES / name).read_bytes())))


def linux_discovery(tmp_path: Path, *drivers: str) -> Discovery:
    snap = read_sysfs(T.build(tmp_path, T.host_functions(*drivers)))
    return Discovery("linux", snap.devices, snap)


def test_run_auto_on_a_mac() -> None:
    r = resolve_run("auto", None, mac_discovery())
    assert r.path == "apple" and r.plan is not None
    assert r.plan.functions == ("0000:08:00.0",) and r.notices  # audio skipped, said so
    r = resolve_run("auto", "08:00", mac_discovery(), tso=False)
    assert r.plan is not None and r.plan.accel_options == () and len(r.plan.functions) == 1
    assert any("DART" in n for n in r.notices)


def test_run_auto_on_a_mac_with_two_egpus() -> None:
    r = resolve_run("auto", None, mac_discovery("ioreg-dual-egpu.plist"))
    assert r.path == "apple" and r.plan is not None
    apple = [d[1] for d in r.plan.devices if d[1].startswith("vfio-apple-pci")]
    assert [a.split(",")[1:4] for a in apple] == [
        ["host=01:00.0", "host-root=pcic1-bridge", "addr=0x1e.0"],
        ["host=01:00.0", "host-root=pcic2-bridge", "addr=0x1d.0"],
    ]
    assert r.selection.to_json()["slots"] == ["pcic1-bridge/01:00", "pcic2-bridge/01:00"]
    assert r.guard is not None and r.guard.assertion_argv(4242) == [
        "caffeinate", "-i", "-w", "4242"]


def test_run_plan_follows_the_probed_build() -> None:
    r = resolve_run("apple", "08:00.0", mac_discovery(), dma_bounce_size=64 << 20)
    old = EngineInfo(Engine("app", Path("/A/Old.app/Contents/MacOS"), bundle=Path("/A/Old.app")),
                     (10, 0, 0), ("aarch64",), {"aarch64": ("hvf",)},
                     {"aarch64": ("vfio-apple-pci",)},
                     {"vfio-apple-pci": (DeviceProperty("host", "str"),
                                         DeviceProperty("dma-companion", "bool", "true"))})
    with pytest.raises(EngineError, match=r"QEMU 10\.0\.0 \(app /A/Old\.app\).*dma-bounce-size"):
        r.for_engine(old)
    plain = resolve_run("apple", "08:00.0", mac_discovery()).for_engine(old)
    assert plain.plan is not None
    assert plain.plan.devices[0][1] == (
        "vfio-apple-pci,host=08:00.0,addr=0x1e.0,dma-companion=on,rombar=0")
    homebrew = replace(old, devices={"aarch64": ("vfio-pci",)}, properties={})
    with pytest.raises(EngineError, match="has no vfio-apple-pci"):
        resolve_run("apple", "08:00.0", mac_discovery()).for_engine(homebrew)


def test_allow_sleep_drops_the_power_assertion_only() -> None:
    r = resolve_run("apple", "08:00.0", mac_discovery(), allow_sleep=True)
    assert r.guard is not None and r.guard.power_assertion == () and r.guard.qos
    assert any("--allow-sleep" in n for n in r.notices)
    assert resolve_run("apple", "none", mac_discovery()).guard is None


def test_run_auto_without_a_ready_gpu_is_the_virtual_egpu(tmp_path: Path) -> None:
    r = resolve_run("auto", None, mac_discovery("ioreg-unbound.plist"))
    assert r.path == "user" and r.plan is None and r.selection.kind == "virtual"
    r = resolve_run("auto", None, linux_discovery(tmp_path, "nvidia", "snd_hda_intel"))
    assert r.path == "user"


def test_run_auto_on_linux_with_bind(tmp_path: Path) -> None:
    d = linux_discovery(tmp_path, "nvidia", "snd_hda_intel")
    r = resolve_run("auto", None, d, bind=True)
    assert r.path == "vfio" and r.plan is not None
    assert r.plan.functions == ("0000:01:00.0", "0000:01:00.1")


def test_run_explicit_gpu_paths(tmp_path: Path) -> None:
    d = mac_discovery()
    assert resolve_run("none", None, d).path == "none"
    assert resolve_run("auto", "none", d).path == "none"
    assert resolve_run("user", None, d).path == "user"
    assert resolve_run("auto", "virtual", d).path == "user"
    r = resolve_run("apple", "none", d)
    assert r.path == "apple" and r.plan is not None and r.plan.devices[:1] == (
        ("-device", "qemu-xhci,id=egpu-xhci"),)
    r = resolve_run("apple", None, mac_discovery("ioreg-unbound.plist"))
    assert r.path == "apple" and r.plan is not None and r.plan.functions == ()
    for path, spec in (("none", "08:00"), ("user", "08:00"), ("apple", "virtual"), ("x", None)):
        with pytest.raises(UsageError):
            resolve_run(path, spec, d)


def test_run_cross_os_dry_run(tmp_path: Path) -> None:
    linux = linux_discovery(tmp_path)
    r = resolve_run("apple", "0a:00.0", linux)
    assert r.plan is not None and r.plan.devices[0] == (
        "-device", "vfio-apple-pci,host=0a:00.0,addr=0x1e.0,dma-companion=on,rombar=0")
    r = resolve_run("apple", "pcic1-bridge/01:00.0", linux)
    assert r.plan is not None and "host-root=pcic1-bridge," in r.plan.devices[0][1]
    assert "assuming" in r.notices[0]
    with pytest.raises(UsageError, match="--ioreg"):
        resolve_run("apple", None, linux)
    r = resolve_run("vfio", "0000:03:00.0", mac_discovery())
    assert r.plan is not None and r.plan.functions == ("0000:03:00.0",)
    with pytest.raises(UsageError, match="--sysfs"):
        resolve_run("vfio", None, mac_discovery())


def test_run_vfio_explicit_on_linux(tmp_path: Path) -> None:
    d = linux_discovery(tmp_path)
    r = resolve_run("vfio", None, d)
    assert r.plan is not None and r.plan.functions == ("0000:01:00.0", "0000:01:00.1")
    assert any("same IOMMU group" in n for n in r.notices)
    assert resolve_run("vfio", "none", d).plan is not None
    with pytest.raises(HostError, match="no display device"):
        resolve_run("vfio", None, linux_discovery(tmp_path / "b", "nvidia", "snd_hda_intel"))


def test_apple_run_records_what_was_bound_at_start(tmp_path: Path) -> None:
    r = resolve_run("auto", "pcic1-bridge/01:00.0", mac_discovery("ioreg-dual-egpu.plist"),
                    dma_bounce_size=None)
    assert r.bound_at_start is not None and "pcic2-bridge/01:00.0" in r.bound_at_start
    assert resolve_run("apple", "0a:00.0", linux_discovery(tmp_path)).bound_at_start is None
