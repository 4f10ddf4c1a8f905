"""``egpu image push`` against a real registry (Debian's docker-registry) on loopback: a pull of
what was pushed yields the same bytes, auth, chunked uploads, reuse of blobs, refusals that send
nothing, and a registry answering uploads with garbage or endless bodies."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from egpu.errors import UsageError
from egpu.images.auth import REGISTRY_AUTH_FILE_ENV
from egpu.images.manifest import parse_metadata, select_layout
from egpu.images.pull import pull
from egpu.images.push import (
    default_push_client,
    image_manifest,
    load_local_image,
    make_metadata,
    push,
    push_target,
)
from egpu.images.reference import Digest
from egpu.images.store import ImageStore
from registry_server import (
    ARTIFACT_TYPE,
    DISK,
    HOSTILE_UPLOADS,
    HUGE_BODY_BYTES,
    IMAGE_JSON,
    OCI_EMPTY,
    OCI_MANIFEST,
    CountingProxy,
    Registry,
    TokenGate,
    egpu,
    egpu_measured,
    engine_tool,
    home,
    make_qcow2,
    one_error_line,
    registry,
)

__all__ = ["home", "registry"]  # fixtures, imported so pytest sees them

DISK_MIB = 3
CHUNK = 1024 * 1024  # small chunks, so the 3 MiB disk goes up in several PATCH requests
RSS_BOUND = 200 * 1024 * 1024  # as in test_images_bounded.py: far under HUGE_BODY_BYTES
USER, PASSWORD = "pusher", "s3cret"


@pytest.fixture(scope="module")
def qemu_img() -> tuple[list[str], dict[str, str]]:
    """The engine's qemu-img, found before ``home`` points the cache elsewhere."""
    return engine_tool("qemu-img")


@pytest.fixture(scope="module")
def disk_bytes(
    tmp_path_factory: pytest.TempPathFactory, qemu_img: tuple[list[str], dict[str, str]]
) -> bytes:
    """A real qcow2 of a few MiB (from qemu-img)."""
    argv, env = qemu_img
    return make_qcow2(argv, env, tmp_path_factory.mktemp("push-disk"), DISK_MIB, 7)


@pytest.fixture
def gate(registry: Registry) -> Iterator[TokenGate]:
    g = TokenGate(registry.host)
    yield g
    g.close()


def write_image(workdir: Path, disk: bytes, *, sha256: str | None = None) -> tuple[Path, bytes]:
    """FILE.qcow2 and its sidecar FILE.json (as ``image build`` leaves them)."""
    path = workdir / "ubuntu-docker.qcow2"
    path.write_bytes(disk)
    meta = {
        "name": "ubuntu-docker",
        "artifact": path.name,
        "sha256": sha256 or hashlib.sha256(disk).hexdigest(),
        "features": {"docker": True, "desktop": False},
        "packages": {"docker.io": "26.1.5+dfsg1-9"},  # a field today's reader ignores
    }
    body = json.dumps(meta, indent=1).encode()
    path.with_suffix(".json").write_bytes(body)
    return path, body


def manifest_status(host: str, repo: str, tag: str) -> int:
    """What the registry itself answers for a tag (straight to it, not through a gate)."""
    r = httpx.get(
        f"http://{host}/v2/{repo}/manifests/{tag}", headers={"Accept": OCI_MANIFEST}, timeout=30
    )
    return r.status_code


def methods(gate: TokenGate) -> list[str]:
    return [m for m, path in gate.requests if path != "/token"]


# -- pure pieces ---------------------------------------------------------------------------------


def test_pushed_manifest_is_the_layout_pull_reads(tmp_path: Path) -> None:
    disk = tmp_path / "d.qcow2"
    disk.write_bytes(DISK)
    meta = make_metadata("d", disk.name, hashlib.sha256(DISK).hexdigest(), ["docker"])
    disk.with_suffix(".json").write_bytes(meta)
    image = load_local_image(disk)
    body, parsed = image_manifest(image)
    assert image_manifest(load_local_image(disk))[0] == body  # no timestamp: same bytes again
    doc = json.loads(body)
    assert doc["artifactType"] == ARTIFACT_TYPE and doc["config"]["mediaType"] == OCI_EMPTY
    layout = select_layout(parsed)
    assert layout.kind == "reference" and layout.disk.digest == image.digest
    assert layout.disk.title == "d.qcow2" and layout.file_name == "d.qcow2"
    assert layout.metadata is not None and layout.metadata.media_type == IMAGE_JSON
    assert parse_metadata(meta).features == ("docker",)


@pytest.mark.parametrize(
    ("name", "features"),
    [("", []), ("x" * 129, []), ("bad\nname", []), ("ok", ["a,b"]), ("ok", [""]), ("ok", ["é"])],
)
def test_made_json_refuses_bad_names_and_features(name: str, features: list[str]) -> None:
    with pytest.raises(UsageError):
        make_metadata(name, "d.qcow2", "a" * 64, features)


def test_push_target_keeps_tags_once_and_refuses_digests() -> None:
    ref, tags = push_target("127.0.0.1:5000/egpu/x:v1", ["docker-latest", "v1", "docker-latest"])
    assert (str(ref), tags) == ("127.0.0.1:5000/egpu/x:v1", ("v1", "docker-latest"))
    with pytest.raises(UsageError, match="not a digest"):
        push_target(f"127.0.0.1:5000/egpu/x@sha256:{'a' * 64}")
    with pytest.raises(UsageError, match="bad tag"):
        push_target("127.0.0.1:5000/egpu/x:v1", ["-dash"])


# -- round trip ---------------------------------------------------------------------------------


def test_push_then_pull_yields_the_same_bytes(
    home: Path, registry: Registry, disk_bytes: bytes
) -> None:
    path, meta = write_image(home, disk_bytes)
    ref = f"{registry.host}/egpu/pushed:ubuntu-docker"
    proc = egpu("image", "push", str(path), ref, "--tag", "docker-latest", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["tags"] == ["ubuntu-docker", "docker-latest"]
    assert result["disk_digest"] == "sha256:" + hashlib.sha256(disk_bytes).hexdigest()
    assert result["size"] == len(disk_bytes)
    assert sorted(result["uploaded"]) == sorted(["the empty config", "manifest.json", path.name])

    pulled = json.loads(egpu("pull", ref, "--json").stdout)
    assert pulled["digest"] == result["digest"]
    assert pulled["file_name"] == path.name
    assert Path(pulled["path"]).read_bytes() == disk_bytes
    # the extra tag names the very same manifest
    assert pull(f"{registry.host}/egpu/pushed:docker-latest").manifest_digest == Digest.parse(
        result["digest"]
    )
    # the JSON manifest was published verbatim, and reads back as the same metadata
    store = ImageStore()
    record = store.get_ref(ref)
    assert record is not None and record.metadata_digest is not None
    assert store.blob_path(Digest.parse(record.metadata_digest)).read_bytes() == meta
    assert pull(ref).metadata == parse_metadata(meta)


def test_push_makes_the_json_from_name_and_features(
    home: Path, registry: Registry, disk_bytes: bytes
) -> None:
    path = home / "made.qcow2"
    path.write_bytes(disk_bytes)
    ref = f"{registry.host}/egpu/made:v1"
    proc = egpu("image", "push", str(path), ref, "--name", "made", "--features", "docker,cuda")
    assert proc.returncode == 0, proc.stderr
    assert "digest sha256:" in proc.stdout
    result = pull(ref)
    assert result.path.read_bytes() == disk_bytes
    assert result.metadata is not None
    assert (result.metadata.name, result.metadata.artifact) == ("made", "made.qcow2")
    assert result.metadata.features == ("docker", "cuda")
    assert result.metadata.sha256 == hashlib.sha256(disk_bytes).hexdigest()


# -- auth, chunks, reuse --------------------------------------------------------------------------


def test_chunked_push_with_credentials_through_a_token_gate(
    home: Path, registry: Registry, disk_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = TokenGate(registry.host, user=USER, password=PASSWORD)
    try:
        auth = home / "auth.json"
        entry = {"username": USER, "password": PASSWORD}
        auth.write_text(json.dumps({"auths": {gate.host: entry}}))
        monkeypatch.setenv(REGISTRY_AUTH_FILE_ENV, str(auth))
        path, _ = write_image(home, disk_bytes)
        image = load_local_image(path)
        result = push(image, f"{gate.host}/egpu/gated:v1", client_factory=default_push_client,
                      chunk_bytes=CHUNK)
        assert "repository:egpu/gated:pull,push" in gate.token_scopes
        assert methods(gate).count("PATCH") == math.ceil(len(disk_bytes) / CHUNK)
        assert methods(gate)[-1] == "PUT"  # the tag is set last
        assert pull(f"{gate.host}/egpu/gated:v1").path.read_bytes() == disk_bytes
        assert str(result.digest) == str(pull(f"{gate.host}/egpu/gated:v1").manifest_digest)
    finally:
        gate.close()


def test_push_without_credentials_is_denied_and_tags_nothing(
    home: Path, registry: Registry, disk_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = TokenGate(registry.host, user=USER, password=PASSWORD)
    try:
        monkeypatch.setenv(REGISTRY_AUTH_FILE_ENV, str(home / "no-auth.json"))
        monkeypatch.setenv("HOME", str(home))  # no docker or podman config of the user's
        monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
        monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
        monkeypatch.delenv("DOCKER_CONFIG", raising=False)
        path, _ = write_image(home, disk_bytes)
        line = one_error_line(egpu("image", "push", str(path), f"{gate.host}/egpu/denied:v1"))
        assert "access to" in line and "denied" in line and "login" in line, line
        assert "PUT" not in methods(gate)
    finally:
        gate.close()
    assert manifest_status(registry.host, "egpu/denied", "v1") == 404


def test_second_push_sends_no_blob(
    home: Path, registry: Registry, gate: TokenGate, disk_bytes: bytes
) -> None:
    path, _ = write_image(home, disk_bytes)
    ref = f"{gate.host}/egpu/again:v1"
    first = push(load_local_image(path), ref, chunk_bytes=CHUNK)
    assert "POST" in methods(gate) and "PATCH" in methods(gate)
    gate.requests.clear()
    second = push(load_local_image(path), ref, tags=["docker-latest"], chunk_bytes=CHUNK)
    assert second.digest == first.digest
    assert second.uploaded == () and len(second.reused) == 3
    # blob checks (the first one twice: answered 401, then with the token), then one manifest
    # PUT per tag: no upload started at all
    assert methods(gate) == ["HEAD"] * 4 + ["PUT", "PUT"]
    assert gate.unauthorized == 2  # one per push
    assert pull(f"{gate.host}/egpu/again:docker-latest").path.read_bytes() == disk_bytes


def test_upload_at_another_origin_gets_no_authorization(
    home: Path, registry: Registry, gate: TokenGate, disk_bytes: bytes
) -> None:
    proxy = CountingProxy(registry.host)  # the other origin: the registry itself, ungated
    try:
        gate.upload_origin = proxy.host
        path, _ = write_image(home, disk_bytes)
        push(load_local_image(path), f"{gate.host}/egpu/elsewhere:v1", chunk_bytes=CHUNK)
        sent = b"".join(proxy.requests).decode("latin-1")
        assert "PATCH /v2/egpu/elsewhere/blobs/uploads/" in sent  # the upload went there
        assert "\r\nauthorization:" not in sent.lower()  # and the token did not
        assert "PUT" in methods(gate)  # the manifest went to the registry itself, with it
    finally:
        proxy.close()
    assert pull(f"{registry.host}/egpu/elsewhere:v1").path.read_bytes() == disk_bytes


# -- refusals: one line, non-zero, nothing sent -------------------------------------------------


@pytest.mark.parametrize(
    ("case", "expected", "exit_code"),
    [
        ("sha256-mismatch", "error: sha256 mismatch: ", 1),
        ("not-qcow2", "not a qcow2 image: bad magic", 1),
        ("missing", "error: no such file ", 1),
        ("no-json", "error: no JSON manifest next to ", 2),
        ("json-and-name", "already has its JSON manifest", 2),
        ("overlay", "is an overlay (it has a backing file)", 1),
        ("digest-ref", "error: push to a tag, not a digest", 2),
        ("bad-tag", "error: bad tag ", 2),
        ("bad-json", "image metadata layer is not JSON", 1),
    ],
)
def test_refused_push_sends_nothing(
    home: Path,
    registry: Registry,
    gate: TokenGate,
    disk_bytes: bytes,
    qemu_img: tuple[list[str], dict[str, str]],
    case: str,
    expected: str,
    exit_code: int,
) -> None:
    path, _ = write_image(home, disk_bytes)
    ref = f"{gate.host}/egpu/refused:v1"
    extra: list[str] = []
    if case == "sha256-mismatch":
        write_image(home, disk_bytes, sha256="0" * 64)
    elif case == "not-qcow2":
        path.write_bytes(b"this is not a disk image\n" * 100)
    elif case == "missing":
        path.unlink()
    elif case == "no-json":
        path.with_suffix(".json").unlink()
    elif case == "json-and-name":
        extra = ["--name", "other"]
    elif case == "overlay":
        argv, env = qemu_img
        base = home / "base.qcow2"
        shutil.move(path, base)
        subprocess.run(
            [*argv, "create", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(path)],
            check=True, capture_output=True, env={**os.environ, **env},
        )
        meta = {"name": "o", "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        path.with_suffix(".json").write_text(json.dumps(meta))
    elif case == "digest-ref":
        ref = f"{gate.host}/egpu/refused@sha256:{'a' * 64}"
    elif case == "bad-tag":
        extra = ["--tag", "no/slashes"]
    elif case == "bad-json":
        path.with_suffix(".json").write_text("{not json")
    line = one_error_line(egpu("image", "push", str(path), ref, *extra), exit_code)
    assert expected in line, line
    assert gate.requests == []  # nothing reached the registry
    assert manifest_status(registry.host, "egpu/refused", "v1") == 404


# -- a hostile registry --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", HOSTILE_UPLOADS)
def test_hostile_upload_answers_cost_bounded_memory(
    home: Path, registry: Registry, gate: TokenGate, disk_bytes: bytes, mode: str
) -> None:
    path, _ = write_image(home, disk_bytes)
    repo = f"egpu/hostile-{mode}"
    gate.hostile_upload = mode
    proc, rss = egpu_measured("image", "push", "-q", str(path), f"{gate.host}/{repo}:v1",
                              workdir=home)
    assert rss < RSS_BOUND < HUGE_BODY_BYTES, f"peak RSS {rss >> 20} MiB"
    if mode == "huge-accept":
        # an accepted upload's body is never read: the push goes on and succeeds
        assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr
        assert manifest_status(registry.host, repo, "v1") == 200
        return
    line = one_error_line(proc)
    expected = {
        "huge-error": "refused the upload of the empty config (HTTP 400)",
        "bad-location": "gave a bad upload location 'http://[::1'",
        "remote-location": "refusing plain-HTTP request to example.com",
        "huge-manifest-error": "refused the manifest for tag 'v1' (HTTP 400)",
        "wrong-range": "reports another range than the 0-",
        "wrong-digest": "stored the empty config as 'sha256:0000",
    }[mode]
    assert expected in line, line
    assert manifest_status(registry.host, repo, "v1") == 404
