"""Identifier patterns match the whole string: a trailing newline is never part of a name.

Python's ``$`` also matches before a final newline, so ``re.match("^...$")`` let
``"vm\\n"`` through; each check here was passed by that spelling.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import Cli, InProcessCli
from egpu.errors import HostError, ImageError, UsageError
from egpu.host.address import full_address, parse_address, parse_address_pattern
from egpu.host.sysfs import read_sysfs
from egpu.host.vfio_bind import BindRecord
from egpu.images.manifest import parse_descriptor, parse_metadata, safe_file_name
from egpu.images.reference import Digest
from egpu.vm import store
from test_cli_errors import assert_clean_failure
from test_host_sysfs import T

HEX = "ab" * 32
MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
GOOD_DESCRIPTOR: dict[str, object] = {"mediaType": MEDIA_TYPE, "digest": f"sha256:{HEX}",
                                      "size": 1}

@pytest.fixture
def cli(inproc: InProcessCli) -> Cli:
    """What these commands decide and print is tested in-process (quick; see InProcessCli)."""
    return inproc



def test_vm_name() -> None:
    assert store.check_name("vm") == "vm"
    with pytest.raises(UsageError, match="bad VM name"):
        store.check_name("vm\n")


def test_vm_directories_with_a_newline_are_not_listed(tmp_path: Path) -> None:
    for name in ("vm", "vm\n"):
        (tmp_path / name).mkdir()
        (tmp_path / name / store.CONFIG).write_text("{}")
    assert store.list_names(tmp_path) == ["vm"]


def test_run_refuses_a_name_with_a_newline(cli: Cli) -> None:
    assert_clean_failure(cli, cli("run", "--accel", "tcg", "--name", "vm\n"), 2, "bad VM name")


def test_digest() -> None:
    assert Digest.parse(f"sha256:{HEX}").hex == HEX
    with pytest.raises(ImageError, match="invalid digest"):
        Digest.parse(f"sha256:{HEX}\n")


def test_manifest_media_type_and_metadata_sha() -> None:
    assert parse_descriptor(GOOD_DESCRIPTOR).size == 1
    with pytest.raises(ImageError):
        parse_descriptor({**GOOD_DESCRIPTOR, "mediaType": MEDIA_TYPE + "\n"})
    with pytest.raises(ImageError, match="64 hex"):
        parse_metadata(json.dumps({"sha256": HEX + "\n"}).encode())


def test_registry_file_name() -> None:
    assert safe_file_name("disk.img") == "disk.img"
    assert safe_file_name("disk.img\n") is None


@pytest.mark.parametrize("text", ["01:00.0\n", "0000:01:00.0\n", "01:00\n", " 01:00.0"])
def test_user_pci_address(text: str) -> None:
    with pytest.raises(UsageError, match="bad PCI address"):
        parse_address_pattern(text)
    with pytest.raises(UsageError, match="bad PCI address"):
        parse_address(text)


def test_sysfs_address() -> None:
    assert full_address("0000:01:00.0") is not None
    for text in ("0000:01:00.0\n", "0000:01:20.0", "01:00.0", "0000:01:00.0/.."):
        assert full_address(text) is None, text


def test_sysfs_tree_with_a_newline_in_a_device_name_is_refused(tmp_path: Path) -> None:
    root = T.build(tmp_path, T.host_functions())
    devices = root / "bus/pci/devices"
    first = sorted(devices.iterdir())[0]
    first.rename(devices / (first.name + "\n"))
    with pytest.raises(HostError, match="not a PCI address"):
        read_sysfs(root)


def test_bind_record_address() -> None:
    good = [{"address": "0000:01:00.0", "previous_driver": "nvidia"}]
    assert BindRecord.from_json(good).rebindings[0].address == "0000:01:00.0"
    for address in ("0000:01:00.0\n", "..", "0000:01:00.0 "):
        with pytest.raises(HostError, match="bad address"):
            BindRecord.from_json([{"address": address, "previous_driver": "nvidia"}])
