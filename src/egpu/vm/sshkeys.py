"""The ssh keys a VM's seed authorizes and the one ``egpu ssh`` logs in with.

Every ``~/.ssh/*.pub`` is authorized; ``egpu ssh`` passes the first of ``id_ed25519``,
``id_ecdsa``, ``id_rsa`` (then any other) whose private key sits beside its ``.pub``. Without
one, egpu generates an ed25519 key once per user in its data directory (Lima does the same).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from egpu.errors import UsageError, VMError
from egpu.images.seed import MAX_PUBLIC_KEY_CHARS, MAX_PUBLIC_KEYS, check_public_keys
from egpu.paths import dirs
from egpu.process import run_tool

PREFERRED_KEYS = ("id_ed25519", "id_ecdsa", "id_rsa")
PUBLIC_SUFFIX = ".pub"
GENERATED_KEY = "id_ed25519"
GENERATED_COMMENT = "egpu"
KEYGEN_TIMEOUT_S = 30
PRIVATE_MODE = 0o600
DIR_MODE = 0o700
LOCK_FILE = ".keygen.lock"


@dataclass(frozen=True)
class LoginKeys:
    """The public keys a seed authorizes and the private key ``egpu ssh`` passes (``-i``)."""

    private: Path
    public_keys: tuple[str, ...]


def user_ssh_dir() -> Path:
    return Path.home() / ".ssh"


def read_public_key(path: Path) -> str | None:
    """The key line of one ``.pub`` file, or None when it is not one (bounded read)."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_PUBLIC_KEY_CHARS + 1)
    except OSError:
        return None
    try:
        line = data.decode("ascii").strip()
    except UnicodeDecodeError:
        return None
    try:
        check_public_keys([line])
    except UsageError:
        return None
    return line


def _public_files(ssh_dir: Path) -> list[Path]:
    """``*.pub`` files of ``ssh_dir``: the preferred ones first, then the rest by name."""
    try:
        found = sorted(p for p in ssh_dir.glob(f"*{PUBLIC_SUFFIX}") if p.is_file())
    except OSError:
        return []
    rank = {f"{n}{PUBLIC_SUFFIX}": i for i, n in enumerate(PREFERRED_KEYS)}
    return sorted(found, key=lambda p: (rank.get(p.name, len(rank)), p.name))[:MAX_PUBLIC_KEYS]


def login_keys(ssh_dir: Path | None = None, key_dir: Path | None = None) -> LoginKeys:
    """The keys for a new seed: the user's own when one has its private half, else egpu's."""
    user_dir = ssh_dir or user_ssh_dir()
    keys: list[str] = []
    private: Path | None = None
    for pub in _public_files(user_dir):
        line = read_public_key(pub)
        if line is None or line in keys:
            continue
        keys.append(line)
        candidate = pub.with_suffix("")
        if private is None and candidate.is_file():
            private = candidate
    if private is None:
        private = ensure_generated_key(key_dir or dirs().ssh)
        line = read_public_key(private.with_name(private.name + PUBLIC_SUFFIX))
        if line is None:
            raise VMError(f"egpu's ssh key {private}{PUBLIC_SUFFIX} is unreadable",
                          hint=f"delete {private} and its .pub; egpu makes a new pair")
        if line not in keys:
            keys.append(line)
    return LoginKeys(private=private, public_keys=check_public_keys(keys[:MAX_PUBLIC_KEYS]))


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def ensure_generated_key(key_dir: Path) -> Path:
    """egpu's own ed25519 key in ``key_dir``, generated the first time (once, under a lock).

    The pair is made in a private temp directory and renamed in, public half first: a private
    key at the final path always has its ``.pub`` beside it.
    """
    private = key_dir / GENERATED_KEY
    public = key_dir / (GENERATED_KEY + PUBLIC_SUFFIX)
    if private.is_file() and public.is_file():
        return private
    key_dir.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    os.chmod(key_dir, DIR_MODE)
    with _locked(key_dir / LOCK_FILE):
        if private.is_file() and public.is_file():
            return private  # another egpu made it while this one waited
        work = Path(tempfile.mkdtemp(prefix=".keygen.", dir=key_dir))
        try:
            made = work / GENERATED_KEY
            run_tool(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", GENERATED_COMMENT,
                      "-f", str(made)],
                     lambda why: VMError(f"cannot generate egpu's ssh key: {why}",
                                         hint="apt-get install openssh-client"),
                     timeout=KEYGEN_TIMEOUT_S)
            os.chmod(made, PRIVATE_MODE)
            os.replace(work / (GENERATED_KEY + PUBLIC_SUFFIX), public)
            os.replace(made, private)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return private
