"""A progress sink that lower layers report to; the CLI decides how (or whether) to draw it."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """Receives progress of one long task at a time: a label, a total, then advances."""

    def start(self, label: str, total: int | None) -> None: ...

    def advance(self, amount: int) -> None: ...

    def finish(self) -> None: ...

    def note(self, message: str) -> None: ...


class SilentProgress:
    """Progress that goes nowhere (tests, ``--quiet``, non-interactive use)."""

    def start(self, label: str, total: int | None) -> None:
        pass

    def advance(self, amount: int) -> None:
        pass

    def finish(self) -> None:
        pass

    def note(self, message: str) -> None:
        pass
