"""The root CLI imports a command's module only to run it, and still lists every command."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from egpu.cli import COMMANDS, cli


def _eager_group() -> click.Group:
    group = click.Group("egpu", help=cli.help, params=list(cli.params),
                        context_settings=cli.context_settings)
    for module in sorted({m for m, _ in COMMANDS.values()}):
        importlib.import_module(module).register(group)
    return group


def test_table_names_every_command_and_its_real_short_help() -> None:
    eager = _eager_group()
    assert sorted(eager.commands) == sorted(COMMANDS)
    for name, command in eager.commands.items():
        module, short = COMMANDS[name]
        assert command.callback is not None and command.callback.__module__ == module, name
        assert command.get_short_help_str(limit=1000) == short, name


def test_help_lists_what_the_eager_group_would() -> None:
    runner = CliRunner()
    lazy = runner.invoke(cli, ["--help"], prog_name="egpu").output
    assert "vfio-user" in lazy
    assert lazy == runner.invoke(_eager_group(), ["--help"], prog_name="egpu").output


def test_version_imports_no_command_module() -> None:
    probe = ("import sys; from egpu.cli import cli; cli.main(['--version'], standalone_mode=False);"
             "print(sorted(m for m in sys.modules if m.startswith('egpu.cli.') or m == 'rich'))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         timeout=60).stdout
    assert out.splitlines()[-1] == "[]"


def test_running_a_command_imports_only_its_module() -> None:
    probe = ("import sys; from egpu.cli import cli; cli.main(['images', '--help'], "
             "standalone_mode=False); print(sorted(m for m in sys.modules if m.startswith("
             "'egpu.cli.') and m.endswith('_commands')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         timeout=60).stdout
    assert out.splitlines()[-1] == "['egpu.cli.image_commands']"


# Imported only where a download, a picture or a live VM's QMP needs them: the commands below
# (the ones tests and scripts run most) start in a fraction of the time without them.
HEAVY = ("httpx", "PIL", "qemu", "asyncio")


@pytest.mark.parametrize("args", [["run", "--help"], ["list"], ["list", "--json"],
                                  ["status", "--json"], ["run", "--cpus", "0"],
                                  ["images", "--json"]], ids=" ".join)
def test_common_commands_import_no_heavy_module(egpu_home: Path, args: list[str]) -> None:
    probe = ("import sys; from egpu.cli import main\n"
             "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r}))")
    proc = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True,
                          timeout=60)
    # the command ran (a failing run fails on its own input, as intended), then the probe printed
    assert proc.stdout.splitlines()[-1] == "[]", proc.stderr
