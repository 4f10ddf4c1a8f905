"""The device-server contract: one typed ServeSpec, validated both ways, one serve path."""

from __future__ import annotations

import json
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest

from egpu.devices.sample import SAMPLE_VENDOR_ID
from egpu.devices.serve_spec import SPEC_OPTION, ServeSpec, serve_argv
from egpu.engine.virtual import virtual_egpu_plan
from egpu.errors import UsageError
from egpu.vm import store
from test_vfio_user_cli import serving, stop_cleanly, wait_for_socket

SRC = Path(__file__).resolve().parents[1] / "src" / "egpu"


def test_options_are_typed_and_round_trip() -> None:
    spec = ServeSpec.parse("nvme", Path("/s/n.sock"), {"size": "64M", "backing": "/b"})
    assert dict(spec.options) == {"size": 64 << 20, "backing": Path("/b")}
    assert ServeSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec


def test_screenshot_request_is_a_field_not_an_option() -> None:
    spec = ServeSpec.parse("display", Path("/s"), {"screenshot_request": "/r"})
    assert spec.screenshot_request == Path("/r") and spec.options == ()
    assert spec.to_json()["options"] == {}
    with pytest.raises(ValueError, match="field of the spec"):
        ServeSpec.from_json({**spec.to_json(), "options": {"screenshot_request": "/x"}})


@pytest.mark.parametrize("change", [
    {"function": "gpu"}, {"function": 3}, {"socket": ""}, {"options": ["size=1M"]},
    {"options": {"size": "huge"}}, {"options": {"colour": "red"}}, {"screenshot_request": 1},
    {"extra": 1},
])
def test_a_malformed_spec_is_refused(change: dict[str, object]) -> None:
    good = ServeSpec.parse("nvme", Path("/s"), {"size": "1M"}).to_json()
    with pytest.raises(ValueError):
        ServeSpec.from_json({**good, **change})


def test_cli_form_refuses_a_bad_option_while_parsing() -> None:
    with pytest.raises(UsageError, match="size"):
        ServeSpec.parse("nvme", Path("/s"), {"size": "0"})


def test_the_plan_carries_specs_the_vm_layer_records_whole(tmp_path: Path) -> None:
    plan = virtual_egpu_plan(tmp_path, nvme_backing=tmp_path / "n.img")
    for server in plan.servers:
        launch = store.ServerLaunch(name=server.name, function=server.function,
                                    spec=server.spec, spec_file=str(server.spec_file),
                                    log=str(server.log))
        assert store.ServerLaunch.from_json(launch.to_json()) == launch
        assert launch.argv == serve_argv(server.spec_file)
        assert "-o" not in launch.argv and SPEC_OPTION in launch.argv


def test_vm_layer_formats_no_server_option_syntax() -> None:
    for path in (SRC / "vm").rglob("*.py"):
        text = path.read_text()
        for syntax in ('"vfio-user"', '"serve"', '"--socket"', '"--function"', "options="):
            assert syntax not in text, (path, syntax)


def test_serve_from_a_spec_file(egpu_home: Path) -> None:
    base = Path(tempfile.mkdtemp(prefix="vu", dir="/tmp"))
    spec = ServeSpec("sample", base / "priv" / "fn.sock")
    spec_file = base / "sample.spec.json"
    spec_file.write_text(json.dumps(spec.to_json()))
    with serving(serve_argv(spec_file)) as proc:
        wait_for_socket(spec.socket, proc)
        import socket

        from egpu.vfio_user.client import VfioUserClient
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(spec.socket))
            client = VfioUserClient(s)
            client.negotiate()
            assert client.region_read(7, 0, 2) == struct.pack("<H", SAMPLE_VENDOR_ID)
        stop_cleanly(proc)


@pytest.mark.parametrize(("content", "extra", "message"), [
    ("{", (), "--spec"),
    ('{"function": "sample"}', (), "exactly the keys"),
    (None, ("--function", "sample"), "replaces"),
])
def test_a_bad_spec_file_is_a_one_line_usage_error(
    tmp_path: Path, content: str | None, extra: tuple[str, ...], message: str,
) -> None:
    spec_file = tmp_path / "s.json"
    spec_file.write_text(content if content is not None else json.dumps(
        ServeSpec("sample", tmp_path / "x.sock").to_json()))
    proc = subprocess.run([*serve_argv(spec_file), *extra], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
