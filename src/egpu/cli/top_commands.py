"""``egpu top``: a live view of a VM's GPUs, CPU load and memory, polled through its agent."""

from __future__ import annotations

import collections
import json
import math
import sys
import time
from collections.abc import Iterator

import click
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from egpu.cli import output
from egpu.cli.agent_commands import _session
from egpu.errors import UsageError
from egpu.vm import gpustats, stats

DEFAULT_INTERVAL_S = 1.0
MAX_INTERVAL_S = 3600.0
HISTORY = 30  # samples in each sparkline
REFRESH_PER_S = 4


def check_interval(value: float) -> float:
    # nan passes every comparison and inf never polls again
    if not math.isfinite(value) or not 0 < value <= MAX_INTERVAL_S:
        raise UsageError(f"--interval {value} must be a finite number of seconds, "
                         f"above 0 and at most {MAX_INTERVAL_S:g}")
    return value


def _fmt(value: float | None, unit: str, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


class History:
    """The last :data:`HISTORY` values of each series shown."""

    def __init__(self) -> None:
        self.series: dict[str, collections.deque[float | None]] = {}

    def add(self, key: str, value: float | None) -> str:
        line = self.series.setdefault(key, collections.deque(maxlen=HISTORY))
        line.append(value)
        return gpustats.sparkline(list(line))


def render(name: str, sample: gpustats.Sample, history: History) -> Group:
    """One frame of the live view."""
    parts: list[Table | Text] = []
    if sample.gpus:
        gpus = Table(title=f"{name}: GPUs", title_justify="left")
        for col in ("GPU", "name", "util", "history", "VRAM used / total", "temp", "power"):
            gpus.add_column(col)
        for g in sample.gpus:
            vram = f"{_fmt(g.vram_used_mib, '')} / {_fmt(g.vram_total_mib, ' MiB')}"
            gpus.add_row(f"{g.vendor} {g.index}", g.name, _fmt(g.util_percent, " %"),
                         history.add(f"gpu{g.vendor}{g.index}", g.util_percent), vram,
                         _fmt(g.temperature_c, " C"), _fmt(g.power_w, " W", 1))
        parts.append(gpus)
    host = Table(title=f"{name}: guest", title_justify="left")
    for col in ("", "now", "history"):
        host.add_column(col)
    host.add_row("CPU", _fmt(sample.cpu_percent, " %", 1),
                 history.add("cpu", sample.cpu_percent))
    mem = sample.memory
    used_pct = None if mem is None else 100.0 * mem.used_kib / mem.total_kib
    host.add_row("memory", "-" if mem is None else
                 f"{mem.used_kib / 1024:.0f} / {mem.total_kib / 1024:.0f} MiB",
                 history.add("mem", used_pct))
    parts.append(host)
    parts.extend(Text(note, style="yellow") for note in sample.notes)
    parts.append(Text("Ctrl-C to quit", style="dim"))
    return Group(*parts)


def _ticks(interval: float) -> Iterator[None]:
    """One tick an interval from now and every interval after, whatever a poll costs (a late
    tick comes at once; the load is a rate, so the first one needs a full interval)."""
    next_at = time.monotonic()
    while True:
        next_at += interval
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            next_at = time.monotonic()
        yield


@click.command(name="top")
@click.argument("name")
@click.option("--interval", default=DEFAULT_INTERVAL_S, show_default=True, type=float,
              help="seconds between polls")
@click.option("--json", "as_json", is_flag=True, help="print one JSON sample per line")
@click.option("--count", type=click.IntRange(min=1), default=None,
              help="stop after this many samples (default: until Ctrl-C)")
def top(name: str, interval: float, as_json: bool, count: int | None) -> None:
    """Show a VM's GPU use, VRAM, temperature and power, and its CPU load and memory, live."""
    check_interval(interval)
    try:
        with _session(name, stats.POLL_TIMEOUT_S) as client:
            sampler = stats.Sampler(client)
            sampler.sample()  # the first /proc/stat, so every sample shown has a CPU load
            if as_json:
                _json_loop(sampler, interval, count)
            else:
                _live_loop(name, sampler, interval, count)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a live view is left: exit 0, the terminal restored by rich


def _json_loop(sampler: stats.Sampler, interval: float, count: int | None) -> None:
    for n, _ in enumerate(_ticks(interval), 1):
        sample = sampler.sample()
        doc = {"time": round(time.time(), 3), **sample.to_json()}
        sys.stdout.write(json.dumps(doc) + "\n")
        sys.stdout.flush()
        if count is not None and n >= count:
            return


def _live_loop(name: str, sampler: stats.Sampler, interval: float, count: int | None) -> None:
    history = History()
    with Live(console=output.out, refresh_per_second=REFRESH_PER_S, transient=False) as live:
        for n, _ in enumerate(_ticks(interval), 1):
            live.update(render(name, sampler.sample(), history))
            if count is not None and n >= count:
                return


def register(group: click.Group) -> None:
    """Add this module's commands to the root group."""
    group.add_command(top)
