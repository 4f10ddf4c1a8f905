"""cli layer: the ``egpu`` command line (parsing, output, exit codes); the top of the layers.
Messages for users are printed here and nowhere below; map of the layers: docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import importlib
import sys

import click

from egpu import __version__
from egpu.errors import EgpuError

# name -> (module defining it, its short help): ``--help`` lists every command from this table,
# and a command's module (with its rich, httpx, QEMU deps) is imported only when that command runs.
# tests/test_cli_lazy.py checks the table against the real commands.
COMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("egpu.cli.bench_commands",
              "Measure what a VM serves."),
    "console": ("egpu.cli.vm_commands",
                "Attach to a running VM's serial console; Ctrl-] detaches, the VM keeps running."),
    "cp": ("egpu.cli.agent_commands",
           "Copy a file into or out of a VM through its guest agent (SRC NAME:DST, NAME:SRC DST)."),
    "devices": ("egpu.cli.host_commands",
                "List the host's PCI functions and whether each can be passed through."),
    "docker": ("egpu.cli.docker_commands",
               "Run Docker in a VM, its API on this host only (up, down, env, context)."),
    "doctor": ("egpu.cli.host_commands",
               "Check what real passthrough needs on this host; exit 1 when something blocks it."),
    "engine": ("egpu.cli.engine_commands",
               "Show which QEMU egpu runs, what it can do here, and every candidate it looked at."),
    "exec": ("egpu.cli.agent_commands",
             "Run a command in a VM through its guest agent; exit with its exit code."),
    "image": ("egpu.cli.image_commands",
              "Build and publish disk images (UEFI-bootable Debian qcow2s, scottjg JSON)."),
    "images": ("egpu.cli.image_commands",
               "List cached images and the VMs whose overlays use them."),
    "list": ("egpu.cli.vm_commands", "List VMs."),
    "logs": ("egpu.cli.vm_commands", "Print a VM's serial console log."),
    "ports": ("egpu.cli.port_commands",
              "List a VM's port forwards (127.0.0.1 on the host to the guest) and their states."),
    "prune": ("egpu.cli.image_commands", "Delete cached images that no VM overlay uses."),
    "pull": ("egpu.cli.image_commands",
             "Download an image (default: scottjg/qemu-vfio-apple's docker-profile image) "
             "into the cache."),
    "reset": ("egpu.cli.image_commands",
              "Delete a VM's overlay and EFI vars: its next run starts from the pristine image."),
    "rm": ("egpu.cli.vm_commands",
           "Delete a VM: its directory, disks and logs (a live one only with --force)."),
    "run": ("egpu.cli.vm_commands", "Boot a VM (the built-in guest unless an image is given)."),
    "screenshot": ("egpu.cli.vm_commands",
                   "Write what a VM's display (its own or the virtual eGPU's) shows to a PNG."),
    "serve": ("egpu.cli.serve_commands",
              "Serve a model from a VM as an OpenAI-compatible API on 127.0.0.1."),
    "setup": ("egpu.cli.engine_commands",
              "Provision the engine and the built-in guests, so later runs start at once."),
    "ssh": ("egpu.cli.vm_commands",
            "Open a shell (or run COMMAND) in a VM over its loopback ssh forward."),
    "status": ("egpu.cli.vm_commands", "Show the state of one VM, or of all."),
    "stop": ("egpu.cli.vm_commands",
             "Stop a VM: powerdown over QMP, then the guest agent, then SIGTERM, then SIGKILL."),
    "top": ("egpu.cli.top_commands",
            "Show a VM's GPU use, VRAM, temperature and power, and its CPU load and memory, "
            "live."),
    "vfio-user": ("egpu.cli.vfio_user_commands",
                  "Serve virtual PCI functions over the vfio-user protocol."),
}
HELP_GAP = 6  # click's own indent plus column spacing in the commands list


class LazyGroup(click.Group):
    """The root group: lists commands from :data:`COMMANDS`, imports one only to run it."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        if cmd_name not in self.commands:
            # each module adds its commands through ``register(group)``
            importlib.import_module(COMMANDS[cmd_name][0]).register(self)
        return self.commands.get(cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        names = self.list_commands(ctx)
        limit = formatter.width - HELP_GAP - max(len(n) for n in names)
        rows = [(n, click.Command(n, help=COMMANDS[n][1]).get_short_help_str(limit)) for n in names]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="egpu")
def cli() -> None:
    """Use a GPU that lives outside your machine's OS, through a Linux VM."""


def _error(message: str) -> None:
    from egpu.cli import output  # rich: imported only once there is an error to print

    output.error(message)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; EgpuError becomes a one-line message and its exit code."""
    try:
        cli.main(args=argv, prog_name="egpu", standalone_mode=False)
    except EgpuError as e:
        _error(str(e))
        sys.exit(e.exit_code)
    except click.exceptions.Abort as e:
        # click makes Ctrl-C (and SIGTERM where cli/interrupts.py turns it into one) an Abort
        # too: only a declined prompt is "aborted"
        _error("interrupted" if isinstance(e.__cause__, KeyboardInterrupt) else "aborted")
        sys.exit(130)
    except click.UsageError as e:
        # one line, like every other error: click's own form spends three on it
        where = e.ctx.command_path if e.ctx else "egpu"
        _error(f"{e.format_message()} (see '{where} --help')")
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        _error("interrupted")
        sys.exit(130)
    sys.exit(0)
