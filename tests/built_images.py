"""egpu-built Debian images in tests: one build per profile, cached in the shared cache by its
inputs (only the first run pays), and a VM booted from one awaited until its guest agent answers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from conftest import SHARED_CACHE, Cli
from egpu.paths import CACHE_ENV, HOME_ENV

ARCH = "x86_64"  # the host's: the faster of the two under TCG here
BUILD_TIMEOUT_S = 3 * 3600  # cold: the whole package set and dpkg in the builder VM under TCG
AGENT_TIMEOUT_S = 900.0  # firmware, systemd, cloud-init's first boot, then qemu-ga, under TCG
KERNEL_PANIC = "Kernel panic - not syncing"
# The docker and serve tests boot one image: the ai profile (llama-server and Docker).
WORKLOAD = ("ai",)


def built_image(tmp_path_factory: pytest.TempPathFactory, *profile: str) -> Path:
    """The image ``egpu image build PROFILE...`` makes for ARCH (built once, then cached)."""
    home = tmp_path_factory.mktemp("build-home")
    runner = Cli({**os.environ, HOME_ENV: str(home), CACHE_ENV: str(SHARED_CACHE)}, home)
    proc = runner("image", "build", *profile, "--arch", ARCH, "--json", timeout=BUILD_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    image = Path(json.loads(proc.stdout)["image"])
    assert image.is_file()
    return image


def wait_for_agent(cli: Cli, name: str, timeout: float = AGENT_TIMEOUT_S) -> None:
    """Wait until the VM's guest agent answers; fail at once on a kernel panic on its console."""
    serial = cli.home / "data/vms" / name / "serial.log"

    def agent_answers(status: dict[str, Any]) -> bool:
        text = serial.read_text(errors="replace") if serial.exists() else ""
        assert KERNEL_PANIC not in text, text[-3000:]  # no pvpanic this early: fail now
        return (status.get("agent") or {}).get("answering") is True

    cli.wait_for(name, agent_answers, timeout=timeout)
