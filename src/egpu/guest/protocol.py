"""What the host and the built-in guest say to each other over the serial console. Pure.

The host passes settings on the kernel command line (``egpu.<key>=<value>``; the guest's init
exports each as ``EGPU_<KEY>`` to its check scripts). The guest prints :data:`READY_MARKER` on a
line of its own once its drivers are loaded, and in self-test mode one result line::

    EGPU-SELFTEST {"ok": true, "checks": [{"name": "pci", "ok": true, "detail": "..."}]}

The guest is untrusted: :func:`parse_selftest` bounds every size and never raises.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

ARCHES = ("aarch64", "x86_64")
# the first serial port of each machine type egpu uses (virt: PL011; q35/pc: 16550)
CONSOLES = {"aarch64": "ttyAMA0", "x86_64": "ttyS0"}
READY_MARKER = "EGPU-GUEST-READY"
SELFTEST_MARKER = "EGPU-SELFTEST"
PARAM_PREFIX = "egpu."
SELFTEST_PARAM = "egpu.selftest"
CPUS_PARAM = "egpu.cpus"
MEMORY_PARAM = "egpu.mem_mib"
CHECKS_PARAM = "egpu.checks"
# shared folders: egpu.mounts=TAG:ro|rw:PATH,... with PATH percent-encoded (every byte outside
# [A-Za-z0-9/._-]), so spaces, commas and quotes survive the command line; egpu.msize=BYTES
MOUNTS_PARAM = "egpu.mounts"
MSIZE_PARAM = "egpu.msize"
# 9p's largest message: 512 KiB, about the most Linux's virtio transport takes (its ring of
# 128 descriptors of 4 KiB pages). bench/ninep_vs_blk.py --msize: never slower than 128 KiB,
# 1.6x faster once read-ahead keeps requests in flight (figures in bench/README.md)
MOUNT_MSIZE = 512 * 1024
_MOUNT_TAG = re.compile(r"[a-z][a-z0-9]{0,30}")  # 9p tags: at most 31 bytes
_PATH_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789/._-")
# Linux's COMMAND_LINE_SIZE on arm64 and x86 (arch/*/include/uapi/asm/setup.h), with its NUL
MAX_CMDLINE = 2048 - 1
# the checks every built-in guest can pass whatever devices it has
BASE_CHECKS = ("pci", "memory", "cpus")
# panic=-1: reboot at once on a panic, which ends QEMU under -no-reboot instead of hanging.
# loglevel=3: only errors reach the console, so kernel chatter cannot split our marker lines
# and the slow emulated UART does not hold the boot back.
# cryptomgr.notests and the two initcalls skipped are crypto self-tests and the jitter entropy
# source's start-up sampling: together about 0.5 s of a TCG boot, and nothing here needs them
# (the kernel seeds its RNG from the platform; FIPS mode is off).
BASE_CMDLINE = ("panic=-1", "quiet", "loglevel=3", "cryptomgr.notests",
                "initcall_blacklist=crypto_kdf108_init,jent_mod_init")

# bounds on what a guest may send (a real result is a few hundred bytes)
MAX_RESULT_LINE = 64 * 1024
MAX_CHECKS = 256
MAX_DETAIL = 1024
_CHECK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_EXTRA_ARG = re.compile(r"[^\s\"']+")
# firmware and the kernel reset the terminal (ESC c, ESC [2J ...) on the same serial line
_ESCAPE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|[@-~])")


class _HasArch(Protocol):
    @property
    def arch(self) -> str: ...


@dataclass(frozen=True)
class CheckResult:
    """One guest check: a short name, pass/fail, and a human-readable detail."""

    name: str
    ok: bool
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


@dataclass(frozen=True)
class SelfTestResult:
    """The guest's self-test verdict; ``error`` says why the result line was unusable."""

    ok: bool
    checks: tuple[CheckResult, ...] = field(default_factory=tuple)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": self.ok, "checks": [c.as_dict() for c in self.checks]}
        if self.error is not None:
            out["error"] = self.error
        return out


def console_for(arch: str) -> str:
    """The guest console device for an architecture."""
    try:
        return CONSOLES[arch]
    except KeyError:
        raise ValueError(f"unknown guest architecture {arch!r}; use {' or '.join(ARCHES)}") \
            from None


@dataclass(frozen=True)
class GuestMount:
    """A shared folder as the built-in guest mounts it: 9p tag, mount point, read-only."""

    tag: str
    path: str
    readonly: bool


def encode_path(path: str) -> str:
    """``path`` with every byte outside ``[A-Za-z0-9/._-]`` as ``%XX`` (the guest's init
    decodes it with printf)."""
    return "".join(chr(b) if b in _PATH_SAFE else f"%{b:02X}" for b in os.fsencode(path))


def mounts_arg(mounts: Sequence[GuestMount], msize: int = MOUNT_MSIZE) -> list[str]:
    """The kernel arguments that make the built-in guest mount ``mounts`` before it is ready."""
    if not mounts:
        return []
    for m in mounts:
        if not _MOUNT_TAG.fullmatch(m.tag) or not m.path.startswith("/"):
            raise ValueError(f"bad guest mount {m!r}")
    entries = ",".join(f"{m.tag}:{'ro' if m.readonly else 'rw'}:{encode_path(m.path)}"
                       for m in mounts)
    return [f"{MOUNTS_PARAM}={entries}", f"{MSIZE_PARAM}={msize}"]


def kernel_cmdline(target: str | _HasArch, *, selftest: bool, cpus: int, memory_mib: int,
                   checks: Sequence[str] | None = None, extra: Sequence[str] = (),
                   mounts: Sequence[GuestMount] = ()) -> str:
    """The built-in guest's kernel command line for an arch (or GuestAssets).

    ``checks`` names the self-checks to run (in the guest's order); None runs every one.
    ValueError when it is longer than the kernel takes (many or long mount paths).
    """
    arch = target if isinstance(target, str) else target.arch
    if cpus < 1 or memory_mib < 1:
        raise ValueError("cpus and memory must be positive")
    for arg in extra:
        if not _EXTRA_ARG.fullmatch(arg):
            raise ValueError(f"bad kernel argument {arg!r}")
    args = [f"console={console_for(arch)}", *BASE_CMDLINE,
            f"{CPUS_PARAM}={cpus}", f"{MEMORY_PARAM}={memory_mib}"]
    if selftest:
        args.append(f"{SELFTEST_PARAM}=1")
    if checks is not None:
        if not checks or not all(_CHECK_NAME.fullmatch(c) for c in checks):
            raise ValueError(f"bad self-check names {list(checks)!r}")
        args.append(f"{CHECKS_PARAM}={','.join(checks)}")
    line = " ".join([*args, *mounts_arg(mounts), *extra])
    if len(line.encode()) > MAX_CMDLINE:
        raise ValueError(f"the guest's kernel command line would be {len(line.encode())} bytes, "
                         f"more than the kernel's {MAX_CMDLINE}")
    return line


def _lines(text: str) -> list[str]:
    text = _ESCAPE.sub("", text) if "\x1b" in text else text
    return [ln.strip() for ln in text.replace("\r", "\n").split("\n")]


def find_ready(text: str) -> bool:
    """True once the console text holds the ready marker on a line of its own."""
    return READY_MARKER in text and READY_MARKER in _lines(text)


def _printable(text: str) -> str:
    # details end up on the user's terminal: no escape sequences from the guest
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def _error(message: str) -> SelfTestResult:
    return SelfTestResult(ok=False, error=message)


def parse_selftest(text: str) -> SelfTestResult | None:
    """The self-test result in console text; None while there is none yet.

    Only complete lines count (a result still arriving is not yet a result): pass the text with
    a final newline once the guest has stopped. A malformed, oversized or inconsistent line
    yields a failed result with ``error`` set.
    """
    text = text[:max(text.rfind("\n"), text.rfind("\r")) + 1]
    prefix = SELFTEST_MARKER + " "
    found = [ln for ln in _lines(text) if ln.startswith(prefix)] if SELFTEST_MARKER in text else []
    if not found:
        return None
    line = found[-1][len(prefix):]
    if len(line) > MAX_RESULT_LINE:
        return _error(f"self-test line longer than {MAX_RESULT_LINE} characters")
    try:
        doc = json.loads(line)
    except (ValueError, RecursionError):
        return _error("self-test line is not valid JSON")
    if not isinstance(doc, dict) or not isinstance(doc.get("ok"), bool) \
            or not isinstance(doc.get("checks"), list):
        return _error("self-test line lacks 'ok' and 'checks'")
    raw_checks: list[Any] = doc["checks"]
    if len(raw_checks) > MAX_CHECKS:
        return _error(f"self-test reported more than {MAX_CHECKS} checks")
    checks: list[CheckResult] = []
    for raw in raw_checks:
        if not isinstance(raw, dict):
            return _error("self-test check is not an object")
        name, ok, detail = raw.get("name"), raw.get("ok"), raw.get("detail", "")
        if not isinstance(name, str) or not _CHECK_NAME.fullmatch(name):
            return _error("self-test check has a bad name")
        if not isinstance(ok, bool) or not isinstance(detail, str):
            return _error(f"self-test check {name} has a bad 'ok' or 'detail'")
        checks.append(CheckResult(name, ok, _printable(detail[:MAX_DETAIL])))
    all_ok = bool(checks) and all(c.ok for c in checks)
    if doc["ok"] != all_ok:
        return SelfTestResult(False, tuple(checks), "self-test verdict disagrees with its checks")
    return SelfTestResult(all_ok, tuple(checks), None if checks else "self-test ran no checks")
