"""What ``egpu image build`` puts in an image: profiles, optional feature sets, the build's
inputs and their cache key. Pure: values in, values out (the pipeline is ``vm/image_build.py``).

A profile is a list of Debian trixie packages (their dependency closure comes along, never their
recommends) plus packages taken from the testing suite ``forky`` when trixie's are too old.
``--with nvidia`` adds NVIDIA's own Debian repository (its open kernel modules, driver and CUDA
user space: Debian's non-free driver is 550, too old for RTX 50-series cards, which need the
open modules of 570 or later). That repository is configurable (``EGPU_NVIDIA_REPO``,
``EGPU_NVIDIA_KEYRING``) so a mirror or a local copy can stand in for it.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from egpu.errors import UsageError

SUITE = "trixie"
TESTING_SUITE = "forky"
DEBIAN_ARCH = {"aarch64": "arm64", "x86_64": "amd64"}
DEFAULT_SIZE = 16 << 30
MIN_SIZE = 2 << 30
MAX_SIZE = 2 << 40
ESP_MIB = 256
# Bump when the image layout changes in a way the inputs below cannot see.
BUILD_FORMAT = 1

# The packages every profile starts from: init, remote access, first-boot configuration, the
# guest agent, Python, and the kernel with its headers (out-of-tree modules such as NVIDIA's
# are built against them). The kernel's metapackage name carries the Debian architecture.
# iproute2: cloud-init renders its network config for systemd-networkd only when `ip` exists
# (without it the first boot ends "degraded": no network renderer found).
BASE_PACKAGES = (
    "systemd", "systemd-sysv", "udev", "dbus", "openssh-server", "cloud-init",
    "qemu-guest-agent", "python3", "initramfs-tools", "e2fsprogs", "ca-certificates", "iproute2",
    "linux-image-{debarch}", "linux-headers-{debarch}",
)
# Package names as Debian spells them (policy 5.6.1), with an optional :arch.
# docker.io only recommends its CLI, and builds install no recommends
DOCKER_PACKAGES = ("docker.io", "docker-cli")
DOCKER_FEATURE = "docker"
_PACKAGE = re.compile(r"[a-z0-9][a-z0-9+.-]{0,99}")

NVIDIA = "nvidia"
NVIDIA_REPO_ENV = "EGPU_NVIDIA_REPO"
NVIDIA_KEYRING_ENV = "EGPU_NVIDIA_KEYRING"
# NVIDIA's CUDA repository for Debian 13 is flat ("deb URL /"); its directory names the CPU as
# NVIDIA does (sbsa: Arm server base system architecture).
NVIDIA_DEFAULT_REPO = "https://developer.download.nvidia.com/compute/cuda/repos/debian13/{narch}/"
NVIDIA_ARCH = {"aarch64": "sbsa", "x86_64": "x86_64"}
NVIDIA_DEFAULT_KEYRING = "/usr/share/keyrings/cuda-archive-keyring.gpg"
# The open kernel modules (DKMS, built in the image against its kernel headers), the driver,
# and the CUDA driver library; 570 is the first branch that drives RTX 50-series cards.
NVIDIA_PACKAGES = ("nvidia-open", "nvidia-driver-cuda", "dkms")
NVIDIA_MIN_BRANCH = 570
_URL = re.compile(r"(?:https?|file)://[A-Za-z0-9._~:/?#@!$&'()*+,;=%-]{1,500}")


@dataclass(frozen=True)
class Profile:
    """A named package set: trixie packages, packages from forky, and the features it gives."""

    name: str
    description: str
    packages: tuple[str, ...]
    testing_packages: tuple[str, ...] = ()
    features: tuple[str, ...] = ()


PROFILES: dict[str, Profile] = {p.name: p for p in (
    Profile("base", "Debian trixie: systemd, ssh, cloud-init, guest agent, python3, kernel",
            BASE_PACKAGES, features=("ssh", "cloud-init", "qemu-guest-agent")),
    Profile("docker", "base + Docker (daemon and CLI)", (*BASE_PACKAGES, *DOCKER_PACKAGES),
            features=("ssh", "cloud-init", "qemu-guest-agent", DOCKER_FEATURE)),
    # llama.cpp's llama-server is not in trixie; forky's build is taken (and only what it
    # needs beyond trixie comes from forky, by apt's pin below). Docker too: vLLM ships as a
    # container, so `serve --backend vllm` and `docker up --profile ai` use the same image.
    Profile("ai", "docker + llama.cpp's llama-server (from forky)",
            (*BASE_PACKAGES, *DOCKER_PACKAGES), testing_packages=("llama.cpp-tools",),
            features=("ssh", "cloud-init", "qemu-guest-agent", DOCKER_FEATURE,
                      "llama-server")),
)}
EXTRAS = (NVIDIA,)


@dataclass(frozen=True)
class AptSource:
    """One extra apt source: a flat repository and the keyring its index is signed with."""

    url: str
    keyring: str

    def line(self) -> str:
        """The one-line form apt reads (a flat repository has the suite "/")."""
        return f"deb [signed-by={self.keyring}] {self.url} /"


@dataclass(frozen=True)
class NvidiaPlan:
    """What ``--with nvidia`` adds: a source, packages, and commands run in the image's chroot."""

    source: AptSource
    packages: tuple[str, ...]
    chroot_steps: tuple[tuple[str, ...], ...]
    min_branch: int = NVIDIA_MIN_BRANCH


def nvidia_plan(arch: str, env: Mapping[str, str]) -> NvidiaPlan:
    """The NVIDIA steps for ``arch``; the repository and keyring from the environment if set."""
    url = env.get(NVIDIA_REPO_ENV) or NVIDIA_DEFAULT_REPO.format(narch=NVIDIA_ARCH[arch])
    if not _URL.fullmatch(url):
        raise UsageError(f"{NVIDIA_REPO_ENV}={url[:80]!r} is not an http(s) or file URL")
    keyring = env.get(NVIDIA_KEYRING_ENV) or NVIDIA_DEFAULT_KEYRING
    if not keyring.startswith("/") or any(c in keyring for c in " ]\n\0"):
        raise UsageError(f"{NVIDIA_KEYRING_ENV} must be an absolute path without spaces")
    return NvidiaPlan(
        source=AptSource(url.rstrip("/") + "/", keyring),
        packages=NVIDIA_PACKAGES,
        chroot_steps=(
            # DKMS builds for the running kernel by default; the builder runs another one
            ("dkms", "autoinstall", "-k", "{kernel_version}"),
            # nouveau would bind the card before the NVIDIA driver could
            ("sh", "-c", "printf 'blacklist nouveau\\noptions nouveau modeset=0\\n' "
                         "> /etc/modprobe.d/egpu-nvidia.conf"),
            ("update-initramfs", "-u", "-k", "{kernel_version}"),
        ),
    )


def extra_steps_script(plan: NvidiaPlan, kernel_version: str) -> str:
    """The shell script the builder runs in the image's chroot for ``--with nvidia``."""
    lines = ["#!/bin/sh", "# egpu image build: --with nvidia (run in the image's chroot)",
             "set -e"]
    for step in plan.chroot_steps:
        lines.append(shlex.join(a.format(kernel_version=kernel_version) for a in step))
    return "\n".join(lines) + "\n"


def nvidia_branch(version: str) -> int | None:
    """The driver branch of an NVIDIA package version (``570.124.06-1`` -> 570)."""
    m = re.match(r"(?:\d+:)?(\d+)\.", version)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class BuildRequest:
    """What the user asked for, checked: the inputs of one build apart from package versions."""

    profile: Profile
    arch: str
    size: int = DEFAULT_SIZE
    extra_packages: tuple[str, ...] = ()
    extras: tuple[str, ...] = ()
    nvidia: NvidiaPlan | None = field(default=None)

    @property
    def debarch(self) -> str:
        return DEBIAN_ARCH[self.arch]

    def packages(self) -> list[str]:
        """The trixie packages to resolve (the profile's, the user's, NVIDIA's)."""
        names = [p.format(debarch=self.debarch) for p in self.profile.packages]
        names += self.extra_packages
        if self.nvidia is not None:
            names += self.nvidia.packages
        return list(dict.fromkeys(names))

    def testing_packages(self) -> list[str]:
        """Packages asked of apt as ``NAME/forky`` (their needs beyond trixie follow them)."""
        return [f"{p}/{TESTING_SUITE}" for p in self.profile.testing_packages]

    def features(self) -> list[str]:
        return [*self.profile.features, *self.extras]

    def suites(self) -> tuple[str, ...]:
        return (SUITE, TESTING_SUITE) if self.profile.testing_packages else (SUITE,)

    def describe(self) -> dict[str, object]:
        """Every input as JSON-able data (the cache key is a digest of it)."""
        nvidia = None
        if self.nvidia is not None:
            nvidia = {"source": self.nvidia.source.line(), "packages": list(self.nvidia.packages),
                      "steps": [list(s) for s in self.nvidia.chroot_steps]}
        return {"format": BUILD_FORMAT, "profile": self.profile.name, "arch": self.arch,
                "size": self.size, "packages": self.packages(),
                "testing": self.testing_packages(), "features": self.features(),
                "nvidia": nvidia}


def parse_request(profile: str, arch: str, size: int, packages: Sequence[str],
                  extras: Sequence[str], env: Mapping[str, str]) -> BuildRequest:
    """Check the command line's inputs; UsageError with what to type instead."""
    if profile not in PROFILES:
        raise UsageError(f"unknown profile {profile!r}",
                         hint=f"use one of: {', '.join(PROFILES)}")
    if arch not in DEBIAN_ARCH:
        raise UsageError(f"unknown architecture {arch!r}", hint="use aarch64 or x86_64")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise UsageError(f"image size {size} bytes is out of range (2G to 2T)")
    for p in packages:
        if not _PACKAGE.fullmatch(p):
            raise UsageError(f"--packages: {p[:60]!r} is not a Debian package name")
    for x in extras:
        if x not in EXTRAS:
            raise UsageError(f"--with {x[:40]!r} is not known", hint=f"use {', '.join(EXTRAS)}")
    plan = nvidia_plan(arch, env) if NVIDIA in extras else None
    return BuildRequest(PROFILES[profile], arch, size, tuple(dict.fromkeys(packages)),
                        tuple(dict.fromkeys(extras)), plan)


def cache_key(request: BuildRequest, resolved: Mapping[str, str], builder: bytes) -> str:
    """A digest of the request, the resolved package files (file name -> sha256) and the code
    that builds: the same inputs find the same cached image."""
    doc = {"request": request.describe(), "files": dict(sorted(resolved.items())),
           "builder": hashlib.sha256(builder).hexdigest()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

