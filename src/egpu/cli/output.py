"""Everything the CLI shows a user: tables, JSON, errors, progress bars. Nothing below prints."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rich.console import Console

if TYPE_CHECKING:
    # rich's tables and progress bars are imported where drawn: most commands draw neither
    from rich.progress import Progress, TaskID

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def emit_json(value: Any) -> None:
    """Write one JSON document to stdout."""
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=False) + "\n")
    sys.stdout.flush()


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print a plain table (no box, so it stays readable when piped)."""
    from rich.table import Table

    t = Table(box=None, show_edge=False, pad_edge=False, header_style="bold")
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*("-" if v is None else str(v) for v in r))
    out.print(t)


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/yellow] {message}")


def notice(message: str) -> None:
    err.print(message)


def error(message: str) -> None:
    err.print(f"[red]error:[/red] {message}", markup=True)


class BarProgress:
    """A rich progress bar on stderr; silent when stderr is not a terminal or when quiet."""

    def __init__(self, *, quiet: bool = False) -> None:
        self.enabled = not quiet and err.is_terminal
        self.quiet = quiet
        self._bar: Progress | None = None
        self._task: TaskID | None = None

    def start(self, label: str, total: int | None) -> None:
        if not self.enabled:
            return
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=err,
            transient=True,
        )
        self._bar.start()
        self._task = self._bar.add_task(label, total=total)

    def advance(self, amount: int) -> None:
        if self._bar is not None and self._task is not None:
            self._bar.advance(self._task, amount)

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
            self._task = None

    def note(self, message: str) -> None:
        if not self.quiet:
            err.print(message)
