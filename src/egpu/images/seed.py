"""A full image's first-boot configuration as a cloud-init NoCloud seed (pure: values in, text out).

cloud-init's NoCloud source reads ``meta-data`` and ``user-data`` (and optionally
``network-config``) from a filesystem labelled ``cidata`` (cloud-init's
doc/rtd/reference/datasources/nocloud.rst). egpu writes: the VM name as hostname, a login
user of its own (Lima-style: passwordless sudo, the host's public keys), the same keys for the
image's default user, 9p mounts, and the user's own ``--cloud-init`` file merged in
(:func:`merge_user_data`).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from egpu.errors import UsageError

LABEL = "cidata"  # the filesystem label NoCloud looks for
META_DATA = "meta-data"
USER_DATA = "user-data"
NETWORK_CONFIG = "network-config"
CLOUD_CONFIG_HEADER = "#cloud-config"
INSTANCE_ID_PREFIX = "iid-egpu-"
# a cloud-config for one VM is a few KiB; anything far larger is not one
MAX_USER_DATA_BYTES = 64 * 1024
MAX_PUBLIC_KEYS = 64
MAX_PUBLIC_KEY_CHARS = 16 * 1024  # an RSA-16384 key is about 2.8 KiB of base64
FALLBACK_USER = "egpu"
LOGIN_SHELL = "/bin/bash"
SUDO_RULE = "ALL=(ALL) NOPASSWD:ALL"
# the user's lists append to egpu's; any other key of theirs replaces egpu's value, except these
APPEND_KEYS = ("users", "ssh_authorized_keys", "runcmd", "mounts", "packages")
EGPU_ONLY_KEYS = ("hostname",)
# 9p shares over virtio: the options Linux's 9p client takes (Documentation/filesystems/9p.rst)
NINEP_FSTYPE = "9p"
NINEP_OPTIONS = ("trans=virtio", "version=9p2000.L")
FSTAB_DUMP, FSTAB_PASS = "0", "0"
# qemu-guest-agent is in egpu's images; an image without it is left as it is
GUEST_AGENT_CMD = ["sh", "-c", "systemctl enable --now qemu-guest-agent 2>/dev/null || true"]

# RFC 1123 host name labels; at most 253 characters in all
_LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
MAX_HOSTNAME = 253
# Debian's adduser NAME_REGEX, bounded by useradd's 32 bytes
_LINUX_USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
# names every Debian or Ubuntu image already has as system accounts: never the login user
RESERVED_USERS = frozenset({
    "root", "daemon", "bin", "sys", "sync", "games", "man", "lp", "mail", "news", "uucp",
    "proxy", "www-data", "backup", "list", "irc", "gnats", "nobody", "messagebus", "sshd",
    "syslog", "systemd-network", "systemd-resolve", "systemd-timesync", "_apt", "polkitd",
})
# an OpenSSH public key line: type, base64 blob, optional comment (no options prefix)
_PUBLIC_KEY_RE = re.compile(r"(ssh-[a-z0-9-]+|ecdsa-sha2-[a-z0-9-]+|sk-[a-z0-9@.-]+)"
                            r" [A-Za-z0-9+/]+={0,3}( [^\r\n]*)?")
# a 9p mount tag: QEMU's mount_tag is at most 31 bytes; a guest path is absolute, no spaces
MAX_MOUNT_TAG = 31
_MOUNT_TAG_RE = re.compile(r"[A-Za-z0-9_.-]{1,31}")
_GUEST_PATH_RE = re.compile(r"/[A-Za-z0-9._/+@-]*")


@dataclass(frozen=True)
class SeedMount:
    """One 9p share the guest mounts at boot: QEMU's mount tag, where, read-only or not."""

    tag: str
    guest_path: str
    readonly: bool = False

    def fstab_entry(self) -> list[str]:
        """cloud-config ``mounts:`` entry: fstab's six fields."""
        if not _MOUNT_TAG_RE.fullmatch(self.tag):
            raise UsageError(f"bad 9p mount tag {self.tag!r}: letters, digits, '_', '.', '-', "
                             f"at most {MAX_MOUNT_TAG}")
        if not _GUEST_PATH_RE.fullmatch(self.guest_path) or "/../" in f"{self.guest_path}/":
            raise UsageError(f"bad guest mount path {self.guest_path!r}: an absolute path of "
                             "letters, digits and ._/+@-")
        options = (*NINEP_OPTIONS, "ro") if self.readonly else NINEP_OPTIONS
        return [self.tag, self.guest_path, NINEP_FSTYPE, ",".join(options), FSTAB_DUMP,
                FSTAB_PASS]


@dataclass(frozen=True)
class SeedSpec:
    """Everything one VM's seed says."""

    hostname: str
    instance_id: str
    user: str
    public_keys: tuple[str, ...]
    mounts: tuple[SeedMount, ...] = ()
    user_data: Mapping[str, Any] | None = None  # the user's --cloud-init, already parsed


def check_hostname(name: str) -> str:
    """A VM name usable as the guest's host name (RFC 1123), or UsageError."""
    if len(name) > MAX_HOSTNAME or not all(_LABEL_RE.fullmatch(p) for p in name.split(".")):
        raise UsageError(
            f"VM name {name!r} is not a valid host name for the guest: use letters, digits "
            "and '-' (dots between parts), no '_' and no '-' at either end",
            hint="pick another --name, or --no-seed to boot the image unconfigured")
    return name


def login_user(host_user: str | None) -> str:
    """The guest user egpu creates: the host user's name when Linux takes it, else ``egpu``."""
    if host_user and _LINUX_USER_RE.fullmatch(host_user) and host_user not in RESERVED_USERS:
        return host_user
    return FALLBACK_USER


def new_instance_id() -> str:
    """A fresh NoCloud instance-id (one per VM creation: cloud-init's first boot runs once)."""
    return f"{INSTANCE_ID_PREFIX}{uuid.uuid4().hex}"


def check_public_keys(keys: Sequence[str]) -> tuple[str, ...]:
    """OpenSSH public key lines, each one line of the expected shape; UsageError otherwise."""
    if not keys:
        raise UsageError("no ssh public key for the guest's login user")
    if len(keys) > MAX_PUBLIC_KEYS:
        raise UsageError(f"{len(keys)} ssh public keys: at most {MAX_PUBLIC_KEYS}")
    for key in keys:
        if len(key) > MAX_PUBLIC_KEY_CHARS or not _PUBLIC_KEY_RE.fullmatch(key):
            raise UsageError(f"not an OpenSSH public key line: {key[:60]!r}")
    return tuple(keys)


def meta_data(spec: SeedSpec) -> str:
    """NoCloud ``meta-data``: the instance-id and the host name."""
    check_hostname(spec.hostname)
    return _dump({"instance-id": spec.instance_id, "local-hostname": spec.hostname})


def egpu_user_data(spec: SeedSpec) -> dict[str, Any]:
    """egpu's own cloud-config, before the user's file is merged in."""
    keys = list(check_public_keys(spec.public_keys))
    doc: dict[str, Any] = {
        "hostname": check_hostname(spec.hostname),
        # "default" keeps the image's own user (ubuntu on Ubuntu cloud images)
        "users": ["default", {
            "name": spec.user, "gecos": "egpu login user", "shell": LOGIN_SHELL,
            "sudo": SUDO_RULE, "lock_passwd": True, "ssh_authorized_keys": keys,
        }],
        "ssh_authorized_keys": list(keys),  # for the image's default user (a copy: no anchor)
        "ssh_pwauth": False,
        "runcmd": [GUEST_AGENT_CMD],
    }
    if spec.mounts:
        doc["mounts"] = [m.fstab_entry() for m in spec.mounts]
    return doc


def merge_user_data(ours: Mapping[str, Any], theirs: Mapping[str, Any] | None) -> dict[str, Any]:
    """Merge the user's cloud-config into egpu's: egpu's keys first, the user's lists append
    (APPEND_KEYS), the user's other values win, except the host name (EGPU_ONLY_KEYS)."""
    merged = dict(ours)
    for key, value in (theirs or {}).items():
        if key in EGPU_ONLY_KEYS and key in ours:
            continue
        if key in APPEND_KEYS:
            if not isinstance(value, list):
                raise UsageError(f"--cloud-init: {key} must be a list, not "
                                 f"{type(value).__name__}")
            merged[key] = [*merged.get(key, []), *value]
        else:
            merged[key] = value
    return merged


def user_data(spec: SeedSpec) -> str:
    """NoCloud ``user-data``: a ``#cloud-config`` document."""
    doc = merge_user_data(egpu_user_data(spec), spec.user_data)
    return f"{CLOUD_CONFIG_HEADER}\n{_dump(doc)}"


def seed_files(spec: SeedSpec) -> dict[str, bytes]:
    """The files of the ``cidata`` filesystem, by name."""
    return {META_DATA: meta_data(spec).encode(), USER_DATA: user_data(spec).encode()}


def parse_user_cloud_config(data: bytes, source: str) -> dict[str, Any]:
    """The user's ``--cloud-init`` file: a ``#cloud-config`` YAML mapping, or UsageError.

    Other user-data kinds (``#include``, ``#!`` scripts, MIME multipart, jinja) are refused:
    egpu merges keys, which only a cloud-config has.
    """
    what = f"--cloud-init {source}"
    if len(data) > MAX_USER_DATA_BYTES:
        raise UsageError(f"{what}: larger than {MAX_USER_DATA_BYTES // 1024} KiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{what}: not UTF-8 text") from None
    first = text.lstrip("\ufeff").split("\n", 1)[0].rstrip()
    if first != CLOUD_CONFIG_HEADER:
        raise UsageError(f"{what}: the first line must be {CLOUD_CONFIG_HEADER!r} "
                         f"(found {first[:40]!r})",
                         hint="egpu merges cloud-config keys; other user-data kinds are refused")
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UsageError(f"{what}: not valid YAML{where}") from None
    except RecursionError:
        raise UsageError(f"{what}: nested too deeply") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise UsageError(f"{what}: a cloud-config is a mapping, not a {type(doc).__name__}")
    bad = [k for k in doc if not isinstance(k, str)]
    if bad:  # a list, not next(..., None): the bad key may itself be None (`?` alone)
        raise UsageError(f"{what}: key {bad[0]!r} is not a string")
    return doc


def _dump(doc: Mapping[str, Any]) -> str:
    try:
        # ASCII out, everything else escaped: PyYAML writes some characters it reads back
        # differently when left raw (U+0085 becomes a line break)
        return yaml.safe_dump(dict(doc), sort_keys=False, default_flow_style=False,
                              allow_unicode=False, width=1 << 16)
    except (yaml.YAMLError, RecursionError) as e:  # a value safe_load made but cannot write
        raise UsageError(f"--cloud-init: cannot write it back as YAML: {e}") from None
