"""QEMU's option-string syntax, written once: every value egpu puts into an option goes through
here, so a path or a name is always exactly one value and never further options.

QemuOpts (``-drive``, ``-chardev``, ``-device``, ``-name``, ...) splits ``KEY=VALUE`` pairs at
single commas and reads a doubled comma inside a value as one comma (QEMU's util/qemu-option.c,
``get_opt_value``). Keys are always written out: a value in the implied first position would be
read as ``KEY=VALUE`` if it held an ``=``. JSON ``-device`` arguments are safe for any string
QEMU's JSON parser takes: valid Unicode without NUL.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

from egpu.errors import UsageError

SEPARATOR = ","
ESCAPED_SEPARATOR = ",,"
NUL = "\x00"
# a driver, backend or key: what QEMU accepts as a name (no separator, no '=')
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

OptionValue = str | int | bool | Path


def _text(value: OptionValue, what: str) -> str:
    """One option value as text; UsageError when no escaping can carry it."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, Path):
        # a relative file name could read as a block protocol ("nbd:...", "json:{...}")
        if not value.is_absolute():
            raise UsageError(f"{what} {str(value)!r} must be an absolute path")
        value = str(value)
    text = str(value)
    if NUL in text:
        raise UsageError(f"{what} {text!r} contains a NUL byte, which QEMU cannot take")
    return text


def escape(value: OptionValue, what: str = "value") -> str:
    """``value`` as QemuOpts reads it back unchanged: each comma doubled."""
    return _text(value, what).replace(SEPARATOR, ESCAPED_SEPARATOR)


def option_string(head: str | None, options: Mapping[str, OptionValue]) -> str:
    """``HEAD,KEY=VALUE,...`` (``head``: the driver or backend, or None) with values escaped."""
    parts = [] if head is None else [_name(head)]
    parts += [f"{_name(key)}={escape(value, key)}" for key, value in options.items()]
    return SEPARATOR.join(parts)


def _name(text: str) -> str:
    if not _NAME_RE.fullmatch(text):
        raise UsageError(f"{text!r} is not a QEMU option or driver name")
    return text


def json_option(doc: Mapping[str, object]) -> str:
    """A JSON option argument (``-device {...}``); refuses strings QEMU's parser cannot take."""
    _check_json_strings(doc)
    return json.dumps(doc, separators=(",", ":"))


def _check_json_strings(value: object) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            # a file name that is not UTF-8 (Python keeps its bytes as lone surrogates)
            raise UsageError(f"{value!r} is not valid UTF-8, which QEMU's JSON needs") from None
        if NUL in value:
            raise UsageError(f"{value!r} contains a NUL byte, which QEMU cannot take")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _check_json_strings(key)
            _check_json_strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            _check_json_strings(item)
