"""Device options: what ``-o KEY=VALUE`` each function accepts, declared once as data (pure).

Each device module lists its options (name, type, default, help) in ``OPTIONS``; the registry
parses a server's ``KEY=VALUE`` strings against them before ``create`` sees typed values, and
``egpu vfio-user serve --help`` prints them. Sizes follow :mod:`egpu.units` (a bare number is
bytes).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from egpu.errors import UsageError
from egpu.units import format_size, parse_size

OptionValue = int | bool | Path | None
_TRUE = ("1", "on", "true", "yes")
_FALSE = ("0", "off", "false", "no")


class OptionType(enum.Enum):
    """How an option's text becomes a value; the value is the metavar ``--help`` shows."""

    SIZE = "SIZE"
    INT = "N"
    BOOL = "BOOL"
    PATH = "PATH"


@dataclass(frozen=True)
class DeviceOption:
    """One ``-o name=value`` a function accepts; ``minimum``/``maximum`` bound sizes and ints."""

    name: str
    type: OptionType
    default: OptionValue
    help: str
    minimum: int | None = None
    maximum: int | None = None
    default_text: str | None = None  # for --help when the default is computed at start

    def parse(self, text: str, label: str | None = None) -> OptionValue:
        """The value for ``text``; raises UsageError naming ``label`` (default: the option)."""
        what = label or f"option {self.name}"
        if self.type is OptionType.BOOL:
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise UsageError(f"{what} {text!r} is not a boolean", hint="use on or off")
        if self.type is OptionType.PATH:
            if not text:
                raise UsageError(f"{what} needs a path")
            return Path(text)
        if self.type is OptionType.SIZE:
            value = parse_size(text, what=what)
        else:
            try:
                value = int(text, 0)
            except ValueError:
                raise UsageError(f"{what} {text!r} is not a whole number") from None
        low, high = self.minimum, self.maximum
        if (low is not None and value < low) or (high is not None and value > high):
            raise UsageError(f"{what} {text!r} is out of range ({self.bounds()})")
        return value

    def bounds(self) -> str:
        """The allowed range in words (``at least 1M``, ``1 to 64``)."""
        show = format_size if self.type is OptionType.SIZE else str
        if self.maximum is None:
            return f"at least {show(self.minimum or 0)}"
        if self.minimum is None:
            return f"at most {show(self.maximum)}"
        return f"{show(self.minimum)} to {show(self.maximum)}"

    def pair(self, value: OptionValue) -> str:
        """``name=value`` as a server's command line takes it."""
        text = format_size(value) if self.type is OptionType.SIZE and isinstance(value, int) \
            else str(value)
        return f"{self.name}={text}"

    def describe(self) -> str:
        """One line for ``--help``: what it is, its bounds and its default."""
        if self.default_text is not None:
            default = self.default_text
        elif self.default is None:
            default = "none"
        elif self.type is OptionType.SIZE and isinstance(self.default, int):
            default = format_size(self.default)
        elif isinstance(self.default, bool):
            default = "on" if self.default else "off"
        else:
            default = str(self.default)
        bounds = "" if self.minimum is None and self.maximum is None else f"; {self.bounds()}"
        return f"{self.help} [default: {default}{bounds}]"


def parse_options(function: str, declared: Sequence[DeviceOption],
                  given: Mapping[str, str]) -> dict[str, OptionValue]:
    """Every declared option of ``function``, given values parsed, defaults for the rest."""
    by_name = {o.name: o for o in declared}
    unknown = sorted(set(given) - set(by_name))
    if unknown:
        known = ", ".join(by_name) or "none"
        raise UsageError(f"unknown {function} option(s): {', '.join(unknown)}",
                         hint=f"known: {known}")
    values: dict[str, OptionValue] = {}
    for option in declared:
        text = given.get(option.name)
        values[option.name] = (option.default if text is None
                               else option.parse(text, f"{function} option {option.name}"))
    return values
