"""``egpu vfio-user serve``: one device function on a vfio-user socket, for any client."""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path
from types import FrameType

import click

from egpu.cli import output
from egpu.devices import DEVICE_MODULES, device_options
from egpu.devices.serve_spec import SERVE_COMMAND, SPEC_OPTION, ServeSpec
from egpu.errors import UsageError
from egpu.vfio_user.server import VfioUserServer

FUNCTIONS = tuple(DEVICE_MODULES)


def _parse_options(pairs: tuple[str, ...]) -> dict[str, str]:
    options: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--option {pair!r} is not KEY=VALUE")
        options[key.replace("-", "_")] = value
    return options


class _ServeCommand(click.Command):
    """``serve`` whose help lists every function's declared ``-o`` options."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        for function in FUNCTIONS:
            declared = device_options(function)
            with formatter.section(f"Options of --function {function} (-o KEY=VALUE)"):
                if declared:
                    formatter.write_dl([(f"{o.name}={o.type.value}", o.describe())
                                        for o in declared])
                else:
                    formatter.write_text("none")
        super().format_epilog(ctx, formatter)


@click.group(SERVE_COMMAND[0])
def vfio_user() -> None:
    """Serve virtual PCI functions over the vfio-user protocol."""


@vfio_user.command(SERVE_COMMAND[1], cls=_ServeCommand)
@click.option("--socket", "socket_path", type=click.Path(path_type=Path),
              help="UNIX socket to listen on (its directory is made private, 0700).")
@click.option("--function", "function", type=click.Choice(FUNCTIONS),
              help="Which device function to serve.")
@click.option("-o", "--option", "options", multiple=True, metavar="KEY=VALUE",
              help="Device option of the function, listed below (repeatable).")
@click.option(SPEC_OPTION, "spec_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Serve what this JSON spec file says instead (how egpu run starts servers).")
@click.option("-v", "--verbose", is_flag=True, help="Log connections and refused requests.")
def serve(socket_path: Path | None, function: str | None, options: tuple[str, ...],
          spec_file: Path | None, verbose: bool) -> None:
    """Serve one PCI function on SOCKET until SIGTERM/SIGINT (clients may come and go).

    Give --socket and --function (and -o), or --spec. Sizes take K, M, G or T (1024-based); a
    bare number is bytes.
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(name)s: %(message)s")
    if spec_file is not None:
        if socket_path or function or options:
            raise UsageError(f"{SPEC_OPTION} replaces --socket, --function and -o")
        spec = _read_spec(spec_file)
    elif socket_path is None or function is None:
        raise UsageError("serve needs --socket and --function (or --spec FILE)")
    else:
        spec = ServeSpec.parse(function, socket_path, _parse_options(options))
    _serve(spec)


def _read_spec(path: Path) -> ServeSpec:
    try:
        return ServeSpec.from_json(json.loads(path.read_text()))
    except OSError as e:
        raise UsageError(f"{SPEC_OPTION} {path}: {e.strerror or e}") from None
    except ValueError as e:  # malformed JSON included
        raise UsageError(f"{SPEC_OPTION} {path}: {e}") from None


def _serve(spec: ServeSpec) -> None:
    """Serve ``spec`` until SIGTERM/SIGINT: the one path for both ways of asking."""
    device = spec.create_device()
    # A display given a screenshot request file answers `egpu screenshot` by signal from here
    # on: the server attaches it in this, the main, thread (devices/display.py).
    server = VfioUserServer(device, spec.socket)

    def _stop(signum: int, _frame: FrameType | None) -> None:
        server.stop()

    # before the socket appears: whoever sees it may stop the server at once, and a SIGTERM
    # then must end it cleanly, not by the default action (found as a flake under load)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    server.listen()
    output.notice(f"serving {spec.function} on {spec.socket}")
    server.serve_forever()
    output.notice("server stopped")


def register(group: click.Group) -> None:
    """Add ``vfio-user`` to the root group."""
    group.add_command(vfio_user)
