"""Engine and set-up commands: which QEMU runs, and provisioning what egpu needs."""

from __future__ import annotations

import click

from egpu.cli import output
from egpu.engine.qemu import EngineInfo, find_engine_info
from egpu.engine.select import ensure_engine_info
from egpu.guest.assets import ensure_guest


def _describe(info: EngineInfo) -> None:
    e = info.engine
    output.out.print(f"QEMU {info.version_text} ({e.source})", markup=False)
    output.out.print(f"  path          {e.root or e.bindir}", markup=False)
    for arch in info.arches:
        accels = ", ".join(info.accelerators.get(arch, ())) or "none"
        devices = ", ".join(info.devices.get(arch, ())) or "none"
        output.out.print(f"  {arch:13} accelerators: {accels}; passthrough devices: {devices}",
                         markup=False)


@click.command()
@click.option("--json", "as_json", is_flag=True)
@click.option("--qemu", default=None, metavar="PATH", help="use this qemu-system binary")
@click.option("--provision", is_flag=True, help="provision the private engine if none is usable")
@click.option("--quiet", "-q", is_flag=True)
def engine(as_json: bool, qemu: str | None, provision: bool, quiet: bool) -> None:
    """Show which QEMU egpu runs and what it can do here."""
    if provision:
        info = ensure_engine_info(qemu, progress=output.BarProgress(quiet=quiet or as_json))
    else:
        info = find_engine_info(qemu)
    if as_json:
        output.emit_json(info.to_json())
    else:
        _describe(info)


@click.command()
@click.option("--arch", "arches", multiple=True, default=("aarch64", "x86_64"),
              show_default=True, help="guest architectures to prepare")
@click.option("--quiet", "-q", is_flag=True)
def setup(arches: tuple[str, ...], quiet: bool) -> None:
    """Provision the engine and the built-in guests, so later runs start at once."""
    progress = output.BarProgress(quiet=quiet)
    info = ensure_engine_info(progress=progress)
    output.notice(f"engine: QEMU {info.version_text} ({info.engine.source})")
    for arch in arches:
        assets = ensure_guest(arch, progress)
        output.notice(f"guest {arch}: kernel {assets.kernel_version}")


def register(group: click.Group) -> None:
    """Add this module's commands to the root group."""
    group.add_command(engine)
    group.add_command(setup)
