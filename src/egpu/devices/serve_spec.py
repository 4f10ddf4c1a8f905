"""The device-server contract: what to serve, as one typed value both sides use (pure).

The vm layer writes a :class:`ServeSpec` to a file and starts ``egpu vfio-user serve --spec
FILE`` (:func:`serve_argv`); the CLI reads it back with :meth:`ServeSpec.from_json`, and its
``--socket/--function/-o`` form builds the same value with :meth:`ServeSpec.parse`. So no layer
but the CLI knows the server's option syntax, and the display's screenshot request file is a
field of the spec, not one of its ``-o`` strings.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from egpu.devices import create_device, device_options
from egpu.devices.base import DeviceBackend
from egpu.devices.options import OptionValue, parse_options
from egpu.errors import EgpuError

SERVE_COMMAND = ("vfio-user", "serve")  # the CLI command that runs one server
SPEC_OPTION = "--spec"  # its option naming a spec file
SCREENSHOT_REQUEST = "screenshot_request"  # the display option the spec carries as a field
SPEC_KEYS = frozenset({"function", "socket", "options", "screenshot_request"})


@dataclass(frozen=True)
class ServeSpec:
    """One device server: function model, socket, typed options, screenshot request file."""

    function: str  # a device model name (egpu.devices registry)
    socket: Path
    options: tuple[tuple[str, OptionValue], ...] = ()  # given options only, sorted by name
    screenshot_request: Path | None = None  # display only: where `egpu screenshot` asks

    @classmethod
    def parse(cls, function: str, socket: Path, given: Mapping[str, str]) -> ServeSpec:
        """The spec for ``-o`` text values (UsageError names a bad or unknown one)."""
        values = parse_options(function, device_options(function), given)  # validates all
        request = values.get(SCREENSHOT_REQUEST)
        typed = tuple(sorted((k, values[k]) for k in given if k != SCREENSHOT_REQUEST))
        return cls(function, socket, typed, request if isinstance(request, Path) else None)

    def option_text(self) -> dict[str, str]:
        """The options as the text ``-o`` takes (sizes in K/M/G), screenshot request included."""
        by_name = {o.name: o for o in device_options(self.function)}
        text = {k: by_name[k].pair(v).partition("=")[2] for k, v in self.options}
        if self.screenshot_request is not None:
            text[SCREENSHOT_REQUEST] = str(self.screenshot_request)
        return text

    def create_device(self) -> DeviceBackend:
        """Build the device this spec serves."""
        return create_device(self.function, self.option_text())

    def to_json(self) -> dict[str, object]:
        return {"function": self.function, "socket": str(self.socket),
                "options": {k: v for k, v in self.option_text().items()
                            if k != SCREENSHOT_REQUEST},
                "screenshot_request": None if self.screenshot_request is None
                else str(self.screenshot_request)}

    @classmethod
    def from_json(cls, data: object) -> ServeSpec:
        """A spec read back, every option validated again; ValueError when malformed."""
        if not isinstance(data, dict):
            raise ValueError("a serve spec is not an object")
        if set(data) != SPEC_KEYS:
            raise ValueError(f"a serve spec has exactly the keys {', '.join(sorted(SPEC_KEYS))}")
        function, socket, options = data["function"], data["socket"], data["options"]
        request = data["screenshot_request"]
        if not isinstance(function, str) or not isinstance(socket, str) or not socket:
            raise ValueError("function and socket must be strings")
        if not isinstance(options, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in options.items()):
            raise ValueError("options must map names to strings")
        if SCREENSHOT_REQUEST in options:
            raise ValueError(f"{SCREENSHOT_REQUEST} is a field of the spec, not an option")
        if request is not None and (not isinstance(request, str) or not request):
            raise ValueError("screenshot_request must be a path or null")
        given = dict(options)
        if request is not None:
            given[SCREENSHOT_REQUEST] = request
        try:
            return cls.parse(function, Path(socket), given)
        except EgpuError as e:
            raise ValueError(e.message) from None


def serve_argv(spec_file: Path) -> tuple[str, ...]:
    """The command that serves the spec stored in ``spec_file`` (this Python, this egpu)."""
    return (sys.executable, "-m", "egpu", *SERVE_COMMAND, SPEC_OPTION, str(spec_file))
