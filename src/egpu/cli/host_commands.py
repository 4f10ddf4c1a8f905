"""Host commands: ``devices`` (what PCI functions this host has) and ``doctor`` (what blocks
passthrough). The ``--ioreg`` / ``--sysfs`` / ``--systemextensions`` options are shared with
``run`` through ``host_source_options`` and ``host_source``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.markup import escape

from egpu.cli import output
from egpu.engine.argv import parse_memory
from egpu.engine.passthrough import (
    DEFAULT_GPU_PATH,
    GPU_PATH_CHOICES,
    RunPassthrough,
    resolve_run,
)
from egpu.engine.qemu import (
    APPLE_DEVICE,
    Candidate,
    EngineInfo,
    app_bundle_id,
    choose_engine,
    host_machine,
    survey_engines,
)
from egpu.engine.safety import PANIC_RISK, GuestDrivers, guest_driver_problem
from egpu.errors import EgpuError, EngineError, HostError, UsageError
from egpu.host.device import PciDevice
from egpu.host.doctor import Check, blocking, run_checks
from egpu.host.facts import (
    Discovery,
    EngineCandidateFacts,
    EngineFacts,
    GuestDriverFacts,
    HostSource,
    dext_bundle_id,
    discover,
    gather_facts,
    live_platform,
)
from egpu.host.slots import bound_since_start, function_label
from egpu.images.reference import parse_reference
from egpu.images.store import ImageStore
from egpu.units import MIB
from egpu.vm import store
from egpu.vm.status import VmStatus, inspect

F = TypeVar("F", bound=Callable[..., Any])

DEVICE_COLUMNS = ("ADDRESS", "ID", "CLASS", "NAME", "DRIVER", "READY")
_STATUS_STYLE = {"ok": "green", "warn": "yellow", "fail": "red"}


def host_source_options(f: F) -> F:
    """Add ``--ioreg FILE``, ``--sysfs DIR`` and ``--systemextensions FILE`` to a command."""
    f = click.option(
        "--systemextensions", "systemextensions", default=None, metavar="FILE",
        type=click.Path(dir_okay=False, path_type=Path),
        help="read a saved `systemextensionsctl list` output (macOS)",
    )(f)
    f = click.option(
        "--sysfs", default=None, metavar="DIR", type=click.Path(path_type=Path),
        help="read a saved copy of /sys instead of this host's",
    )(f)
    f = click.option(
        "--ioreg", default=None, metavar="FILE", type=click.Path(path_type=Path),
        help="read a saved `ioreg -a -l` dump instead of this host's registry",
    )(f)
    return f


def host_source(
    ioreg: Path | None, sysfs: Path | None, systemextensions: Path | None = None
) -> HostSource:
    """The discovery source the options name (all None: the live host)."""
    return HostSource(ioreg=ioreg, sysfs=sysfs, systemextensions=systemextensions)


def passthrough_options(f: F) -> F:
    """Add ``--gpu`` (hidden alias ``--engine``), ``--passthrough``, ``--no-tso``, ``--bind``, the
    Mac safety options (``--force``, ``--allow-sleep``, ``--dma-bounce-size``), host sources."""
    f = host_source_options(f)
    f = click.option("--dma-bounce-size", default=None, metavar="SIZE",
                     help="apple: size of the guest's DMA bounce pool, e.g. 64M")(f)
    f = click.option("--allow-sleep", is_flag=True,
                     help="apple: let the Mac idle-sleep while the GPU runs (risky)")(f)
    f = click.option("--force", is_flag=True,
                     help="apple: pass a GPU to a guest without its driver (can panic macOS)")(f)
    f = click.option("--bind", is_flag=True,
                     help="vfio: rebind the devices to vfio-pci while the VM runs")(f)
    f = click.option("--no-tso", is_flag=True, help="apple: turn hvf's TSO mode off")(f)
    f = click.option(
        "--passthrough", default=None, metavar="[ROOT/]BB:DD[.F]|none|virtual",
        help="which GPU goes to the VM: [ROOT/]BB:DD[.F] "
        "[default: auto, the first ready display slot; on a Mac every eGPU]",
    )(f)
    # the GPU path's old name, before "engine" came to mean only the QEMU build
    f = click.option("--engine", "gpu_path_alias", type=click.Choice(GPU_PATH_CHOICES),
                     default=None, hidden=True)(f)
    f = click.option("--gpu", "gpu_path", type=click.Choice(GPU_PATH_CHOICES), default=None,
                     help=f"how the GPU reaches the VM [default: {DEFAULT_GPU_PATH}]")(f)
    return f


def chosen_gpu_path(gpu_path: str | None, gpu_path_alias: str | None) -> str:
    """The GPU path from ``--gpu`` or its hidden alias ``--engine`` (both: they must agree)."""
    if gpu_path and gpu_path_alias and gpu_path != gpu_path_alias:
        raise UsageError(f"--gpu {gpu_path} and --engine {gpu_path_alias} disagree",
                         hint="--engine is the old name of --gpu; give only --gpu")
    return gpu_path or gpu_path_alias or DEFAULT_GPU_PATH


def run_passthrough(
    gpu_path: str | None, passthrough: str | None, *, gpu_path_alias: str | None = None,
    ioreg: Path | None = None, sysfs: Path | None = None,
    systemextensions: Path | None = None, no_tso: bool = False, bind: bool = False,
    allow_sleep: bool = False, dma_bounce_size: str | None = None,
) -> RunPassthrough:
    """Discover devices (dump or live) and resolve the run's GPU path and passthrough plan.

    When live discovery is impossible (no /sys/bus/pci, an unsupported OS), an automatic
    choice falls back to the virtual eGPU instead of failing.
    """
    path = chosen_gpu_path(gpu_path, gpu_path_alias)
    source = host_source(ioreg, sysfs, systemextensions)
    try:
        found = discover(source)
    except HostError:
        if source.is_dump or (path in ("apple", "vfio") and passthrough in (None, "auto")):
            raise
        found = Discovery("macos" if live_platform() == "macos" else "linux", ())
    bounce = parse_memory(dma_bounce_size) * MIB if dma_bounce_size else None
    return resolve_run(path, passthrough, found, tso=not no_tso, bind=bind,
                       allow_sleep=allow_sleep, dma_bounce_size=bounce)


def guest_drivers(image: str | None, base: str | None) -> GuestDrivers:
    """What the images layer knows of the guest's drivers (features of a pulled image)."""
    if base is not None:
        return GuestDrivers(f"base disk {base}")
    if image is None:
        return GuestDrivers("the built-in guest", builtin=True)
    ref = str(parse_reference(image))
    record = ImageStore().get_ref(ref)
    if record is None:
        return GuestDrivers(f"image {ref} (not pulled yet)")
    features = (record.metadata or {}).get("features")
    if not isinstance(features, list):
        return GuestDrivers(f"image {ref}")
    return GuestDrivers(f"image {ref}", features=tuple(f for f in features if isinstance(f, str)))


def check_guest_drivers(gpu: RunPassthrough, guest: GuestDrivers, *, force: bool) -> RunPassthrough:
    """Refuse an apple run whose guest cannot drive its GPU, unless ``force`` (which warns)."""
    if gpu.path != "apple":
        return gpu
    problem = guest_driver_problem(gpu.selection.functions, guest)
    if problem is None:
        return gpu
    if not force:
        raise UsageError(
            f"refusing to pass the GPU: {problem}, and {PANIC_RISK}",
            hint="boot an image with the driver (egpu images built --with nvidia, or the "
            "docker/desktop images of scottjg/qemu-vfio-apple), or pass --force to take the risk",
        )
    return replace(gpu, notices=(*gpu.notices, f"--force: {problem}; {PANIC_RISK}"))


def engine_facts(
    info: EngineInfo | None, error: str | None, platform: str,
    candidates: Sequence[Candidate] = (),
) -> EngineFacts:
    """Reduce the engine layer's probe (and every candidate looked at) to plain values."""
    listed = tuple(
        EngineCandidateFacts(
            source=c.engine.source, path=str(c.engine.location),
            version=c.info.version_text if c.info else None,
            apple_properties=tuple(sorted(c.info.property_names(APPLE_DEVICE)))
            if c.info and c.info.has_device(APPLE_DEVICE) else None,
            chosen=c.chosen, reason=c.reason,
        )
        for c in candidates
    )
    if info is None:
        return EngineFacts(found=False, error=error, candidates=listed)
    arch = "aarch64" if platform == "macos" else host_machine()
    devices = info.devices.get(arch) or tuple(
        sorted({d for per_arch in info.devices.values() for d in per_arch})
    )
    bundle = info.engine.bundle
    return EngineFacts(
        found=True,
        version=info.version_text,
        source=info.engine.source,
        devices=tuple(devices),
        accelerators=tuple(info.accelerators.get(arch, ())),
        candidates=listed,
        app_bundle_id=app_bundle_id(bundle) if bundle else None,
    )


HOTPLUG_HINT = "restart the VM to attach it"


def late_gpus(devices: Sequence[PciDevice]) -> dict[str, list[str]]:
    """``ROOT/BB:DD.F`` of each GPU bound after an active apple VM started -> those VMs' names."""
    late: dict[str, list[str]] = {}
    for name in store.list_names():
        vm = store.VmDir(name)
        try:
            config = vm.read_config()
            active = config.gpu_bound_at_start is not None and inspect(vm).active
        except EgpuError:
            continue
        if not active or config.gpu_bound_at_start is None:
            continue
        for d in bound_since_start(devices, config.gpu_bound_at_start):
            late.setdefault(function_label(d), []).append(name)
    return late


def hotplug_notes(late: dict[str, list[str]]) -> list[str]:
    """One sentence per late GPU (passthrough is fixed at boot)."""
    return [
        f"{label} was bound to the driver extension after VM {', '.join(map(repr, vms))} "
        f"started; {HOTPLUG_HINT}"
        for label, vms in sorted(late.items())
    ]


def hotplug_for(statuses: Sequence[VmStatus], ioreg: Path | None = None) -> dict[str, list[str]]:
    """VM name -> notes on GPUs bound after it started (apple VMs that are up; macOS only)."""
    watching = [s for s in statuses if s.active and
                store.VmDir(s.name).read_config().gpu_bound_at_start is not None]
    if not watching or (ioreg is None and live_platform() != "macos"):
        return {}
    found = discover(HostSource(ioreg=ioreg))
    out: dict[str, list[str]] = {}
    for label, vms in late_gpus(found.devices).items():
        for vm in vms:
            out.setdefault(vm, []).extend(hotplug_notes({label: [vm]}))
    return out


def _device_row(d: Any) -> list[object]:
    return [
        d.address.bdf, f"{d.vendor_id:04x}:{d.device_id:04x}", d.kind, d.description or d.name,
        d.driver or "-", "yes" if d.passthrough_ready else "no",
    ]


@click.command()
@click.option("--json", "as_json", is_flag=True, help="JSON output")
@click.option("--all", "show_all", is_flag=True, help="include PCI bridges")
@host_source_options
def devices(
    as_json: bool, show_all: bool, ioreg: Path | None, sysfs: Path | None,
    systemextensions: Path | None,
) -> None:
    """List the host's PCI functions and whether each can be passed through."""
    found = discover(host_source(ioreg, sysfs, systemextensions))
    late = late_gpus(found.devices) if found.platform == "macos" else {}
    if as_json:
        output.emit_json([
            {**d.to_json(), "bound_after_start_of": late.get(function_label(d), [])}
            for d in found.devices
        ])
        return
    shown = [d for d in found.devices if show_all or not d.is_bridge]
    output.table(DEVICE_COLUMNS, [_device_row(d) for d in shown])
    for d in shown:
        # reasons and slow links go below the table: they are sentences, not cells
        if not d.passthrough_ready and not d.is_bridge:
            output.out.print(f"{d.address.bdf}: {escape(d.why_not or 'not ready')}")
        if d.link is not None and d.link.degraded and (d.is_display or d.is_audio):
            output.out.print(f"{d.address.bdf}: PCIe link {d.link.describe()}")
    hidden = len(found.devices) - len(shown)
    if hidden:
        output.notice(f"{hidden} PCI bridge(s) hidden (--all shows them)")
    if not any(d.passthrough_ready for d in found.devices):
        output.notice("no device is ready for passthrough; `egpu doctor` says why")
    for note in hotplug_notes(late):
        output.notice(note)


def _print_check(c: Check) -> None:
    style = _STATUS_STYLE[c.status]
    line = f"[{style}]{c.status:<4}[/{style}] {c.name:<16} {escape(c.message)}"
    if c.fix:
        line += f" [dim]-[/dim] {escape(c.fix)}"
    output.out.print(line)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="JSON output")
@click.option("--memory", default=None, metavar="SIZE",
              help="guest memory to check, e.g. 14G (a bare number is MiB)")
@click.option("--qemu", default=None, metavar="PATH",
              help="check this qemu-system binary, or a host app (X.app)")
@click.option("--image", default=None, metavar="REF", help="Mac: check this image's GPU driver")
@click.option("--base", default=None, metavar="PATH", help="Mac: check this local disk instead")
@host_source_options
def doctor(
    as_json: bool, memory: str | None, qemu: str | None, image: str | None, base: str | None,
    ioreg: Path | None, sysfs: Path | None, systemextensions: Path | None,
) -> None:
    """Check what real passthrough needs on this host; exit 1 when something blocks it."""
    guest = parse_memory(memory) * MIB if memory else None
    found_platform = "macos" if ioreg else "linux" if sysfs else None
    plat = found_platform or live_platform()
    need = APPLE_DEVICE if plat == "macos" else None
    info: EngineInfo | None = None
    error: str | None = None
    candidates = survey_engines(qemu, need, exhaustive=True)  # never provisions: doctor looks
    try:
        info = choose_engine(candidates, qemu, need)
    except EngineError as e:
        error = str(e)
    efacts = engine_facts(info, error, plat, candidates)
    source = HostSource(ioreg=ioreg, sysfs=sysfs, systemextensions=systemextensions,
                        bundle_id=dext_bundle_id(efacts.app_bundle_id))
    facts = gather_facts(source, engine=efacts, guest_memory=guest)
    if facts.platform == "macos":
        ready = tuple(d for d in facts.devices if d.passthrough_ready and d.is_display)
        drivers = guest_drivers(image, base)
        facts = replace(facts, guest=GuestDriverFacts(
            drivers.label, guest_driver_problem(ready, drivers)))
    checks = run_checks(facts)
    failed = blocking(checks)
    if as_json:
        output.emit_json({
            "ok": not failed,
            "platform": facts.platform,
            "source": facts.origin,
            "checks": [c.to_json() for c in checks],
            "engine_candidates": [c.to_json() for c in efacts.candidates],
            "dext_bundle_id": facts.dext_bundle_id,
            "gpus": [{"address": d.address.bdf, "root": d.root, "ready": d.passthrough_ready}
                     for d in facts.devices if d.is_display],
            "guest": {"label": facts.guest.label, "problem": facts.guest.problem}
            if facts.guest else None,
        })
    else:
        for c in checks:
            _print_check(c)
        if failed:
            output.notice("passthrough is blocked: fix the failed checks above")
    if failed:
        sys.exit(1)


def register(group: click.Group) -> None:
    """Add this module's commands to the root group."""
    group.add_command(devices)
    group.add_command(doctor)
