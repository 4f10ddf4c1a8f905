"""``egpu ports``: a VM's port forwards, as its supervisor keeps them (``ports.json``)."""

from __future__ import annotations

from typing import Any

import click

from egpu.cli import output
from egpu.engine.argv import FORWARD_HOST_ADDRESS
from egpu.vm import store
from egpu.vm.status import inspect

COLUMNS = ("HOST", "GUEST", "KIND", "STATE", "REASON")


@click.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
def ports(name: str, as_json: bool) -> None:
    """List a VM's port forwards (127.0.0.1 on the host to the guest) and their states."""
    vm = store.VmDir(name).require()
    state = inspect(vm).state
    table = vm.read_ports() if state == "running" else None
    forwards = table.forwards if table else ()
    if as_json:
        doc: dict[str, Any] = {
            "name": name, "state": state, "automatic": table.automatic if table else None,
            "guest_error": table.guest_error if table else None,
            "forwards": [f.to_json() for f in forwards]}
        output.emit_json(doc)
        return
    if state != "running":
        output.notice(f"VM {name!r} is {state}: it forwards no ports")
        return
    if table is None:
        output.notice(f"VM {name!r} has no port table yet (its supervisor writes one each round)")
        return
    output.table(COLUMNS, [
        [f"{FORWARD_HOST_ADDRESS}:{f.host_port}" if f.host_port else None, f.guest_port,
         f.kind, f.state, f.reason] for f in forwards])
    if not table.automatic:
        output.notice("automatic forwarding is off (--no-port-forwarding)")
    elif table.guest_error:
        output.notice(f"guest listeners unknown: {table.guest_error}")


def register(group: click.Group) -> None:
    """Add this module's commands to the root group."""
    group.add_command(ports)
