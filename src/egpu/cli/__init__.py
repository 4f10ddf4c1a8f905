"""cli layer: the ``egpu`` command line (parsing, output, exit codes); the top of the layers.
Messages for users are printed here and nowhere below; map of the layers: docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import importlib
import sys

import click

from egpu import __version__
from egpu.cli import output
from egpu.errors import EgpuError

# Each module adds its commands to the root group through ``register(group)``.
COMMAND_MODULES = (
    "egpu.cli.vm_commands",
    "egpu.cli.engine_commands",
    "egpu.cli.vfio_user_commands",
    "egpu.cli.host_commands",
    "egpu.cli.image_commands",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="egpu")
def cli() -> None:
    """Use a GPU that lives outside your machine's OS, through a Linux VM."""


for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(cli)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; EgpuError becomes a one-line message and its exit code."""
    try:
        cli.main(args=argv, prog_name="egpu", standalone_mode=False)
    except EgpuError as e:
        output.error(str(e))
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        output.error("aborted")
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        output.error("interrupted")
        sys.exit(130)
    sys.exit(0)
