"""Image commands: ``pull``, ``images``, ``prune``, ``reset``, ``image build``, ``image push``."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import click

from egpu.cli import output
from egpu.cli.interrupts import sigterm_interrupts
from egpu.engine.qemu import host_machine
from egpu.engine.select import ensure_engine_info
from egpu.errors import ConflictError
from egpu.guest.assets import ensure_guest
from egpu.images import profiles
from egpu.images.firmware import reset_disk_state
from egpu.images.pull import DEFAULT_IMAGE, default_client, pull
from egpu.images.store import ImageStore
from egpu.paths import dirs
from egpu.transfer import (
    DEFAULT_MIN_RATE,
    DEFAULT_STALL_WINDOW,
    MIN_RATE_ENV,
    STALL_TIMEOUT_ENV,
    StallPolicy,
)
from egpu.units import parse_size
from egpu.vm import store as vm_store
from egpu.vm.status import inspect

SHORT_DIGEST = 19  # "sha256:" + 12 hex digits


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


@click.command("pull")
@click.argument("ref", required=False, default=DEFAULT_IMAGE)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option(
    "--stall-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_STALL_WINDOW,
    show_default=True,
    envvar=STALL_TIMEOUT_ENV,
    show_envvar=True,
    metavar="SECONDS",
    help="Give up on a download slower than --min-rate for this long (it resumes next time).",
)
@click.option(
    "--min-rate",
    type=click.IntRange(min=0),
    default=DEFAULT_MIN_RATE,
    show_default=True,
    envvar=MIN_RATE_ENV,
    show_envvar=True,
    metavar="BYTES/S",
    help="The rate below which a download counts as stalled.",
)
def pull_command(
    ref: str, quiet: bool, as_json: bool, stall_timeout: float, min_rate: int
) -> None:
    """Download an image (default: scottjg/qemu-vfio-apple's docker-profile image) into the cache.

    REF is registry/repository[:tag|@sha256:digest]. An interrupted or stalled pull resumes.
    """
    progress = output.BarProgress(quiet=quiet or as_json)
    stall = StallPolicy(min_rate, stall_timeout)
    result = pull(ref, progress=progress, client_factory=partial(default_client, stall=stall))
    if as_json:
        output.emit_json(
            {
                "ref": result.ref,
                "digest": str(result.manifest_digest),
                "disk_digest": str(result.disk_digest),
                "path": str(result.path),
                "size": result.size,
                "file_name": result.file_name,
            }
        )
    elif not quiet:
        output.out.print(f"{result.ref}: {result.file_name} ({_size(result.size)})")
        output.out.print(f"  digest {result.manifest_digest}")
        output.out.print(f"  path   {result.path}")


@click.command("images")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
def images_command(as_json: bool) -> None:
    """List cached images and the VMs whose overlays use them."""
    images = ImageStore().images(dirs().vms, vm_store.OVERLAY)
    if as_json:
        output.emit_json([i.to_json() for i in images])
        return
    if not images:
        output.notice("no cached images (see 'egpu pull')")
        return
    rows = [
        (
            i.ref or "(older base)",
            i.digest[:SHORT_DIGEST],
            _size(i.size),
            ", ".join(i.used_by) or None,
            i.path,
        )
        for i in images
    ]
    output.table(("REF", "DIGEST", "SIZE", "USED BY", "PATH"), rows)


@click.command("prune")
@click.option("--json", "as_json", is_flag=True, help="Print what was removed as JSON.")
def prune_command(as_json: bool) -> None:
    """Delete cached images that no VM overlay uses."""
    removed = ImageStore().prune(dirs().vms, vm_store.OVERLAY)
    if as_json:
        output.emit_json([i.to_json() for i in removed])
        return
    for i in removed:
        output.out.print(f"removed {i.ref or i.disk_digest} ({_size(i.size)})")
    if not removed:
        output.notice("nothing to prune")


@click.command("reset")
@click.argument("name")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def reset_command(name: str, yes: bool) -> None:
    """Delete a VM's overlay and EFI vars: its next run starts from the pristine image."""
    vm = vm_store.VmDir(name).require()
    status = inspect(vm)
    if status.active:
        raise ConflictError(f"VM {name!r} is {status.state}",
                            hint=f"stop it first: egpu stop {name}")
    targets = [vm.file(f) for f in (vm_store.OVERLAY, vm_store.EFI_VARS) if vm.file(f).exists()]
    if not targets:
        output.notice(f"VM {name!r} has no overlay or EFI vars to reset")
        return
    if not yes:
        click.confirm(
            f"Delete {', '.join(t.name for t in targets)} of VM {name!r}? "
            "Everything written to its disk is lost",
            abort=True,
            err=True,
        )
    for path in reset_disk_state(vm.path, (vm_store.OVERLAY, vm_store.EFI_VARS)):
        output.out.print(f"removed {path}")


@click.group("image")
def image_group() -> None:
    """Build and publish disk images (UEFI-bootable Debian qcow2s, scottjg JSON)."""


@image_group.command("build")
@click.argument("profile", type=click.Choice(sorted(profiles.PROFILES)))
@click.option("--arch", type=click.Choice(sorted(profiles.DEBIAN_ARCH)), default=None,
              help="Image architecture (default: this host's).")
@click.option("--size", default="16G", show_default=True,
              help="Virtual disk size (K, M, G, T; the qcow2 grows only as written).")
@click.option("--packages", default="", metavar="P,...",
              help="Extra Debian trixie packages, comma-separated.")
@click.option("--with", "extras", multiple=True, type=click.Choice(profiles.EXTRAS),
              help=f"Add NVIDIA's driver, open modules and CUDA ({profiles.NVIDIA_REPO_ENV} "
                   "moves its repository).")
@click.option("--output", "-o", "output_path", default=None,
              type=click.Path(dir_okay=False, path_type=Path),
              help="Also copy the image to FILE.qcow2 (and its manifest to FILE.json).")
@click.option("--refresh", is_flag=True,
              help="Fetch the package index anew (else the one fetched before: same versions).")
@click.option("--compress", is_flag=True, help="Write a compressed qcow2.")
@click.option("--accel", type=click.Choice(["hvf", "kvm", "tcg"]), default=None,
              help="Accelerator of the builder VM (default: the best one here).")
@click.option("--quiet", "-q", is_flag=True, help="No progress and no summary.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def build_command(profile: str, arch: str | None, size: str, packages: str,
                  extras: tuple[str, ...], output_path: Path | None, refresh: bool,
                  compress: bool, accel: str | None, quiet: bool, as_json: bool) -> None:
    """Build PROFILE (base, docker, ai) into a UEFI-bootable qcow2, cached by its inputs.

    The build runs in a VM egpu boots (fast with hvf or kvm, slow under TCG); boot the result
    with 'egpu run --base FILE.qcow2'.
    """
    from egpu.vm import image_build  # the Debian client (httpx): only to build

    names = [p.strip() for p in packages.split(",") if p.strip()]
    request = profiles.parse_request(
        profile, arch or host_machine(), parse_size(size, what="--size"), names, extras,
        os.environ)
    progress = output.BarProgress(quiet=quiet or as_json)
    info = ensure_engine_info(progress=progress)
    guest = ensure_guest(request.arch, progress)
    with sigterm_interrupts():  # a kill stops the builder VM too, as Ctrl-C does
        result = image_build.build_image(request, info, guest, refresh=refresh,
                                         compress=compress, progress=progress, accel=accel)
    image, manifest = result.image, result.manifest
    if output_path is not None:
        image, manifest = image_build.copy_out(result, output_path.absolute())
    if as_json:
        output.emit_json({**image_build.manifest_json(result), "image": str(image),
                          "manifest": str(manifest)})
    elif not quiet:
        how = "cached" if result.cached else "built"
        output.out.print(f"{result.metadata.name}: {how}, "
                         f"{len(result.metadata.packages)} packages")
        output.out.print(f"  image    {image}")
        output.out.print(f"  manifest {manifest}")
        output.out.print(f"  boot it: egpu run --base {image} --arch {request.arch}")



@image_group.command("push")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=True))
@click.argument("ref")
@click.option("--tag", "tags", multiple=True, metavar="TAG",
              help="Also set this tag to the same manifest (repeatable), e.g. docker-latest.")
@click.option("--metadata", "metadata_path", type=click.Path(path_type=Path), metavar="JSON",
              help="The image's JSON manifest (default: FILE's .json or .manifest.json sidecar).")
@click.option("--name", help="Make the JSON manifest with this image name (when there is none).")
@click.option("--features", default="", metavar="A,B",
              help="Features for a JSON manifest made with --name, comma-separated.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def image_push_command(
    file: Path,
    ref: str,
    tags: tuple[str, ...],
    metadata_path: Path | None,
    name: str | None,
    features: str,
    quiet: bool,
    as_json: bool,
) -> None:
    """Publish FILE (a qcow2) and its JSON manifest at REF in the layout 'egpu pull' reads.

    REF is registry/repository:tag. Blobs the registry already has are not sent again; the
    tags are set only once every blob is up.
    """
    from egpu.images.push import load_local_image, push, push_target  # httpx: only to push

    push_target(ref, tags)  # a bad reference or tag is refused before the file is even read
    progress = output.BarProgress(quiet=quiet or as_json)
    wanted = tuple(f.strip() for f in features.split(",") if f.strip())
    image = load_local_image(
        file, metadata_path=metadata_path, name=name, features=wanted, progress=progress
    )
    result = push(image, ref, tags=tags, progress=progress)
    if as_json:
        output.emit_json(
            {
                "ref": result.ref,
                "digest": str(result.digest),
                "tags": list(result.tags),
                "disk_digest": str(result.disk_digest),
                "size": result.size,
                "uploaded": list(result.uploaded),
                "reused": list(result.reused),
            }
        )
    elif not quiet:
        output.out.print(f"{result.ref}: {file.name} ({_size(result.size)})")
        output.out.print(f"  digest {result.digest}")
        output.out.print(f"  tags   {', '.join(result.tags)}")


def register(group: click.Group) -> None:
    """Add this module's commands to the root group."""
    for command in (pull_command, images_command, prune_command, reset_command, image_group):
        group.add_command(command)
