"""Manifest/index parsing, layout selection, image metadata, auth challenges and files, qcow2
header fields: the pure cores, with hostile inputs."""

from __future__ import annotations

import base64
import contextlib
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from egpu.errors import ImageError
from egpu.images import manifest as m
from egpu.images.auth import (
    Credentials,
    auth_file_candidates,
    bearer_challenge,
    credentials_from_auth_doc,
    load_credentials,
    parse_challenges,
)
from egpu.images.qcow2 import HEADER, QCOW2_MAGIC, Qcow2Header, backing_name

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
D3 = "sha256:" + "3" * 64


def desc(media_type: str, digest: str = D1, size: int = 10, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": digest, "size": size, **extra}


def manifest(layers: list[dict[str, Any]], **extra: Any) -> bytes:
    doc = {
        "schemaVersion": 2,
        "mediaType": m.MEDIA_OCI_MANIFEST,
        "config": desc(m.MEDIA_OCI_EMPTY, D3, 2),
        "layers": layers,
        **extra,
    }
    return json.dumps(doc).encode()


def test_reference_layout() -> None:
    body = manifest(
        [
            desc(m.MEDIA_QCOW2, D1, 100, annotations={m.ANNOTATION_TITLE: "u.qcow2"}),
            desc(m.MEDIA_IMAGE_JSON, D2, 50),
        ],
        artifactType=m.ARTIFACT_TYPE_IMAGE,
    )
    parsed = m.parse_manifest(body)
    assert isinstance(parsed, m.ImageManifest)
    assert parsed.artifact_type == m.ARTIFACT_TYPE_IMAGE
    layout = m.select_layout(parsed)
    assert layout.kind == "reference"
    assert str(layout.disk.digest) == D1 and layout.disk.size == 100
    assert layout.metadata is not None and str(layout.metadata.digest) == D2
    assert layout.file_name == "u.qcow2"


def test_layer_order_does_not_matter() -> None:
    body = manifest([desc(m.MEDIA_IMAGE_JSON, D2), desc(m.MEDIA_QCOW2, D1)])
    layout = m.select_layout(m.parse_manifest(body))  # type: ignore[arg-type]
    assert str(layout.disk.digest) == D1


@pytest.mark.parametrize(
    "layer",
    [
        desc("application/vnd.oci.image.layer.v1.tar", annotations={m.ANNOTATION_TITLE: "a.qcow2"}),
        desc("application/octet-stream", annotations={m.ANNOTATION_TITLE: "x.qcow2"}),
        desc("application/x-qcow2"),
        desc(m.MEDIA_QCOW2),
    ],
)
def test_plain_single_qcow2(layer: dict[str, Any]) -> None:
    layout = m.select_layout(m.parse_manifest(manifest([layer])))  # type: ignore[arg-type]
    assert layout.kind == "plain" and layout.metadata is None


@pytest.mark.parametrize(
    "layers",
    [
        [],
        [desc("application/vnd.oci.image.layer.v1.tar+gzip")],  # a container image
        [desc(m.MEDIA_QCOW2, D1), desc(m.MEDIA_QCOW2, D2)],
        [desc(m.MEDIA_IMAGE_JSON, D2)],
        [desc(m.MEDIA_QCOW2, D1), desc(m.MEDIA_IMAGE_JSON, D2), desc("text/plain", D3)],
        [desc("application/octet-stream", annotations={m.ANNOTATION_TITLE: "a.iso"})],
    ],
)
def test_unknown_layouts(layers: list[dict[str, Any]]) -> None:
    with pytest.raises(ImageError, match="unknown layout"):
        m.select_layout(m.parse_manifest(manifest(layers)))  # type: ignore[arg-type]


def test_metadata_layer_size_capped() -> None:
    body = manifest(
        [desc(m.MEDIA_QCOW2, D1), desc(m.MEDIA_IMAGE_JSON, D2, m.MAX_METADATA_BYTES + 1)]
    )
    with pytest.raises(ImageError, match="too large"):
        m.select_layout(m.parse_manifest(body))  # type: ignore[arg-type]


def test_docker_schema2_and_content_type() -> None:
    doc = {
        "schemaVersion": 2,
        "config": desc("application/vnd.docker.container.image.v1+json"),
        "layers": [desc(m.MEDIA_QCOW2)],
    }
    parsed = m.parse_manifest(json.dumps(doc).encode(), m.MEDIA_DOCKER_MANIFEST + "; charset=x")
    assert isinstance(parsed, m.ImageManifest) and parsed.media_type == m.MEDIA_DOCKER_MANIFEST


def test_index_selection() -> None:
    entries = [
        desc(m.MEDIA_OCI_MANIFEST, D1, platform={"os": "linux", "architecture": "amd64"}),
        desc(m.MEDIA_OCI_MANIFEST, D2, platform={"os": "linux", "architecture": "arm64"}),
    ]
    index = m.parse_manifest(json.dumps({"schemaVersion": 2, "manifests": entries}).encode())
    assert isinstance(index, m.ImageIndex)
    assert str(m.select_from_index(index, "arm64").digest) == D2
    assert str(m.select_from_index(index, "amd64").digest) == D1
    with pytest.raises(ImageError, match="unknown layout"):
        m.select_from_index(index, "riscv64")
    typed = [*entries, desc(m.MEDIA_OCI_MANIFEST, D3, artifactType=m.ARTIFACT_TYPE_IMAGE)]
    index = m.parse_manifest(
        json.dumps(
            {"schemaVersion": 2, "mediaType": m.MEDIA_OCI_INDEX, "manifests": typed}
        ).encode()
    )
    assert str(m.select_from_index(index, "amd64").digest) == D3  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"[]",
        b'{"schemaVersion": 1, "layers": []}',
        json.dumps(
            {"schemaVersion": 2, "mediaType": m.MEDIA_DOCKER_MANIFEST[:-12] + "v1+json"}
        ).encode(),
        b'{"schemaVersion": 2, "layers": {}}',
        b'{"schemaVersion": 2, "layers": [5]}',
        manifest([desc(m.MEDIA_QCOW2, "sha256:short")]),
        manifest([desc(m.MEDIA_QCOW2, "sha256:../../../../etc/passwd" + "a" * 40)]),
        manifest([desc(m.MEDIA_QCOW2, "sha256:" + "a" * 64 + "\n")]),
        manifest([desc(m.MEDIA_QCOW2, "sha256:" + "z" * 64)]),
        manifest([desc(m.MEDIA_QCOW2 + "\n")]),
        manifest([desc(m.MEDIA_QCOW2, size=-1)]),
        manifest([desc(m.MEDIA_QCOW2, size=True)]),
        manifest([desc(m.MEDIA_QCOW2, size="10")]),
        manifest([desc(m.MEDIA_QCOW2, size=m.MAX_BLOB_BYTES + 1)]),
        manifest([desc("not a media type")]),
        manifest([desc(m.MEDIA_QCOW2, annotations={"k": 5})]),
        manifest([desc(m.MEDIA_QCOW2)] * (m.MAX_LAYERS + 1)),
        b"[" * 100000 + b"]" * 100000,
        b" " * (m.MAX_MANIFEST_BYTES + 1),
    ],
)
def test_malformed_manifests(body: bytes) -> None:
    with pytest.raises(ImageError):
        m.parse_manifest(body)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=20),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=10), children, max_size=4)
        ),
        max_leaves=30,
    )
)
def test_arbitrary_json_only_raises_image_error(doc: Any) -> None:
    for wrapped in (
        doc,
        {"schemaVersion": 2, "layers": doc},
        {"schemaVersion": 2, "manifests": doc},
    ):
        try:
            parsed = m.parse_manifest(json.dumps(wrapped).encode())
            if isinstance(parsed, m.ImageManifest):
                m.select_layout(parsed)
        except ImageError:
            pass


def test_metadata_parsing() -> None:
    sha = "ab" * 32
    meta = m.parse_metadata(
        json.dumps(
            {"name": "ubuntu", "artifact": "u.qcow2", "sha256": sha.upper(), "features": ["docker"]}
        ).encode()
    )
    assert meta == m.ImageMetadata("ubuntu", "u.qcow2", sha, ("docker",))
    meta = m.parse_metadata(
        json.dumps(
            {"sha256": f"sha256:{sha}", "features": {"desktop": True, "docker": False}}
        ).encode()
    )
    assert meta.sha256 == sha and meta.features == ("desktop",)
    for bad in (
        b"[]",
        b"{",
        json.dumps({"sha256": "xyz"}).encode(),
        json.dumps({"sha256": 5}).encode(),
        json.dumps({"sha256": "ab" * 32 + "\n"}).encode(),
        json.dumps({"features": [1]}).encode(),
        json.dumps({"name": ["x"]}).encode(),
        b" " * (m.MAX_METADATA_BYTES + 1),
    ):
        with pytest.raises(ImageError):
            m.parse_metadata(bad)


@pytest.mark.parametrize(
    ("name", "safe"),
    [
        ("u.qcow2", True),
        ("../etc/passwd", False),
        ("a/b.qcow2", False),
        (".hidden", False),
        ("x..qcow2", False),
        ("", False),
        (None, False),
        ("a" * 200, False),
        ("u.qcow2\n", False),
    ],
)
def test_safe_file_name(name: str | None, safe: bool) -> None:
    assert (m.safe_file_name(name) is not None) == safe


# -- WWW-Authenticate -------------------------------------------------------------------------


def test_ghcr_challenge() -> None:
    header = 'Bearer realm="https://ghcr.io/token",service="ghcr.io",scope="repository:o/r:pull"'
    c = bearer_challenge(header)
    assert c is not None and c.realm == "https://ghcr.io/token"
    assert c.params == {
        "realm": "https://ghcr.io/token",
        "service": "ghcr.io",
        "scope": "repository:o/r:pull",
    }


def test_multiple_challenges_and_escapes() -> None:
    cs = parse_challenges('Basic realm="a \\"q\\"", Bearer realm="https://t/x",service=svc')
    assert [c.scheme for c in cs] == ["basic", "bearer"]
    assert cs[0].realm == 'a "q"' and cs[1].params["service"] == "svc"
    assert bearer_challenge('Basic realm="x"') is None


@pytest.mark.parametrize("header", ['realm="x"', '"Bearer"', 'Bearer realm="x" junk=', "x" * 9000])
def test_bad_challenges(header: str) -> None:
    with pytest.raises(ImageError):
        parse_challenges(header)


@given(st.text(max_size=200))
def test_challenge_parser_total(header: str) -> None:
    with contextlib.suppress(ImageError):
        parse_challenges(header)


# -- auth files -------------------------------------------------------------------------------


def _auth(user: str, secret: str) -> dict[str, str]:
    return {"auth": base64.b64encode(f"{user}:{secret}".encode()).decode()}


def test_credentials_lookup() -> None:
    doc = {
        "auths": {
            "ghcr.io": _auth("u", "p:w"),
            "quay.io/org": _auth("o", "1"),
            "https://index.docker.io/v1/": _auth("hub", "2"),
        }
    }
    assert credentials_from_auth_doc(doc, "ghcr.io", "a/b") == Credentials("u", "p:w")
    assert credentials_from_auth_doc(doc, "quay.io", "org/x") == Credentials("o", "1")
    assert credentials_from_auth_doc(doc, "quay.io", "other/x") is None
    assert credentials_from_auth_doc(doc, "docker.io", "library/x") == Credentials("hub", "2")
    assert credentials_from_auth_doc({}, "ghcr.io", "a") is None
    with pytest.raises(ImageError):
        credentials_from_auth_doc({"auths": {"ghcr.io": {"auth": "!!!"}}}, "ghcr.io", "a")


def test_auth_file_order_and_loading(tmp_path: Path) -> None:
    env = {"REGISTRY_AUTH_FILE": str(tmp_path / "a.json"), "XDG_RUNTIME_DIR": str(tmp_path / "run")}
    paths = auth_file_candidates(env, tmp_path / "home")
    assert paths[0] == tmp_path / "a.json"
    assert paths[1] == tmp_path / "run/containers/auth.json"
    assert paths[-1] == tmp_path / "home/.docker/config.json"
    (tmp_path / "run/containers").mkdir(parents=True)
    (tmp_path / "run/containers/auth.json").write_text(
        json.dumps({"auths": {"r.io": _auth("x", "y")}})
    )
    assert load_credentials("r.io", "a", env) == Credentials("x", "y")
    assert load_credentials("other.io", "a", env) is None
    (tmp_path / "a.json").write_text("{broken")
    with pytest.raises(ImageError, match="auth file"):
        load_credentials("r.io", "a", env)


def test_credentials_repr_hides_secret() -> None:
    assert "hunter2" not in repr(Credentials("u", "hunter2"))


# -- qcow2 header -----------------------------------------------------------------------------


def qcow2_header(
    backing: bytes | None, version: int = 3, offset: int | None = None, size: int | None = None
) -> bytes:
    off = offset if offset is not None else (HEADER.size + 8 if backing else 0)
    n = size if size is not None else (len(backing) if backing else 0)
    head = HEADER.pack(QCOW2_MAGIC, version, off, n, 16, 1 << 30)
    if off > 1 << 20:  # a hostile offset: the header alone
        return head
    data = bytearray(head + bytes(max(0, off - len(head))))
    if backing:
        data[off : off + len(backing)] = backing
    return bytes(data)


def test_backing_name() -> None:
    assert backing_name(qcow2_header(b"/cache/base")) == "/cache/base"
    assert backing_name(qcow2_header(None)) is None
    assert Qcow2Header.unpack(qcow2_header(None, version=2)).version == 2


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"QFI",
        b"XXXX" + qcow2_header(None)[4:],
        qcow2_header(None, version=4),
        qcow2_header(b"x", offset=8),  # inside the header
        qcow2_header(b"x", size=5000),  # over QEMU's limit
        qcow2_header(b"x", offset=1 << 40),
        qcow2_header(b"abc")[:-1],  # truncated name
        qcow2_header(b"\xff\xfe"),
        qcow2_header(b"a\0b"),
    ],
)
def test_bad_qcow2_headers(data: bytes) -> None:
    with pytest.raises(ImageError):
        backing_name(data)


@given(st.binary(max_size=200))
def test_qcow2_header_total(data: bytes) -> None:
    for d in (data, QCOW2_MAGIC + struct.pack(">I", 3) + data):
        with contextlib.suppress(ImageError):
            backing_name(d)
