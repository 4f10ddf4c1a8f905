"""SIGTERM as Ctrl-C for commands that own children and scratch files: ``kill`` (or a service
manager stopping egpu) then unwinds through their cleanup instead of the default action, which
ends egpu at once and leaves, for example, an image build's builder VM running."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt in the main thread (the CLI reports
    it as interrupted, exit 130); an ignored SIGTERM stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers; its own SIGTERM policy stands
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
