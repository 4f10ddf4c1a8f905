"""QMP exchanges never swallow Ctrl-C.

asyncio.run turns SIGINT into a cancellation of the running exchange; when the cancellation is
absorbed on its way out (asyncio.wait_for in Python 3.11 can do that when the reply lands at the
same moment), asyncio.run returns normally and the interrupt is gone. An attached `egpu run`
polling QMP then ignored Ctrl-C: 5 of 150 SIGINTs were lost in a status loop against a real VM.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from egpu.vm import qmp


async def _absorbs_cancellation(*_args: Any) -> dict[str, str]:
    # what the race does: the exchange completes instead of being cancelled
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.sleep(2)
    return {"status": "running"}


def test_ctrl_c_during_an_exchange_is_a_keyboard_interrupt(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(qmp, "_execute", _absorbs_cancellation)
    # Python's own handler, as in a terminal (a runner started in the background ignores SIGINT)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            qmp.execute(tmp_path / "qmp.sock", "query-status")
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
