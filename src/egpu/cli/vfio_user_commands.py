"""``egpu vfio-user serve``: one device function on a vfio-user socket, for any client."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from types import FrameType

import click

from egpu.cli import output
from egpu.devices import DEVICE_MODULES, create_device
from egpu.devices.display import DisplayFunction, serve_screenshots
from egpu.errors import UsageError
from egpu.vfio_user.server import VfioUserServer

FUNCTIONS = tuple(DEVICE_MODULES)
SCREENSHOT_OPTION = "screenshot_request"  # the display option naming the request file


def _parse_options(pairs: tuple[str, ...]) -> dict[str, str]:
    options: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--option {pair!r} is not KEY=VALUE")
        options[key.replace("-", "_")] = value
    return options


@click.group("vfio-user")
def vfio_user() -> None:
    """Serve virtual PCI functions over the vfio-user protocol."""


@vfio_user.command("serve")
@click.option("--socket", "socket_path", required=True, type=click.Path(path_type=Path),
              help="UNIX socket to listen on (its directory is made private, 0700).")
@click.option("--function", "function", required=True, type=click.Choice(FUNCTIONS),
              help="Which device function to serve.")
@click.option("-o", "--option", "options", multiple=True, metavar="KEY=VALUE",
              help="Device option, passed to the model (repeatable).")
@click.option("-v", "--verbose", is_flag=True, help="Log connections and refused requests.")
def serve(socket_path: Path, function: str, options: tuple[str, ...], verbose: bool) -> None:
    """Serve one PCI function on SOCKET until SIGTERM/SIGINT (clients may come and go)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(name)s: %(message)s")
    parsed = _parse_options(options)
    device = create_device(function, **parsed)
    server = VfioUserServer(device, socket_path)
    server.listen()
    request = parsed.get(SCREENSHOT_OPTION)
    if isinstance(device, DisplayFunction) and request:
        # `egpu screenshot` asks this process for a PNG by signal (devices/display.py).
        serve_screenshots(device, Path(request))

    def _stop(signum: int, _frame: FrameType | None) -> None:
        server.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    output.notice(f"serving {function} on {socket_path}")
    server.serve_forever()
    output.notice("server stopped")


def register(group: click.Group) -> None:
    """Add ``vfio-user`` to the root group."""
    group.add_command(vfio_user)
