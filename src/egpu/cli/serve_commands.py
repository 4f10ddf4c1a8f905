"""``egpu serve``: a model served from a VM as an OpenAI-compatible API on 127.0.0.1."""

from __future__ import annotations

import contextlib
import math

import click

from egpu.cli import output
from egpu.errors import AgentError, NotFoundError, UsageError, VMError
from egpu.vm import serve_guest, serve_plan, serving, store
from egpu.vm.status import inspect

AGENT_HINT = "a full image needs the qemu-guest-agent package running"


def _running(vm: store.VmDir) -> None:
    state = inspect(vm).state
    if state != "running":
        raise VMError(f"VM {vm.name!r} is {state}; serving needs it running",
                      hint=f"start it: egpu run --name {vm.name} --detach")


def _record(vm: store.VmDir, what: str) -> serving.ServeRecord:
    try:
        return serving.read(vm)
    except NotFoundError:
        raise NotFoundError(f"VM {vm.name!r} serves no model: nothing to {what}",
                            hint=f"start one: egpu serve {vm.name} MODEL") from None


@click.command(name="serve")
@click.argument("name")
@click.argument("model", required=False)
@click.argument("extra", nargs=-1, type=click.UNPROCESSED)
@click.option("--backend", type=click.Choice(serving.BACKENDS), default="llama.cpp",
              show_default=True, help="llama.cpp (llama-server) or vllm (docker profile)")
@click.option("--port", type=int, default=serve_plan.DEFAULT_PORT, show_default=True,
              help="the server's port in the guest, forwarded to 127.0.0.1:PORT")
@click.option("--ctx", type=int, help="context size in tokens (default: the model's)")
@click.option("--timeout", type=float, default=serve_guest.DEFAULT_TIMEOUT_S, show_default=True,
              help="seconds to wait for the server to answer")
@click.option("--stop", "stop_", is_flag=True, help="stop the served model")
@click.option("--logs", is_flag=True, help="show the server's log (from the guest's journal)")
@click.option("-f", "--follow", is_flag=True, help="with --logs: keep printing new lines")
@click.option("--json", "as_json", is_flag=True, help="print the serve record as JSON")
def serve(name: str, model: str | None, extra: tuple[str, ...], backend: str, port: int,
          ctx: int | None, timeout: float, stop_: bool, logs: bool, follow: bool,
          as_json: bool) -> None:
    """Serve a model from a VM as an OpenAI-compatible API on 127.0.0.1.

    MODEL, by the first rule that matches: vm:/PATH is a file inside the VM; a file on this
    host (any path, absolute or not) must lie in a folder the VM shares (run --mount
    DIR:GUEST), where the guest reads it: it is never copied; org/repo[:QUANT|:FILE.gguf] is a
    Hugging Face id, downloaded inside the VM into the first writable share's huggingface/
    (else the guest's /var/cache/egpu). A path that names no host file is an error, never
    taken for a guest path. Arguments after -- go to the server (llama-server, or vllm's),
    one argv element each. Serving waits until /v1/models answers through the forward, then
    prints the endpoint and a ready-to-paste request; --stop stops it, --logs [-f] shows its
    log (the guest's journal)."""
    vm = store.VmDir(store.check_name(name)).require()
    if stop_ + logs > 1 or (follow and not logs):
        raise UsageError("give at most one of --stop and --logs (-f only with --logs)")
    if (stop_ or logs) and (model or extra):
        raise UsageError("--stop and --logs take only the VM NAME")
    try:
        if stop_:
            _stop(vm, as_json)
        elif logs:
            _logs(vm, backend, follow)
        else:
            if model is None:
                raise UsageError("serve needs a MODEL (or --stop / --logs)")
            _serve(vm, model, backend, port, ctx, extra, timeout, as_json)
    except serve_guest.ServerFailed as e:
        for line in e.log:
            output.notice(f"  {line}")
        raise
    except AgentError as e:
        raise AgentError(f"the guest agent of VM {name!r}: {e.message}",
                         hint=e.hint or AGENT_HINT) from e


def _serve(vm: store.VmDir, model: str, backend: str, port: int, ctx: int | None,
           extra: tuple[str, ...], timeout: float, as_json: bool) -> None:
    if not math.isfinite(timeout) or timeout <= 0:
        raise UsageError(f"--timeout {timeout} must be a finite, positive number of seconds")
    config = vm.read_config()
    # every input is checked before the guest is asked anything
    resolved = serve_plan.resolve_model(model, serve_guest.host_file(model), config.mounts,
                                        vm.name)
    plan = serve_plan.plan(backend, resolved, port, ctx, extra, config.mounts)
    _running(vm)
    if vm.file(store.SERVE_RECORD).exists():
        current = _record(vm, "replace")
        raise UsageError(f"VM {vm.name!r} already serves {current.model!r} on "
                         f"{current.endpoint}", hint=f"stop it first: egpu serve {vm.name} --stop")
    host_port = serve_guest.host_port(config, plan.port)
    device = serve_guest.detect_device(vm)
    progress = output.BarProgress(quiet=as_json)
    record = serve_guest.start(vm, plan, host_port, device, timeout, progress)
    if as_json:
        output.emit_json({**record.to_json(), "endpoint": record.endpoint})
        return
    output.out.print(f"{record.backend} serves {record.model!r} ({record.device}) at "
                     f"{record.endpoint}/v1", markup=False)
    output.out.print(serve_plan.ready_request(record.endpoint, record.model), markup=False)


def _stop(vm: store.VmDir, as_json: bool) -> None:
    record = _record(vm, "stop")
    running = inspect(vm).state == "running"
    serve_guest.stop(vm, record, running)
    if as_json:
        output.emit_json({**record.to_json(), "stopped": True})
    else:
        output.notice(f"stopped {record.backend} serving {record.model!r} on {record.endpoint}")


def _logs(vm: store.VmDir, backend: str, follow: bool) -> None:
    _running(vm)
    # the record's backend when one serves; --backend otherwise (a start that failed)
    if vm.file(store.SERVE_RECORD).exists():
        backend = _record(vm, "show").backend

    def emit(line: str) -> None:
        output.out.print(line, markup=False, highlight=False)

    if follow:
        # Ctrl-C is how following ends, as for egpu logs -f
        with contextlib.suppress(KeyboardInterrupt):
            serve_guest.follow_logs(vm, backend, emit)
        return
    lines, _ = serve_guest.read_logs(vm, backend, serve_plan.LOG_LINES)
    for line in lines:
        emit(line)


def register(group: click.Group) -> None:
    """Add this module's commands to the root group."""
    group.add_command(serve)
