"""Pulls from a real OCI registry (Debian's docker-registry) on loopback: layouts, verification,
errors, resume after a cut connection and after a killed process, concurrent pulls, disk full."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from egpu.errors import ImageError
from egpu.images.pull import pull
from egpu.images.reference import Digest, OciReference
from egpu.images.registry import RegistryClient
from egpu.images.store import ImageStore
from egpu.paths import CACHE_ENV
from registry_server import (
    OCI_INDEX,
    QCOW2,
    CountingProxy,
    Registry,
    descriptor,
    egpu,
    egpu_popen,
    engine_tool,
    home,
    make_qcow2,
    manifest_descriptor,
    no_retry_client,
    push_blob,
    push_layers,
    push_manifest,
    push_plain_image,
    push_reference_image,
    registry,
)

__all__ = ["home", "registry"]  # fixtures, imported so pytest sees them

DISK_MIB = 3
# HTTP headers and manifests a pull fetches besides the disk blob itself: well under this.
OVERHEAD = 64 * 1024
FAST_RETRY = (0.01, 0.01, 0.01)


@pytest.fixture(scope="module")
def disks(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    """Two different real qcow2 images of a few MiB."""
    qemu_img, env = engine_tool("qemu-img")
    work = tmp_path_factory.mktemp("disks")
    return [make_qcow2(qemu_img, env, work, DISK_MIB, seed) for seed in (1, 2)]


@pytest.fixture
def proxy(registry: Registry) -> Iterator[CountingProxy]:
    p = CountingProxy(registry.host)
    yield p
    p.close()


def fast_client(ref: OciReference) -> RegistryClient:
    return RegistryClient(ref, retry_delays=FAST_RETRY)


def blob_files(store: ImageStore) -> list[Path]:
    return sorted(store.blobs_dir.glob("*")) if store.blobs_dir.exists() else []


def partial_files(store: ImageStore) -> list[Path]:
    d = store.root / "partial"
    return sorted(d.glob("*")) if d.exists() else []


# -- layouts ----------------------------------------------------------------------------------


def test_pull_reference_layout_with_cli(home: Path, registry: Registry, disks: list[bytes]) -> None:
    pushed = push_reference_image(
        registry.host, "egpu/ref", "docker-latest", disks[0], file_name="ubuntu-docker.qcow2"
    )
    proc = egpu("pull", pushed.ref, "--json")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # not a terminal: no progress bar
    result = json.loads(proc.stdout)
    assert result["digest"] == pushed.manifest_digest
    assert result["disk_digest"] == pushed.disk_digest
    assert result["file_name"] == "ubuntu-docker.qcow2"
    path = Path(result["path"])
    assert path.read_bytes() == disks[0]
    assert path.name == pushed.disk_digest.split(":")[1]  # content-addressed
    assert path.stat().st_mode & 0o222 == 0  # the base is read-only

    listed = json.loads(egpu("images", "--json").stdout)
    assert listed == [
        {
            "ref": pushed.ref,
            "digest": pushed.manifest_digest,
            "disk_digest": pushed.disk_digest,
            "path": str(path),
            "size": len(disks[0]),
            "used_by": [],
            "file_name": "ubuntu-docker.qcow2",
            "features": ["docker"],
        }
    ]
    table = egpu("images").stdout
    assert pushed.ref in table and "3.3 MiB" in table


def test_pull_plain_artifact(home: Path, registry: Registry, disks: list[bytes]) -> None:
    pushed = push_plain_image(registry.host, "egpu/plain", "v1", disks[1])
    result = pull(pushed.ref)
    assert result.path.read_bytes() == disks[1]
    assert result.metadata is None and result.file_name == "plain.qcow2"


def test_quiet_pull_prints_nothing(home: Path, registry: Registry, disks: list[bytes]) -> None:
    pushed = push_plain_image(registry.host, "egpu/quiet", "v1", disks[1])
    proc = egpu("pull", "--quiet", pushed.ref)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


def test_pull_by_digest_and_again_from_cache(
    home: Path, registry: Registry, proxy: CountingProxy, disks: list[bytes]
) -> None:
    pushed = push_reference_image(registry.host, "egpu/bydigest", "v1", disks[0])
    ref = f"{proxy.host}/egpu/bydigest@{pushed.manifest_digest}"
    first = pull(ref)
    assert first.path.read_bytes() == disks[0]
    assert proxy.served > len(disks[0])
    proxy.reset()
    again = pull(ref)
    assert again.path == first.path
    assert proxy.served < OVERHEAD  # only the manifest: the disk came from the cache


def test_unknown_layout(home: Path, registry: Registry) -> None:
    push_layers(
        registry.host,
        "egpu/container",
        "v1",
        [("application/vnd.oci.image.layer.v1.tar+gzip", b"not a disk")],
    )
    proc = egpu("pull", f"{registry.host}/egpu/container:v1")
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: unknown layout")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_single_layer_that_is_not_qcow2(home: Path, registry: Registry) -> None:
    pushed = push_plain_image(registry.host, "egpu/notqcow", "v1", b"\0" * 4096)
    with pytest.raises(ImageError, match=r"unknown layout: .* not a qcow2"):
        pull(pushed.ref)
    assert blob_files(ImageStore()) == [] and partial_files(ImageStore()) == []


# -- errors -----------------------------------------------------------------------------------


def test_missing_tag(home: Path, registry: Registry, disks: list[bytes]) -> None:
    push_plain_image(registry.host, "egpu/tags", "v1", disks[1])
    proc = egpu("pull", f"{registry.host}/egpu/tags:nope")
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: unknown tag 'nope' in {registry.host}/egpu/tags"
    # distribution answers MANIFEST_UNKNOWN for a repository it never saw, too.
    with pytest.raises(ImageError, match="unknown tag 'v1'"):
        pull(f"{registry.host}/egpu/never-pushed:v1")


def test_unknown_digest(home: Path, registry: Registry, disks: list[bytes]) -> None:
    push_plain_image(registry.host, "egpu/digests", "v1", disks[1])
    missing = "sha256:" + "0" * 64
    with pytest.raises(ImageError, match=f"no manifest {missing}"):
        pull(f"{registry.host}/egpu/digests@{missing}")


def test_wrong_digest_in_image_json(home: Path, registry: Registry, disks: list[bytes]) -> None:
    """The qcow2 matches its descriptor but not the sha256 its JSON layer claims."""
    wrong = hashlib.sha256(b"another disk").hexdigest()
    pushed = push_reference_image(
        registry.host,
        "egpu/lying",
        "v1",
        disks[0],
        metadata={"name": "x", "artifact": "x.qcow2", "sha256": wrong},
    )
    with pytest.raises(
        ImageError,
        match=f"wrong digest: .* says sha256:{wrong} but its qcow2 layer is {pushed.disk_digest}",
    ):
        pull(pushed.ref)
    store = ImageStore()
    assert not store.has_blob(Digest.parse(pushed.disk_digest))
    assert store.refs() == [] and partial_files(store) == []


def test_corrupted_blob_keeps_previous_image(
    home: Path, registry: Registry, disks: list[bytes]
) -> None:
    good = push_reference_image(registry.host, "egpu/corrupt", "v1", disks[0])
    first = pull(good.ref)
    # A new build under the same tag, whose blob then rots in the registry's storage.
    bad = push_reference_image(registry.host, "egpu/corrupt", "v1", disks[1])
    blob = registry.blob_file(bad.disk_digest)
    original = blob.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    try:
        proc = egpu("pull", bad.ref)
    finally:
        blob.write_bytes(original)  # the registry is shared by this module's tests
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: corrupted blob: disk.qcow2 has sha256:"), proc.stderr
    assert f"expected {bad.disk_digest}" in proc.stderr
    store = ImageStore()
    assert not store.has_blob(Digest.parse(bad.disk_digest)) and partial_files(store) == []
    # The previous image is still the one the tag resolves to, and it is whole.
    record = store.get_ref(good.ref)
    assert record is not None and record.disk_digest == good.disk_digest
    assert first.path.read_bytes() == disks[0]


@pytest.mark.network  # connects to a loopback port nobody listens on
def test_unreachable_registry(
    home: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    from egpu.cli import main
    from egpu.images.registry import RETRY_DELAYS
    from registry_server import free_port

    port = free_port()  # nothing listens there
    sleeps: list[float] = []
    real_init = RegistryClient.__init__

    def recording_init(self: RegistryClient, ref: OciReference, **kw: Any) -> None:
        # the CLI's own client and backoff schedule, its waits recorded instead of slept
        real_init(self, ref, **{**kw, "sleep": sleeps.append})

    monkeypatch.setattr(RegistryClient, "__init__", recording_init)
    with pytest.raises(SystemExit) as exit_:
        main(["pull", f"127.0.0.1:{port}/egpu/x:v1"])
    assert exit_.value.code == 1
    assert sleeps == list(RETRY_DELAYS)  # retried with the whole schedule, then gave up
    err = capfd.readouterr().err
    assert err.startswith(f"error: cannot reach registry 127.0.0.1:{port}"), err
    assert len(err.strip().splitlines()) == 1, err


def test_remote_registry_is_never_plain_http() -> None:
    client = RegistryClient(OciReference("registry.example", "x", "v1"))
    assert client.base.startswith("https://")
    client.close()
    client = RegistryClient(OciReference("localhost:5000", "x", "v1"))
    assert client.base.startswith("http://")
    client.close()


# -- resume -----------------------------------------------------------------------------------


def test_cut_connection_resumes_with_range(
    home: Path, registry: Registry, proxy: CountingProxy, disks: list[bytes]
) -> None:
    pushed = push_plain_image(registry.host, "egpu/cut", "v1", disks[0])
    cut = len(disks[0]) // 2
    proxy.reset(cut_after=cut)
    result = pull(f"{proxy.host}/egpu/cut:v1", client_factory=fast_client)
    assert result.path.read_bytes() == disks[0]
    assert proxy.cuts == 1
    ranges = proxy.range_requests()
    assert len(ranges) == 1 and ranges[0].startswith("bytes=") and ranges[0] != "bytes=0-"
    resumed_from = int(ranges[0].removeprefix("bytes=").rstrip("-"))
    assert cut - OVERHEAD < resumed_from < cut
    # Everything the registry sent: one copy of the disk plus headers, not a restart.
    assert len(disks[0]) <= proxy.served < len(disks[0]) + OVERHEAD
    assert result.disk_digest == Digest.parse(pushed.disk_digest)


def test_cut_connection_then_later_pull_resumes(
    home: Path, registry: Registry, proxy: CountingProxy, disks: list[bytes]
) -> None:
    pushed = push_plain_image(registry.host, "egpu/cut2", "v1", disks[1])
    ref = f"{proxy.host}/egpu/cut2:v1"
    proxy.reset(cut_after=len(disks[1]) // 3)
    with pytest.raises(ImageError, match=r"broke off .* run the pull again to resume"):
        pull(ref, client_factory=no_retry_client)
    store = ImageStore()
    (partial,) = partial_files(store)
    kept = partial.stat().st_size
    assert 0 < kept < len(disks[1])
    assert store.get_ref(ref) is None
    proxy.reset()
    result = pull(ref, client_factory=no_retry_client)
    assert result.path.read_bytes() == disks[1]
    assert proxy.range_requests() == [f"bytes={kept}-"]
    assert len(disks[1]) - kept <= proxy.served < len(disks[1]) - kept + OVERHEAD
    assert partial_files(store) == [] and result.disk_digest == Digest.parse(pushed.disk_digest)


def wait_for_partial(store: ImageStore, at_least: int, proc: subprocess.Popen[str]) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for p in partial_files(store):
            size = p.stat().st_size
            if size >= at_least:
                return size
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError("the partial download never grew")


def test_killed_pull_resumes(
    home: Path, registry: Registry, proxy: CountingProxy, disks: list[bytes]
) -> None:
    push_plain_image(registry.host, "egpu/killed", "v1", disks[0])
    ref = f"{proxy.host}/egpu/killed:v1"
    proxy.reset(delay=0.05)  # slow enough (~3 s) to kill it in the middle
    proc = egpu_popen("pull", "--quiet", ref)
    store = ImageStore()
    wait_for_partial(store, 256 * 1024, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (partial,) = partial_files(store)
    kept = partial.stat().st_size
    assert 0 < kept < len(disks[0])
    proxy.reset()
    done = egpu("pull", "--quiet", ref)
    assert done.returncode == 0, done.stderr
    assert proxy.range_requests() == [f"bytes={kept}-"]
    assert proxy.served < len(disks[0]) - kept + OVERHEAD
    record = store.get_ref(ref)
    assert record is not None
    assert store.blob_path(record.disk).read_bytes() == disks[0]


def test_concurrent_pulls_share_one_download(
    home: Path, registry: Registry, proxy: CountingProxy, disks: list[bytes]
) -> None:
    pushed = push_reference_image(registry.host, "egpu/concurrent", "v1", disks[1])
    ref = f"{proxy.host}/egpu/concurrent:v1"
    proxy.reset(delay=0.005)
    procs = [egpu_popen("pull", "--json", ref) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    paths = {json.loads(out)["path"] for out, _ in outs}
    store = ImageStore()
    assert paths == {str(store.blob_path(Digest.parse(pushed.disk_digest)))}
    assert Path(paths.pop()).read_bytes() == disks[1]
    assert partial_files(store) == []
    # The disk crossed the wire once: the second pull waited for the lock, then found it.
    assert proxy.served < len(disks[1]) + OVERHEAD


# -- disk full --------------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs_cache(home: Path, monkeypatch: pytest.MonkeyPatch, mib: int) -> Iterator[Path]:
    """An image cache on a small tmpfs (the tests run as root, as ./run-tests does)."""
    mnt = home / f"tmpfs-{mib}"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(mnt)], check=True)
    monkeypatch.setenv(CACHE_ENV, str(mnt))
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.fixture
def small_cache(home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    with tmpfs_cache(home, monkeypatch, 2) as mnt:
        yield mnt


def test_disk_full(small_cache: Path, registry: Registry, disks: list[bytes]) -> None:
    pushed = push_plain_image(registry.host, "egpu/big", "v1", disks[0])
    proc = egpu("pull", pushed.ref)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: disk full"), proc.stderr
    assert "run the pull again" in proc.stderr


def test_progress_bar_on_a_terminal(
    home: Path, registry: Registry, proxy: CountingProxy, disks: list[bytes]
) -> None:
    """On a terminal the pull draws a bar with size, rate and ETA (rich, on stderr)."""
    import pty

    push_plain_image(registry.host, "egpu/tty", "v1", disks[0])
    proxy.reset(delay=0.02)
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "egpu", "pull", f"{proxy.host}/egpu/tty:v1"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=follower,
        env={**os.environ, "COLUMNS": "120", "TERM": "xterm"},
    )
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO once the child closed its end
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    assert proc.wait(timeout=60) == 0
    text = seen.decode(errors="replace")
    assert "plain.qcow2" in text and "/3.5 MB" in text  # label and size
    assert re.search(r"\d+\.\d [kMG]B/s", text), text  # a rate; its unit follows the speed
    assert "0:00:0" in text  # time remaining


def test_disk_filling_up_mid_download_keeps_the_partial(
    home: Path,
    registry: Registry,
    proxy: CountingProxy,
    disks: list[bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Space runs out while the blob streams in: a clear error, the bytes so far kept, and
    the next pull (after space was freed) resumes from them."""
    push_plain_image(registry.host, "egpu/fills", "v1", disks[0])
    ref = f"{proxy.host}/egpu/fills:v1"
    with tmpfs_cache(home, monkeypatch, 8) as mnt:
        proxy.reset(delay=0.05)
        proc = egpu_popen("pull", "--quiet", ref)
        store = ImageStore()
        wait_for_partial(store, 256 * 1024, proc)
        filler = mnt / "filler"
        # Something else takes all the space that is left (unbuffered: close cannot fail).
        with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(bytes(64 * 1024))
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 1
        assert err.startswith("error: disk full while writing"), err
        assert "run the pull again" in err
        (partial,) = partial_files(store)
        kept = partial.stat().st_size
        assert 0 < kept < len(disks[0])
        filler.unlink()
        proxy.reset()
        done = egpu("pull", "--quiet", ref)
        assert done.returncode == 0, done.stderr
        assert proxy.range_requests() == [f"bytes={kept}-"]
        record = store.get_ref(ref)
        assert record is not None and store.blob_path(record.disk).read_bytes() == disks[0]


def test_pull_through_an_index_picks_arm64(
    home: Path, registry: Registry, disks: list[bytes]
) -> None:
    """A multi-platform OCI index: the arm64 entry is the one pulled (the Mac's architecture)."""
    amd = push_plain_image(registry.host, "egpu/multi", "amd64", disks[0])
    arm = push_plain_image(registry.host, "egpu/multi", "arm64", disks[1])
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                **manifest_descriptor(registry, "egpu/multi", amd.manifest_digest),
                "platform": {"os": "linux", "architecture": "amd64"},
            },
            {
                **manifest_descriptor(registry, "egpu/multi", arm.manifest_digest),
                "platform": {"os": "linux", "architecture": "arm64"},
            },
        ],
    }
    index_digest = push_manifest(registry.host, "egpu/multi", "latest", index)
    result = pull(f"{registry.host}/egpu/multi:latest")
    assert result.path.read_bytes() == disks[1]
    assert str(result.manifest_digest) == arm.manifest_digest
    assert index_digest != arm.manifest_digest


def test_pull_docker_schema2_manifest(home: Path, registry: Registry, disks: list[bytes]) -> None:
    config = b"{}"
    push_blob(registry.host, "egpu/docker", config)
    disk_digest = push_blob(registry.host, "egpu/docker", disks[0])
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": descriptor("application/vnd.docker.container.image.v1+json", config),
        "layers": [descriptor(QCOW2, disks[0])],
    }
    push_manifest(registry.host, "egpu/docker", "v1", manifest)
    result = pull(f"{registry.host}/egpu/docker:v1")
    assert str(result.disk_digest) == disk_digest and result.path.read_bytes() == disks[0]
