"""Device options are declared per function; the virtual eGPU plan speaks that declaration."""

from __future__ import annotations

from pathlib import Path

import pytest

from egpu.devices import DEVICE_MODULES, device_options
from egpu.devices.display import SCREENSHOT_REQUEST
from egpu.devices.options import DeviceOption, OptionType, parse_options
from egpu.devices.serve_spec import ServeSpec
from egpu.engine.virtual import DEFAULT_NVME_SIZE, virtual_egpu_plan
from egpu.errors import UsageError
from egpu.units import MIB

DECLARED = (
    DeviceOption("size", OptionType.SIZE, 4 * MIB, "a size", minimum=MIB),
    DeviceOption("count", OptionType.INT, 2, "a count", minimum=1, maximum=8),
    DeviceOption("flag", OptionType.BOOL, False, "a flag"),
    DeviceOption("file", OptionType.PATH, None, "a file"),
)


def test_defaults_fill_what_was_not_given() -> None:
    values = parse_options("f", DECLARED, {"count": "0x3", "flag": "ON"})
    assert values == {"size": 4 * MIB, "count": 3, "flag": True, "file": None}


@pytest.mark.parametrize(
    ("given", "words"),
    [
        ({"nope": "1"}, "unknown f option(s): nope (known: size, count, flag, file)"),
        ({"count": "9"}, "f option count '9' is out of range (1 to 8)"),
        ({"size": "1K"}, "f option size '1K' is out of range (at least 1M)"),
        ({"flag": "2"}, "f option flag '2' is not a boolean"),
        ({"file": ""}, "f option file needs a path"),
    ],
)
def test_bad_values_name_the_function_and_option(given: dict[str, str], words: str) -> None:
    with pytest.raises(UsageError) as e:
        parse_options("f", DECLARED, given)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_every_function_declares_its_options() -> None:
    for name in DEVICE_MODULES:
        declared = device_options(name)
        assert len({o.name for o in declared}) == len(declared)
        for option in declared:
            assert option.help and option.describe().endswith("]")


def test_the_virtual_egpu_plan_passes_options_its_functions_declare(tmp_path: Path) -> None:
    plan = virtual_egpu_plan(tmp_path, nvme_backing=tmp_path / "n.img")
    for server in plan.servers:
        given = server.spec.option_text()
        parse_options(server.name, device_options(server.name), given)  # raises if not
        assert ServeSpec.from_json(server.spec.to_json()) == server.spec
    display = next(s for s in plan.servers if s.name == "display")
    assert display.spec.screenshot_request == plan.screenshot_request
    assert SCREENSHOT_REQUEST.name not in dict(display.spec.options)  # a field, not an option
    nvme = next(s for s in plan.servers if s.name == "nvme")
    assert nvme.spec.option_text()["size"] == DEFAULT_NVME_SIZE
