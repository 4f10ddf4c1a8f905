"""Guest-agent commands: exec (run a command in the guest) and cp (copy files in and out)."""

from __future__ import annotations

import contextlib
import math
import os
import posixpath
import secrets
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click

from egpu.cli import output
from egpu.errors import AgentError, UsageError, VMError
from egpu.vm import agent, store
from egpu.vm.status import inspect

DEFAULT_EXEC_TIMEOUT_S = 60.0
SIGNAL_EXIT_BASE = 128  # a shell's exit status for a command a signal ended
PARTIAL_SUFFIX = ".egpu-partial"
NEW_FILE_MODE = 0o666  # what open(2) gives a new file, less the umask
AGENT_HINT = ("the built-in guest starts qemu-ga at boot; a full image needs the "
              "qemu-guest-agent package running")


@contextlib.contextmanager
def _session(name: str, timeout: float = agent.DEFAULT_TIMEOUT_S) -> Iterator[agent.AgentClient]:
    """A synced agent session with a running VM; one-line errors with a hint otherwise."""
    vm = store.VmDir(name).require()
    status = inspect(vm)
    if status.state != "running":
        raise VMError(f"VM {name!r} is {status.state}; the guest agent needs it running",
                      hint=f"start it: egpu run --name {name} --detach")
    try:
        session = agent.connect(vm.agent_socket, timeout)
        client = session.__enter__()
    except AgentError as e:
        raise AgentError(f"the guest agent of VM {name!r} does not answer ({e.message})",
                         hint=AGENT_HINT) from e
    try:
        yield client
    finally:
        session.__exit__(None, None, None)


def _timeout(value: float) -> float:
    # nan passes every comparison and inf never ends the wait
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"--timeout {value} must be a finite, positive number of seconds")
    return value


@click.command(name="exec", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.option("--timeout", default=DEFAULT_EXEC_TIMEOUT_S, show_default=True, type=float,
              help="seconds the command may run; it is killed after that")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_command(name: str, timeout: float, command: tuple[str, ...]) -> None:
    """Run a command in a VM through its guest agent; exit with its exit code.

    No network or ssh is needed. The command's stdout and stderr are printed once it ends; after
    --timeout it is killed and exec exits 124."""
    _timeout(timeout)
    with _session(name) as client:
        result = client.run(list(command), timeout=timeout)
    sys.stdout.buffer.write(result.stdout)
    sys.stdout.flush()
    sys.stderr.buffer.write(result.stderr)
    sys.stderr.flush()
    if result.truncated:
        output.warn("the guest agent kept only the first 16 MiB of the command's output")
    if result.exit_code is not None:
        sys.exit(result.exit_code)
    sys.exit(SIGNAL_EXIT_BASE + (result.signal or 0))


@dataclass(frozen=True)
class Location:
    """One side of ``egpu cp``: a host path, or a path in VM ``vm``."""

    path: str
    vm: str | None = None


def parse_location(text: str) -> Location:
    """``NAME:PATH`` names a guest path when NAME is a valid VM name (which has no '/'), so
    ``./a:b`` and ``/tmp/a:b`` stay host paths."""
    head, sep, rest = text.partition(":")
    if sep and store.NAME_RE.fullmatch(head):
        if not rest.startswith("/"):
            raise UsageError(f"{text!r}: the guest path must be absolute ({head}:/PATH)")
        return Location(rest, head)
    if not text:
        raise UsageError("cp needs a source and a destination")
    return Location(text)


@click.command(name="cp")
@click.argument("source")
@click.argument("destination")
@click.option("-q", "--quiet", is_flag=True, help="no progress bar")
def cp(source: str, destination: str, quiet: bool) -> None:
    """Copy a file into or out of a VM through its guest agent (SRC NAME:DST, NAME:SRC DST).

    NAME:PATH is a guest path when NAME is a VM name; write ./a:b for a local file with ':' in
    its name. The copy is renamed into place only once complete."""
    src, dst = parse_location(source), parse_location(destination)
    if (src.vm is None) == (dst.vm is None):
        raise UsageError("exactly one side of cp must be NAME:PATH in a VM "
                         "(write ./a:b for a local file with ':' in its name)")
    progress = output.BarProgress(quiet=quiet)
    if dst.vm is not None:
        _copy_in(Path(src.path), dst.vm, dst.path, progress)
    else:
        assert src.vm is not None
        _copy_out(src.vm, src.path, Path(dst.path), progress)


def _copy_in(local: Path, name: str, guest_path: str, progress: output.BarProgress) -> None:
    try:
        source = local.open("rb")
    except OSError as e:
        raise UsageError(f"cannot read {local}: {e.strerror}") from None
    with source, _session(name, agent.TRANSFER_TIMEOUT_S) as client:
        if guest_path.endswith("/"):
            guest_path += local.name
        # written beside its place and renamed in whole, so nothing half-written ever shows
        partial = f"{guest_path}{PARTIAL_SUFFIX}-{secrets.token_hex(4)}"
        progress.start(f"copying {local.name}", os.fstat(source.fileno()).st_size)
        try:
            client.write_file(partial, source, progress.advance)
            result = client.run(["mv", "-f", partial, guest_path], timeout=agent.DEFAULT_TIMEOUT_S)
            if result.exit_code != 0:
                raise AgentError(f"cannot move the copy into {guest_path} in the guest: "
                                 f"{result.stderr.decode(errors='replace').strip()[:200]}")
        except BaseException:
            with contextlib.suppress(AgentError):
                client.run(["rm", "-f", partial], timeout=agent.DEFAULT_TIMEOUT_S)
            raise
        finally:
            progress.finish()
    output.notice(f"copied {local} to {name}:{guest_path}")


def _copy_out(name: str, guest_path: str, local: Path, progress: output.BarProgress) -> None:
    if local.is_dir():
        local = local / posixpath.basename(guest_path.rstrip("/"))
    if not local.parent.is_dir():
        raise UsageError(f"{local.parent} is not a directory")
    with _session(name, agent.TRANSFER_TIMEOUT_S) as client:
        fd, tmp = tempfile.mkstemp(prefix=f".{local.name}.", suffix=PARTIAL_SUFFIX,
                                   dir=local.parent)
        try:
            progress.start(f"copying {posixpath.basename(guest_path)}", None)
            with os.fdopen(fd, "wb") as sink:
                client.read_file(guest_path, sink, progress.advance)
            os.chmod(tmp, NEW_FILE_MODE & ~_umask())  # mkstemp's 0600 is for the partial only
            os.replace(tmp, local)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        finally:
            progress.finish()
    output.notice(f"copied {name}:{guest_path} to {local}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def register(group: click.Group) -> None:
    """Add this module's commands to the root group."""
    for command in (exec_command, cp):
        group.add_command(command)
