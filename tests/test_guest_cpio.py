"""The newc cpio writer: read back by our parser and by GNU cpio (an independent reader)."""

from __future__ import annotations

import contextlib
import gzip
import stat
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from egpu.guest import cpio

SAMPLE = [
    cpio.directory("bin"),
    cpio.directory("dev"),
    cpio.regular("bin/busybox", b"\x7fELF" + bytes(range(256)) * 3, perm=0o755),
    cpio.symlink("bin/sh", "busybox"),
    cpio.char_device("dev/console", 5, 1),
    cpio.char_device("dev/null", 1, 3, perm=0o666),
    cpio.regular("init", b"#!/bin/sh\necho hi\n", perm=0o755),
    cpio.regular("empty", b""),
]

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-", min_size=1, max_size=40)


def test_layout_is_aligned_and_ends_with_trailer() -> None:
    blob = cpio.archive(SAMPLE)
    assert len(blob) % cpio.ALIGN == 0
    pos = 0
    seen = []
    while True:
        assert pos % cpio.ALIGN == 0
        assert blob[pos:pos + 6] == cpio.MAGIC
        namesize = int(blob[pos + 94:pos + 102], 16)
        filesize = int(blob[pos + 54:pos + 62], 16)
        name = blob[pos + 110:pos + 110 + namesize - 1].decode()
        seen.append(name)
        pos += 110 + namesize
        pos += -pos % 4
        pos += filesize + (-filesize % 4)
        if name == cpio.TRAILER:
            break
    assert pos == len(blob)
    assert seen == [e.name for e in SAMPLE] + [cpio.TRAILER]


def test_parse_reads_back_what_was_written() -> None:
    assert cpio.parse(cpio.archive(SAMPLE)) == SAMPLE
    assert cpio.parse(gzip.decompress(cpio.gzip_archive(SAMPLE))) == SAMPLE


def test_gzip_is_reproducible() -> None:
    assert cpio.gzip_archive(SAMPLE) == cpio.gzip_archive(SAMPLE)


@given(st.lists(st.tuples(names, st.binary(max_size=300), st.integers(0, 0o7777)),
                max_size=12, unique_by=lambda t: t[0]))
def test_round_trip_any_files(files: list[tuple[str, bytes, int]]) -> None:
    entries = [cpio.regular(n, d, perm=p) for n, d, p in files]
    assert cpio.parse(cpio.archive(entries)) == entries


@given(st.binary(max_size=400))
def test_parser_rejects_garbage_with_value_error(blob: bytes) -> None:
    with contextlib.suppress(ValueError):
        cpio.parse(blob)


def test_bad_names_and_values_are_refused() -> None:
    with pytest.raises(ValueError):
        cpio.archive([cpio.regular("a\0b", b"")])
    with pytest.raises(ValueError):
        cpio.archive([cpio.regular("", b"")])
    with pytest.raises(ValueError):
        cpio.archive([cpio.char_device("dev/x", 1 << 32, 0)])


def test_gnu_cpio_lists_and_extracts_it(tmp_path: Path) -> None:
    blob = cpio.archive(SAMPLE)
    listing = subprocess.run(["cpio", "-itv", "--quiet", "--numeric-uid-gid"], input=blob,
                             capture_output=True, check=True).stdout.decode().splitlines()
    by_name = {line.split()[-1] if "->" not in line else line.split()[-3]: line
               for line in listing}
    assert set(by_name) == {e.name for e in SAMPLE}
    assert by_name["bin"].startswith("drwxr-xr-x")
    assert by_name["bin/busybox"].startswith("-rwxr-xr-x")
    assert by_name["bin/sh"].startswith("lrwxrwxrwx") and by_name["bin/sh"].endswith("-> busybox")
    assert by_name["dev/console"].startswith("crw-------")
    assert by_name["dev/console"].split()[4:6] == ["5,", "1"]  # major, minor
    assert by_name["dev/null"].startswith("crw-rw-rw-")
    # extract everything but the device nodes and compare contents
    subprocess.run(["cpio", "-idm", "--quiet", "--no-absolute-filenames", "bin*", "init", "empty"],
                   input=blob, cwd=tmp_path, check=True)
    for e in SAMPLE:
        path = tmp_path / e.name
        if stat.S_ISREG(e.mode):
            assert path.read_bytes() == e.data
            assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(e.mode)
        elif stat.S_ISLNK(e.mode):
            assert str(path.readlink()) == e.data.decode()
