"""Where egpu keeps things: ``EGPU_HOME`` when set, else the platform's data and cache dirs.

Layout (all under one root when ``EGPU_HOME`` is set)::

    data/vms/<name>/        one directory per VM (see egpu.vm.store)
    data/devices/           storage of device servers run on their own (egpu vfio-user serve)
    data/ssh/               egpu's ssh key pair, when ~/.ssh has none (see egpu.vm.sshkeys)
    cache/engine/           the private QEMU engine
    cache/guest/<arch>/     built-in guest kernel + initramfs
    cache/debs/             downloaded distribution packages
    cache/images/           OCI blobs by digest
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs

APP_NAME = "egpu"
HOME_ENV = "EGPU_HOME"
# Tests give each case its own EGPU_HOME but share one cache (engine, guest assets) through this.
CACHE_ENV = "EGPU_CACHE"


@dataclass(frozen=True)
class Dirs:
    """The two roots egpu writes under."""

    data: Path
    cache: Path

    @property
    def vms(self) -> Path:
        return self.data / "vms"

    @property
    def devices(self) -> Path:
        return self.data / "devices"

    @property
    def ssh(self) -> Path:
        """egpu's own ssh key pair, made once per user when ~/.ssh has none to use."""
        return self.data / "ssh"

    @property
    def engine(self) -> Path:
        return self.cache / "engine"

    @property
    def guest(self) -> Path:
        return self.cache / "guest"

    @property
    def debs(self) -> Path:
        return self.cache / "debs"

    @property
    def images(self) -> Path:
        return self.cache / "images"


def dirs() -> Dirs:
    """Resolve egpu's directories from the environment (read each call, so tests can switch)."""
    home = os.environ.get(HOME_ENV)
    cache = os.environ.get(CACHE_ENV)
    if home:
        root = Path(home).expanduser().absolute()
        data, default_cache = root / "data", root / "cache"
    else:
        data = Path(platformdirs.user_data_dir(APP_NAME))
        default_cache = Path(platformdirs.user_cache_dir(APP_NAME))
    return Dirs(data=data, cache=Path(cache).expanduser().absolute() if cache else default_cache)
