"""Short synchronous QMP exchanges over a VM's socket, using QEMU's own qemu.qmp library."""

from __future__ import annotations

import concurrent.futures
import logging
import re
import threading
from pathlib import Path
from typing import Any

from egpu.errors import VMError

DEFAULT_TIMEOUT_S = 5.0

# qemu.qmp logs every connection failure at ERROR; egpu reports failures itself.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


async def _execute(socket: Path, command: str, args: dict[str, Any] | None, timeout: float) -> Any:
    import asyncio

    from qemu.qmp import QMPClient

    client = QMPClient("egpu")
    try:
        await asyncio.wait_for(client.connect(str(socket)), timeout)
        return await asyncio.wait_for(client.execute(command, args), timeout)
    finally:
        await client.disconnect()


def execute(
    socket: Path, command: str, args: dict[str, Any] | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> Any:
    """Run one QMP command and return its result; VMError when QEMU cannot be reached."""
    # asyncio and qemu.qmp only for a command that talks to a live VM
    import asyncio

    from qemu.qmp import QMPError

    # On the main thread asyncio.run turns Ctrl-C into a cancellation of the exchange, and a
    # cancellation absorbed on its way out (asyncio.wait_for can, when the reply lands at the
    # same moment) loses the interrupt. On a worker thread the loop leaves signals alone and
    # Ctrl-C interrupts the wait below; the worker ends by itself within its timeouts.
    done: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def exchange() -> None:
        try:
            done.set_result(asyncio.run(_execute(socket, command, args, timeout)))
        except BaseException as e:  # handed to the caller
            done.set_exception(e)

    threading.Thread(target=exchange, name=f"qmp {command}", daemon=True).start()
    try:
        return done.result()
    except (TimeoutError, QMPError, OSError, EOFError) as e:
        raise VMError(f"QMP {command} on {socket} failed: {e or type(e).__name__}") from e


def query_status(socket: Path, timeout: float = DEFAULT_TIMEOUT_S) -> str | None:
    """The VM's run state (``running``, ``paused``, ...), or None when QMP does not answer."""
    try:
        result = execute(socket, "query-status", timeout=timeout)
    except VMError:
        return None
    status = result.get("status") if isinstance(result, dict) else None
    return status if isinstance(status, str) else None


# Run states in which QEMU keeps running but the guest never will again.
CRASH_RUN_STATES = ("internal-error", "guest-panicked")
RUNNING_RUN_STATE = "running"
# `info registers`: x86 prints RIP= (EIP= in 32-bit mode), Arm prints PC=.
_PC_RE = re.compile(r"\b(?:RIP|EIP|PC)=([0-9a-fA-F]+)")


def program_counter(registers: str) -> str | None:
    """The first vCPU's program counter in ``info registers`` output, as hex."""
    match = _PC_RE.search(registers)
    return match.group(1) if match else None


def query_pc(socket: Path, timeout: float = DEFAULT_TIMEOUT_S) -> str | None:
    """The first vCPU's program counter, or None when QMP does not answer."""
    try:
        text = execute(socket, "human-monitor-command", {"command-line": "info registers"},
                       timeout=timeout)
    except VMError:
        return None
    return program_counter(text) if isinstance(text, str) else None


def crash_problem(run_state: str, pc: str | None) -> str:
    """How a guest QEMU stopped in a crash state is reported."""
    return f"guest stopped in {run_state}" + (f" (PC={pc})" if pc else "")
