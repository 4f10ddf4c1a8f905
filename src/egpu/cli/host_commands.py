"""Host commands: ``devices`` (what PCI functions this host has) and ``doctor`` (what blocks
passthrough). The ``--ioreg`` / ``--sysfs`` / ``--systemextensions`` options are shared with
``run`` through ``host_source_options`` and ``host_source``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.markup import escape

from egpu.cli import output
from egpu.engine.argv import parse_memory
from egpu.engine.passthrough import ENGINE_CHOICES, RunPassthrough, resolve_run
from egpu.engine.qemu import EngineInfo, find_engine_info, host_machine
from egpu.errors import EngineError, HostError
from egpu.host.doctor import Check, blocking, run_checks
from egpu.host.facts import (
    Discovery,
    EngineFacts,
    HostSource,
    discover,
    gather_facts,
    live_platform,
)
from egpu.units import MIB

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
    """Add ``--engine``, ``--passthrough``, ``--no-tso``, ``--bind`` and the host-source options."""
    f = host_source_options(f)
    f = click.option("--bind", is_flag=True,
                     help="vfio: rebind the devices to vfio-pci while the VM runs")(f)
    f = click.option("--no-tso", is_flag=True, help="apple: turn hvf's TSO mode off")(f)
    f = click.option(
        "--passthrough", default=None, metavar="BB:DD[.F]|none|virtual",
        help="which GPU goes to the VM [default: auto, the first ready display slot]",
    )(f)
    f = click.option("--engine", "engine", type=click.Choice(ENGINE_CHOICES), default="auto",
                     show_default=True, help="how the GPU reaches the VM")(f)
    return f


def run_passthrough(
    engine: str, passthrough: str | None, *, ioreg: Path | None = None, sysfs: Path | None = None,
    systemextensions: Path | None = None, no_tso: bool = False, bind: bool = False,
) -> RunPassthrough:
    """Discover devices (dump or live) and resolve the run's engine and passthrough plan.

    When live discovery is impossible (no /sys/bus/pci, an unsupported OS), an automatic
    choice falls back to the virtual eGPU instead of failing.
    """
    source = host_source(ioreg, sysfs, systemextensions)
    try:
        found = discover(source)
    except HostError:
        if source.is_dump or (engine in ("apple", "vfio") and passthrough in (None, "auto")):
            raise
        found = Discovery("macos" if live_platform() == "macos" else "linux", ())
    return resolve_run(engine, passthrough, found, tso=not no_tso, bind=bind)


def engine_facts(info: EngineInfo | None, error: str | None, platform: str) -> EngineFacts:
    """Reduce the engine layer's probe to the plain values doctor checks."""
    if info is None:
        return EngineFacts(found=False, error=error)
    arch = "aarch64" if platform == "macos" else host_machine()
    devices = info.devices.get(arch) or tuple(
        sorted({d for per_arch in info.devices.values() for d in per_arch})
    )
    return EngineFacts(
        found=True,
        version=info.version_text,
        source=info.engine.source,
        devices=tuple(devices),
        accelerators=tuple(info.accelerators.get(arch, ())),
    )


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
    if as_json:
        output.emit_json(found.to_json())
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
@click.option("--qemu", default=None, metavar="PATH", help="check this qemu-system binary")
@host_source_options
def doctor(
    as_json: bool, memory: str | None, qemu: str | None, ioreg: Path | None,
    sysfs: Path | None, systemextensions: Path | None,
) -> None:
    """Check what real passthrough needs on this host; exit 1 when something blocks it."""
    source = host_source(ioreg, sysfs, systemextensions)
    guest = parse_memory(memory) * MIB if memory else None
    info: EngineInfo | None = None
    error: str | None = None
    try:
        info = find_engine_info(qemu)  # never provisions: doctor only looks
    except EngineError as e:
        error = str(e)
    found_platform = "macos" if ioreg else "linux" if sysfs else None
    facts = gather_facts(
        source,
        engine=engine_facts(info, error, found_platform or live_platform()),
        guest_memory=guest,
    )
    checks = run_checks(facts)
    failed = blocking(checks)
    if as_json:
        output.emit_json({
            "ok": not failed,
            "platform": facts.platform,
            "source": facts.origin,
            "checks": [c.to_json() for c in checks],
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
