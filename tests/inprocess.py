"""egpu's CLI run inside the test process: its own ``main`` (one-line errors, exit codes) under
click's CliRunner, with a given environment, returning what a subprocess would.

For tests about what a command decides and prints; tests about the process itself (signals,
terminals, a real interpreter's exit, its memory) start a real ``python -m egpu``.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

import click
from click.testing import CliRunner

from egpu.cli import main as egpu_main


class _Main(click.Command):
    """egpu's own ``main`` as a command CliRunner can invoke."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             windows_expand_args: bool = True, **extra: Any) -> Any:
        egpu_main(list(args or ()))


def run_main(args: Sequence[str], env: Mapping[str, str],
             input: str | None = None) -> subprocess.CompletedProcess[str]:
    """``egpu ARGS`` in this process with exactly ``env`` as its environment."""
    wanted, saved = dict(env), dict(os.environ)  # env may be os.environ itself
    os.environ.clear()
    os.environ.update(wanted)
    try:
        # not caught: an unexpected exception fails the test with its traceback
        result = CliRunner().invoke(_Main("egpu"), list(args), input=input,
                                    catch_exceptions=False)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return subprocess.CompletedProcess(["egpu", *args], result.exit_code, result.stdout,
                                       result.stderr)
