"""Bearer-token auth (anonymous and with the user's auth file), transient-error retries and the
plain-HTTP rule, through a token-gated front on the real loopback registry."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from egpu.errors import ImageError
from egpu.images.pull import pull
from egpu.images.qcow2 import HEADER, QCOW2_MAGIC
from egpu.images.reference import OciReference
from egpu.images.registry import RegistryClient
from registry_server import (
    GATE_SERVICE,
    Registry,
    TokenGate,
    egpu,
    home,
    push_plain_image,
    registry,
)

__all__ = ["home", "registry"]  # fixtures, imported so pytest sees them

# A qcow2 header (version 3, no backing file) is all a plain artifact is checked for.
DISK = HEADER.pack(QCOW2_MAGIC, 3, 0, 0, 16, 1 << 20) + bytes(range(256)) * 64


@pytest.fixture
def gate(registry: Registry) -> Iterator[TokenGate]:
    g = TokenGate(registry.host)
    yield g
    g.close()


@pytest.fixture
def private_gate(registry: Registry) -> Iterator[TokenGate]:
    g = TokenGate(registry.host, user="alice", password="s3cret:x")
    yield g
    g.close()


def test_anonymous_bearer_token(home: Path, registry: Registry, gate: TokenGate) -> None:
    push_plain_image(registry.host, "egpu/anon", "v1", DISK)
    result = pull(f"{gate.host}/egpu/anon:v1")
    assert result.path.read_bytes() == DISK
    assert gate.unauthorized == 1  # challenged once, then the token served every request
    assert gate.token_requests == [{"scope": "repository:egpu/anon:pull", "service": GATE_SERVICE}]


def write_auth_file(path: Path, registry_host: str, user: str, password: str) -> None:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {registry_host: {"auth": token}}}))


def test_credentials_from_auth_file(
    home: Path, registry: Registry, private_gate: TokenGate, monkeypatch: pytest.MonkeyPatch
) -> None:
    push_plain_image(registry.host, "egpu/private", "v1", DISK)
    ref = f"{private_gate.host}/egpu/private:v1"
    monkeypatch.setenv("HOME", str(home))  # no auth file of the machine's user
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)
    denied = egpu("pull", ref)
    assert denied.returncode == 1
    assert denied.stderr.startswith(f"error: access to {private_gate.host}/egpu/private denied")
    assert "podman login" in denied.stderr

    auth = home / "auth.json"
    write_auth_file(auth, private_gate.host, "alice", "wrong")
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth))
    assert egpu("pull", ref).returncode == 1

    write_auth_file(auth, private_gate.host, "alice", "s3cret:x")
    done = egpu("pull", "--json", ref)
    assert done.returncode == 0, done.stderr
    assert Path(json.loads(done.stdout)["path"]).read_bytes() == DISK


def test_docker_config_credentials(
    home: Path, registry: Registry, private_gate: TokenGate, monkeypatch: pytest.MonkeyPatch
) -> None:
    push_plain_image(registry.host, "egpu/private2", "v1", DISK)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)
    (home / ".docker").mkdir()
    write_auth_file(home / ".docker/config.json", private_gate.host, "alice", "s3cret:x")
    assert pull(f"{private_gate.host}/egpu/private2:v1").path.read_bytes() == DISK


def test_transient_errors_are_retried(home: Path, registry: Registry, gate: TokenGate) -> None:
    push_plain_image(registry.host, "egpu/flaky", "v1", DISK)
    sleeps: list[float] = []

    def client(ref: OciReference) -> RegistryClient:
        return RegistryClient(ref, retry_delays=(0.01, 0.02, 0.04), sleep=sleeps.append)

    gate.fail_next = 2
    assert pull(f"{gate.host}/egpu/flaky:v1", client_factory=client).path.read_bytes() == DISK
    assert sleeps == [0.01, 0.02]  # two 503s, backing off, then success

    gate.fail_next = 10
    with pytest.raises(ImageError, match="answered HTTP 503"):
        pull(f"{gate.host}/egpu/flaky:v1", client_factory=client)


def test_redirect_to_plain_http_remote_is_refused(
    home: Path, registry: Registry, gate: TokenGate
) -> None:
    push_plain_image(registry.host, "egpu/redirect", "v1", DISK)
    gate.redirect_blobs = "http://blobs.example.invalid/data"
    with pytest.raises(ImageError, match=r"refusing plain-HTTP request to blobs\.example\.invalid"):
        pull(f"{gate.host}/egpu/redirect:v1")
