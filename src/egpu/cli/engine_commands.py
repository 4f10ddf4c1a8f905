"""Engine and set-up commands: which QEMU runs, and provisioning what egpu needs."""

from __future__ import annotations

import click

from egpu.cli import output
from egpu.engine.qemu import (
    APPLE_DEVICE,
    Candidate,
    EngineInfo,
    choose_engine,
    survey_engines,
)
from egpu.engine.select import ensure_engine_info
from egpu.guest.assets import ensure_guest
from egpu.host.facts import live_platform

QEMU_FOR_GPU_PATHS = ("auto", "apple", "user")  # the GPU paths whose QEMU `egpu engine` finds


def _describe(info: EngineInfo) -> None:
    e = info.engine
    output.out.print(f"QEMU {info.version_text} ({e.source})", markup=False)
    output.out.print(f"  path          {e.location}", markup=False)
    for arch in info.arches:
        accels = ", ".join(info.accelerators.get(arch, ())) or "none"
        devices = ", ".join(info.devices.get(arch, ())) or "none"
        output.out.print(f"  {arch:13} accelerators: {accels}; passthrough devices: {devices}",
                         markup=False)
    for device, props in info.properties.items():
        names = ", ".join(p.name for p in props) or "none"
        output.out.print(f"  {device} options: {names}", markup=False)


def _describe_candidates(candidates: list[Candidate]) -> None:
    output.out.print("candidates:", markup=False)
    for c in candidates:
        mark = "*" if c.chosen else "-"
        output.out.print(f"  {mark} {c.engine.source:8} {c.engine.location}: {c.reason}",
                         markup=False)


def need_for(gpu_path: str) -> str | None:
    """The device a GPU path requires of QEMU (auto: apple's on a Mac)."""
    if gpu_path == "apple" or (gpu_path == "auto" and live_platform() == "macos"):
        return APPLE_DEVICE
    return None


@click.command()
@click.option("--json", "as_json", is_flag=True)
@click.option("--qemu", default=None, metavar="PATH",
              help="use this qemu-system binary, its directory, or a host app (X.app)")
@click.option("--for", "gpu_path", type=click.Choice(QEMU_FOR_GPU_PATHS), default="auto",
              show_default=True, help="which GPU path the QEMU is for (apple: vfio-apple-pci)")
@click.option("--provision", is_flag=True, help="provision the private engine if none is usable")
@click.option("--quiet", "-q", is_flag=True)
def engine(as_json: bool, qemu: str | None, gpu_path: str, provision: bool, quiet: bool) -> None:
    """Show which QEMU egpu runs, what it can do here, and every candidate it looked at."""
    need = need_for(gpu_path)
    if provision:
        ensure_engine_info(qemu, progress=output.BarProgress(quiet=quiet or as_json), need=need)
    candidates = survey_engines(qemu, need, exhaustive=True)
    info = choose_engine(candidates, qemu, need)  # the error names every candidate tried
    if as_json:
        output.emit_json({**info.to_json(), "need": need,
                          "candidates": [c.to_json() for c in candidates]})
    else:
        _describe(info)
        _describe_candidates(candidates)


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
