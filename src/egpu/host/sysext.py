"""The DriverKit extension's state, from ``systemextensionsctl list`` (macOS).

The output is a count line (``N extension(s)``), then per category a ``--- <category>`` line,
a tab-separated header (``enabled active teamID bundleID (version) name [state]``) and one row per
extension whose last field is its state in brackets, e.g. ``[activated enabled]``,
``[activated waiting for user]``, ``[terminated waiting to uninstall on reboot]``.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from typing import Literal

from egpu.errors import HostError
from egpu.host.device import DEXT_NAME

SYSTEMEXTENSIONSCTL = ("systemextensionsctl", "list")
TIMEOUT_S = 20
MAX_OUTPUT_BYTES = 4 * 1024 * 1024

DextStateName = Literal["enabled", "waiting", "uninstalling", "inactive", "not-installed"]
_RANK: dict[str, int] = {
    "enabled": 4, "waiting": 3, "inactive": 2, "uninstalling": 1, "not-installed": 0,
}
_COUNT_RE = re.compile(r"^\s*\d+\s+extension\(s\)\s*$")
_STATE_RE = re.compile(r"\[([^\[\]]*)\]\s*$")


@dataclass(frozen=True)
class DextState:
    """Where the passthrough DriverKit extension stands."""

    state: DextStateName
    detail: str | None = None  # the bracketed state text, verbatim
    bundle_id: str | None = None
    version: str | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "state": self.state, "detail": self.detail,
            "bundle_id": self.bundle_id, "version": self.version,
        }


def classify(bracket: str) -> DextStateName:
    """Map a bracketed state (``activated enabled``, ...) to a DextState name."""
    b = bracket.lower()
    if "activated enabled" in b:
        return "enabled"
    if "waiting for user" in b:
        return "waiting"
    if "uninstall" in b or "terminated" in b:
        return "uninstalling"
    return "inactive"


def parse_systemextensions(
    text: str, bundle_id: str, *, origin: str = "systemextensionsctl list"
) -> DextState:
    """The state of ``bundle_id`` (or of any extension named VFIOUserPCIDriver) in the listing."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines or not (_COUNT_RE.match(lines[0]) or lines[0].startswith("---")):
        raise HostError(
            f"{origin}: not `systemextensionsctl list` output (expected 'N extension(s)' first)"
        )
    best: DextState | None = None
    for line in lines[1:]:
        if line.startswith("---") or line.lstrip().startswith("enabled"):
            continue
        fields = [f.strip() for f in line.split("\t")]
        m = _STATE_RE.search(line)
        if m is None:
            continue
        bundle, version = None, None
        for f in fields:
            bm = re.match(r"^(\S+)\s+\(([^)]*)\)$", f)
            if bm:
                bundle, version = bm[1], bm[2]
        names = {f for f in fields if f}
        if bundle != bundle_id and DEXT_NAME not in names and not (
            bundle and bundle.endswith("." + DEXT_NAME)
        ):
            continue
        found = DextState(classify(m[1]), m[1], bundle, version)
        if best is None or _RANK[found.state] > _RANK[best.state]:
            best = found
    return best or DextState("not-installed")


def read_live_systemextensions() -> str:
    """Run ``systemextensionsctl list`` on this Mac."""
    try:
        proc = subprocess.run(
            list(SYSTEMEXTENSIONSCTL), capture_output=True, timeout=TIMEOUT_S,
            stdin=subprocess.DEVNULL, check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise HostError(f"cannot run systemextensionsctl: {e}") from e
    if proc.returncode != 0:
        raise HostError(f"systemextensionsctl list failed with exit {proc.returncode}")
    return proc.stdout[:MAX_OUTPUT_BYTES].decode("utf-8", "replace")
