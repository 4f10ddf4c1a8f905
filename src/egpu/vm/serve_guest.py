"""``egpu serve``, the I/O edge: the server started, watched, stopped and its log read in the
guest through the guest agent, and its forwarded port on the host's 127.0.0.1 waited on.

The argv and every parser come from the pure core (``vm/serve_plan.py``). A start that does
not reach a ready ``/v1/models`` within its deadline stops what it started and raises
:class:`ServerFailed` with the server's last log lines; the serve record is written only once
the endpoint answers for the model, so nothing half-started is ever recorded.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from egpu.errors import AgentError, ConflictError, UsageError, VMError
from egpu.progress import Progress
from egpu.vm import agent, serve_plan, serving, store
from egpu.vm.forwarder import host_port_busy

PROBE_TIMEOUT_S = 20.0  # nvidia-smi and vulkaninfo each; a guest without them answers at once
CONTROL_TIMEOUT_S = 60.0  # systemctl, journalctl, docker inspect / rm under TCG
HTTP_TIMEOUT_S = 3.0  # one /v1/models request through the forward
POLL_S = 0.5  # between two readiness checks (a condition polled with a deadline)
ALIVE_EVERY_S = 3.0  # how often the wait asks the guest whether the server still runs
STOP_WAIT_S = 15.0  # --stop waits this long for the endpoint to go quiet
FOLLOW_POLL_S = 1.0
DEFAULT_TIMEOUT_S = 600.0  # a model load under TCG, or a download


class ServerFailed(VMError):
    """The server did not come up; ``log`` holds its last lines (untrusted, sanitised)."""

    def __init__(self, message: str, *, log: Sequence[str] = (), hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.log = tuple(log)


def _exec(vm: store.VmDir, argv: Sequence[str], timeout: float) -> agent.ExecResult:
    return agent.run_command(vm.agent_socket, argv, timeout=timeout)


def _first_line(data: bytes) -> str:
    text = data.decode("utf-8", "replace").strip()
    line = text.splitlines()[-1] if text else ""
    return "".join(c if c.isprintable() else "?" for c in line[:200])


def _probe(vm: store.VmDir, argv: Sequence[str]) -> tuple[int | None, bytes] | None:
    try:
        result = _exec(vm, argv, PROBE_TIMEOUT_S)
    except AgentError:
        return None  # not installed: guest-exec cannot start it
    return result.exit_code, result.stdout


def detect_device(vm: store.VmDir) -> str:
    """cuda, vulkan or cpu: what the guest's drivers offer (``vm/serve_plan.py`` decides)."""
    nvidia = _probe(vm, serve_plan.NVIDIA_PROBE)
    vulkan = None if nvidia and nvidia[0] == 0 else _probe(vm, serve_plan.VULKAN_PROBE)
    return serve_plan.device_from_probes(nvidia, vulkan)


def host_port(config: store.VmConfig, guest_port: int) -> int:
    """The host port on 127.0.0.1 that will reach ``guest_port``: a ``run --port`` forward to
    it, else the same number through the automatic forward, which must be free now."""
    for host, guest in config.ports:
        if guest == guest_port:
            return host
    if not config.port_forwarding:
        raise UsageError(f"VM {config.name!r} runs without automatic port forwarding",
                         hint=f"run it with --port {guest_port}:{guest_port}, or without "
                              "--no-port-forwarding")
    taken = {config.ssh_port, *(h for h, _ in config.ports)}
    busy = (f"host port {guest_port} is this VM's ssh or --port forward" if guest_port in taken
            else host_port_busy(guest_port))
    if busy:
        raise ConflictError(f"{busy} on 127.0.0.1", hint="pick another --port")
    return guest_port


def is_active(vm: store.VmDir, backend: str) -> bool:
    result = _exec(vm, serve_plan.active_argv(backend), CONTROL_TIMEOUT_S)
    return serve_plan.is_active(backend, result.exit_code, result.stdout)


def read_logs(vm: store.VmDir, backend: str, lines: int | None,
              cursor: str | None = None) -> tuple[list[str], str | None]:
    result = _exec(vm, serve_plan.logs_argv(backend, lines, cursor), CONTROL_TIMEOUT_S)
    if result.exit_code != 0:
        raise VMError(f"journalctl in the guest failed: {_first_line(result.stderr)}")
    return serve_plan.parse_journal(result.stdout.decode("utf-8", "replace"))


def follow_logs(vm: store.VmDir, backend: str, emit: Callable[[str], None],
                running: Callable[[], bool] = lambda: True) -> None:
    """Print the log's last lines, then new ones as they come, while ``running()`` (Ctrl-C)."""
    lines, cursor = read_logs(vm, backend, serve_plan.LOG_LINES)
    for line in lines:
        emit(line)
    while running():
        time.sleep(FOLLOW_POLL_S)  # journalctl through guest-exec cannot stream: poll
        lines, new = read_logs(vm, backend, None if cursor else serve_plan.LOG_LINES, cursor)
        for line in lines:
            emit(line)
        cursor = new or cursor


def stop_server(vm: store.VmDir, backend: str) -> None:
    """Stop the server; one that is gone already (ended, or never started) is stopped."""
    result = _exec(vm, serve_plan.stop_argv(backend), CONTROL_TIMEOUT_S)
    # systemctl and docker both fail for a unit or container that no longer exists
    if result.exit_code != 0 and is_active(vm, backend):
        raise VMError(f"stopping the server in the guest failed: {_first_line(result.stderr)}")


def models_answer(port: int) -> list[str] | None:
    """The model ids 127.0.0.1:port/v1/models lists, or None while it does not answer so."""
    import httpx  # only here: the rest of the CLI starts without it

    url = f"http://127.0.0.1:{port}{serve_plan.MODELS_PATH}"
    try:
        # no proxy from the environment: this is loopback
        with httpx.Client(timeout=HTTP_TIMEOUT_S, trust_env=False,
                          follow_redirects=False) as client, client.stream("GET", url) as resp:
            if resp.status_code != httpx.codes.OK:
                return None
            body = b""
            for chunk in resp.iter_raw():
                body += chunk
                if len(body) > serve_plan.MAX_MODELS_BODY:
                    return None
    except httpx.HTTPError:
        return None
    return serve_plan.model_ids(body)


def _forward_conflict(vm: store.VmDir, port: int) -> str | None:
    table = vm.read_ports()
    for row in table.forwards if table else ():
        if row.host_port == port and row.state == "conflict":
            return row.reason or "conflict"
    return None


def wait_ready(vm: store.VmDir, plan: serve_plan.ServePlan, port: int, timeout: float,
               progress: Progress) -> None:
    """Until 127.0.0.1:port/v1/models names the model; VMError when the server ends first, the
    forward cannot be made, or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    next_alive = time.monotonic() + ALIVE_EVERY_S
    while True:
        ids = models_answer(port)
        if ids is not None:
            if plan.model_name in ids:
                return
            raise ConflictError(f"127.0.0.1:{port} answers for other models ({', '.join(ids)})")
        if (why := _forward_conflict(vm, port)) is not None:
            raise ConflictError(f"the forward of host port {port} failed: {why}")
        now = time.monotonic()
        if now >= deadline:
            raise VMError(f"{plan.backend} did not answer on 127.0.0.1:{port} within "
                          f"{timeout:g} s", hint="pass a longer --timeout")
        if now >= next_alive:
            if not is_active(vm, plan.backend):
                raise VMError(f"{plan.backend} ended in the guest before it answered",
                              hint=f"its whole log: egpu serve {vm.name} --logs")
            next_alive = time.monotonic() + ALIVE_EVERY_S
        time.sleep(POLL_S)


def start(vm: store.VmDir, plan: serve_plan.ServePlan, port: int, device: str,
          timeout: float, progress: Progress) -> serving.ServeRecord:
    """Start the planned server in the guest, wait until its forward answers, record it."""
    if is_active(vm, plan.backend):
        raise ConflictError(f"VM {vm.name!r} already runs a {plan.backend} server",
                            hint=f"stop it first: egpu serve {vm.name} --stop")
    # an ended container keeps its name (docker run would refuse it): clear what is left
    stop_server(vm, plan.backend)
    deadline = time.monotonic() + timeout
    progress.note(f"starting {plan.backend} in VM {vm.name!r} ({device})")
    result = _exec(vm, plan.argv, timeout)
    if result.exit_code != 0:
        why = _first_line(result.stderr) or f"exit {result.exit_code}"
        raise VMError(f"{plan.argv[0]} in the guest failed: {why}",
                      hint="the ai image has llama-server (egpu image build ai); vllm needs "
                           "the docker profile")
    try:
        progress.start(f"waiting for 127.0.0.1:{port}{serve_plan.MODELS_PATH}", None)
        try:
            wait_ready(vm, plan, port, max(deadline - time.monotonic(), POLL_S), progress)
        finally:
            progress.finish()
        record = serving.ServeRecord(plan.backend, port, plan.model_name, device)
        serving.write(vm, record)
    except (VMError, ConflictError) as e:
        log: list[str] = []
        with contextlib.suppress(VMError):
            log = read_logs(vm, plan.backend, serve_plan.FAIL_LOG_LINES)[0]
        with contextlib.suppress(VMError):
            stop_server(vm, plan.backend)
        raise ServerFailed(e.message, log=log, hint=e.hint) from e
    except BaseException:
        # Ctrl-C while waiting: nothing is left running that no record names
        with contextlib.suppress(VMError):
            stop_server(vm, plan.backend)
        raise
    return record


def stop(vm: store.VmDir, record: serving.ServeRecord, guest_running: bool) -> None:
    """Stop what the record names (when the VM runs), forget the record, and wait a little
    for the endpoint to go quiet."""
    if guest_running:
        stop_server(vm, record.backend)
    with contextlib.suppress(FileNotFoundError):
        vm.file(store.SERVE_RECORD).unlink()
    deadline = time.monotonic() + STOP_WAIT_S
    while guest_running and models_answer(record.port) is not None:
        if time.monotonic() >= deadline:
            break
        time.sleep(POLL_S)


def host_file(text: str) -> Path | None:
    """MODEL resolved on the host when it names a regular file there, else None."""
    if text.startswith(serve_plan.GUEST_PREFIX):
        return None
    path = Path(text).expanduser()
    try:
        return path.resolve() if path.is_file() else None
    except OSError:
        return None
