"""OCI reference and digest parsing: examples and hypothesis properties (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from egpu.errors import ImageError, UsageError
from egpu.images.reference import (
    DEFAULT_REGISTRY,
    Digest,
    OciReference,
    is_loopback_host,
    parse_reference,
)

HEX = "a" * 64


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest"),
    [
        (
            "ghcr.io/scottjg/qemu-vfio-apple-images:docker-latest",
            "ghcr.io",
            "scottjg/qemu-vfio-apple-images",
            "docker-latest",
            None,
        ),
        ("ghcr.io/o/r", "ghcr.io", "o/r", "latest", None),
        ("ubuntu", DEFAULT_REGISTRY, "library/ubuntu", "latest", None),
        ("me/img:1.0", DEFAULT_REGISTRY, "me/img", "1.0", None),
        ("localhost:5000/a/b/c:t", "localhost:5000", "a/b/c", "t", None),
        ("127.0.0.1:5000/x", "127.0.0.1:5000", "x", "latest", None),
        ("[::1]:5000/x:y", "[::1]:5000", "x", "y", None),
        (f"r.example/x@sha256:{HEX}", "r.example", "x", None, HEX),
        (f"r.example/x:t@sha256:{HEX}", "r.example", "x", "t", HEX),
        ("r.example/a__b/c-d/e.f:T_1", "r.example", "a__b/c-d/e.f", "T_1", None),
    ],
)
def test_parse_examples(
    text: str, registry: str, repository: str, tag: str | None, digest: str | None
) -> None:
    ref = parse_reference(text)
    assert (ref.registry, ref.repository, ref.tag) == (registry, repository, tag)
    assert (ref.digest.hex if ref.digest else None) == digest


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ghcr.io/x",
        "ghcr.io/X",  # repository components are lowercase
        "ghcr.io/x:",
        "ghcr.io/x:-bad",
        "ghcr.io/x@sha256:abc",
        f"ghcr.io/x@md5:{HEX}",
        f"ghcr.io/x@sha256:{'A' * 64}",
        "ghcr.io//x",
        "ghcr.io/x/",
        "ghcr.io/../x",
        "host:99999/x",
        "host:0/x",
        "[nothex]:5000/x",
        "-bad.io/x",
        "ghcr.io/x:" + "t" * 129,
        "r.io/" + "a" * 300,
        # A trailing newline inside a part (the whole text is stripped before that check).
        "ghcr.io/x\n:t",
        "ghcr.io\n/x",
        "http://127.0.0.1:5000/x:v1",
    ],
)
def test_parse_rejects(text: str) -> None:
    with pytest.raises(UsageError):
        parse_reference(text)


def test_docker_hub_api_host_and_loopback() -> None:
    assert parse_reference("ubuntu").api_host == "registry-1.docker.io"
    assert parse_reference("ghcr.io/x").api_host == "ghcr.io"
    assert parse_reference("localhost:5000/x").is_loopback
    assert parse_reference("127.0.0.2:80/x").is_loopback
    assert parse_reference("[::1]:5000/x").is_loopback
    assert not parse_reference("ghcr.io/x").is_loopback
    assert not parse_reference("localhost.evil.example/x").is_loopback
    assert not is_loopback_host("10.0.0.1")


def test_manifest_ref_prefers_digest() -> None:
    assert parse_reference("r.io/x:t").manifest_ref == "t"
    assert parse_reference(f"r.io/x:t@sha256:{HEX}").manifest_ref == f"sha256:{HEX}"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "sha256:",
        f"sha512:{HEX}",
        f"sha256:{HEX}0",
        f"sha256:{HEX[:-1]}g",
        f"sha256:../{HEX}",
        f" sha256:{HEX}",
        f"sha256:{HEX}\n",  # '$' would accept it, and the newline would end up in a file name
        None,
        5,
    ],
)
def test_digest_rejects(text: object) -> None:
    with pytest.raises(ImageError):
        Digest.parse(text)


def test_digest_round_trip() -> None:
    d = Digest.parse(f"sha256:{HEX}")
    assert str(d) == f"sha256:{HEX}" and d.hex == HEX
    assert Digest.of_hex(HEX.upper()) == d


# -- properties -------------------------------------------------------------------------------

component = st.from_regex(r"[a-z0-9]{1,8}(?:[._-][a-z0-9]{1,8}){0,2}", fullmatch=True)
domain = st.from_regex(r"[a-z][a-z0-9]{0,10}\.[a-z]{2,5}", fullmatch=True)
tag = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)
port = st.integers(min_value=1, max_value=65535)
hexes = st.from_regex(r"[a-f0-9]{64}", fullmatch=True)


@given(
    domain,
    st.one_of(st.none(), port),
    st.lists(component, min_size=1, max_size=4),
    st.one_of(st.none(), tag),
    st.one_of(st.none(), hexes),
)
def test_round_trip(
    host: str, p: int | None, path: list[str], t: str | None, h: str | None
) -> None:
    registry = f"{host}:{p}" if p else host
    text = f"{registry}/{'/'.join(path)}"
    if t:
        text += f":{t}"
    if h:
        text += f"@sha256:{h}"
    ref = parse_reference(text)
    assert ref.registry == registry
    assert ref.repository == "/".join(path)
    assert ref.tag == (t if t or h else "latest")
    assert ref.digest == (Digest(h) if h else None)
    # The canonical form parses back to the same value.
    assert parse_reference(str(ref)) == ref


@given(st.text(max_size=300))
def test_arbitrary_text_never_crashes(text: str) -> None:
    try:
        ref = parse_reference(text)
    except UsageError:
        return
    assert isinstance(ref, OciReference)
    # Whatever parses is safe to put in a URL path: no traversal, no whitespace, no query.
    for part in ref.repository.split("/"):
        assert part not in ("", ".", "..")
    assert not any(c in str(ref) for c in " ?#\\\n")


def test_default_image_is_the_reference_docker_profile() -> None:
    from egpu.images.pull import DEFAULT_IMAGE

    ref = parse_reference(DEFAULT_IMAGE)
    assert (ref.registry, ref.repository, ref.tag) == (
        "ghcr.io",
        "scottjg/qemu-vfio-apple-images",
        "docker-latest",
    )
    assert not ref.is_loopback  # so it is fetched over HTTPS only
