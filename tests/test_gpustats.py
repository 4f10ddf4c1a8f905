"""egpu top's parsers: nvidia-smi CSV, amdgpu sysfs, /proc/stat and /proc/meminfo (pure)."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Sequence
from typing import IO

import pytest
from hypothesis import given
from hypothesis import strategies as st

from egpu.errors import AgentError
from egpu.vm import gpustats, stats
from egpu.vm.agent import AgentClient, ExecResult
from egpu.vm.gpustats import GpuSample
from gpu_fixtures import (
    AMD_CARD,
    MEMINFO,
    MEMINFO_OLD,
    NVIDIA_GARBAGE,
    NVIDIA_ONE,
    NVIDIA_TWO,
    PROC_STAT_1,
    PROC_STAT_2,
)


def test_nvidia_one_gpu() -> None:
    assert gpustats.parse_nvidia_smi(NVIDIA_ONE) == (GpuSample(
        index=0, name="NVIDIA GeForce RTX 5090", vendor="nvidia", util_percent=87.0,
        vram_used_mib=30122.0, vram_total_mib=32607.0, temperature_c=71.0, power_w=452.31),)


def test_nvidia_two_gpus_with_fields_not_reported() -> None:
    gpus = gpustats.parse_nvidia_smi(NVIDIA_TWO.encode())
    assert [g.index for g in gpus] == [0, 1]
    assert gpus[1].temperature_c is None and gpus[1].power_w is None
    assert gpus[1].vram_total_mib == 40960.0


def test_nvidia_garbage_lines_are_skipped() -> None:
    gpus = gpustats.parse_nvidia_smi(NVIDIA_GARBAGE)
    assert [(g.index, g.util_percent) for g in gpus] == [(1, 12.0)]


def test_nvidia_bounded_count_and_size() -> None:
    many = "".join(f"{i % 64}, G, 1, 1, 2, 30, 10\n" for i in range(1000))
    assert len(gpustats.parse_nvidia_smi(many)) == gpustats.MAX_GPUS
    with pytest.raises(gpustats.StatsFormatError):
        gpustats.parse_nvidia_smi(b"x" * (gpustats.MAX_TEXT + 1))
    assert gpustats.parse_nvidia_smi("0, " + "n" * 2000 + ", 1, 1, 2, 30, 10\n") == ()


def test_nvidia_name_control_characters_are_replaced() -> None:
    (gpu,) = gpustats.parse_nvidia_smi("0, Evil\x1b[2J, 1, 1, 2, 30, 10\n")
    assert "\x1b" not in gpu.name


def test_amdgpu_sysfs() -> None:
    gpu = gpustats.parse_amdgpu(0, AMD_CARD, "AMD card0")
    assert gpu == GpuSample(index=0, name="AMD card0", vendor="amd", util_percent=42.0,
                            vram_used_mib=2048.0, vram_total_mib=16368.0, temperature_c=54.0,
                            power_w=187.0)


def test_amdgpu_missing_and_bad_files_are_not_reported() -> None:
    files = {"gpu_busy_percent": b"250\n", "mem_info_vram_total": b"garbage"}
    gpu = gpustats.parse_amdgpu(1, files)
    assert (gpu.util_percent, gpu.vram_total_mib, gpu.temperature_c) == (None, None, None)


def test_cpu_load_from_two_proc_stat_samples() -> None:
    before = gpustats.parse_proc_stat(PROC_STAT_1)
    after = gpustats.parse_proc_stat(PROC_STAT_2)
    assert gpustats.cpu_percent(before, after) == pytest.approx(75.0)
    assert gpustats.cpu_percent(after, before) is None  # counters going back are no reading
    assert gpustats.cpu_percent(before, before) is None


@pytest.mark.parametrize("text", ["", "cpu0 1 2 3 4 5 6 7 8\n", "cpu a b c d e f g h\n",
                                  "cpu 1 2\n", f"cpu {1 << 64} 0 0 0 0 0 0 0\n"])
def test_proc_stat_malformed(text: str) -> None:
    with pytest.raises(gpustats.StatsFormatError):
        gpustats.parse_proc_stat(text)


def test_meminfo() -> None:
    mem = gpustats.parse_meminfo(MEMINFO)
    assert (mem.total_kib, mem.available_kib, mem.used_kib) == (4028804, 3500000, 528804)
    old = gpustats.parse_meminfo(MEMINFO_OLD)
    assert old.available_kib == 400
    with pytest.raises(gpustats.StatsFormatError):
        gpustats.parse_meminfo("MemFree: 3 kB\n")


def test_sample_json_line() -> None:
    sample = gpustats.Sample(gpus=gpustats.parse_nvidia_smi(NVIDIA_ONE), cpu_percent=12.345,
                             memory=gpustats.parse_meminfo(MEMINFO))
    doc = sample.to_json()
    assert doc["cpu_percent"] == 12.3
    assert doc["memory"]["total_mib"] == pytest.approx(3934.4, abs=0.1)
    assert doc["gpus"][0]["power_w"] == 452.31


def test_sparkline() -> None:
    assert gpustats.sparkline([0, 50, 100, None]) == "▁▅█ "


@given(st.text(max_size=300))
def test_parsers_never_raise_other_errors(text: str) -> None:
    gpustats.parse_nvidia_smi(text)
    for parse in (gpustats.parse_proc_stat, gpustats.parse_meminfo):
        with contextlib.suppress(gpustats.StatsFormatError):
            parse(text)


class _FakeGuest(AgentClient):
    """A guest agent answering from recorded outputs (no NVIDIA or AMD card exists here)."""

    def __init__(self, nvidia: str | None, files: dict[str, bytes]) -> None:
        super().__init__(socket.socketpair()[0])
        self.nvidia = nvidia
        self.files = files

    def run(self, argv: Sequence[str], *, timeout: float,
            stdin: bytes | None = None) -> ExecResult:
        if argv[0] == "nvidia-smi":
            if self.nvidia is None:
                raise AgentError("guest agent refused: Failed to execute child process")
            return ExecResult(0, None, self.nvidia.encode(), b"")
        if argv[0] == "ls":
            return ExecResult(0, None, b"hwmon3\n", b"")
        raise AgentError("unexpected command")

    def read_file(self, path: str, sink: IO[bytes],
                  advance: Callable[[int], None] | None = None) -> int:
        if path not in self.files:
            raise AgentError("guest agent refused: No such file or directory")
        sink.write(self.files[path])
        return len(self.files[path])


PROC = {"/proc/stat": PROC_STAT_1.encode(), "/proc/meminfo": MEMINFO.encode()}


def test_sampler_with_recorded_nvidia_smi() -> None:
    guest = _FakeGuest(NVIDIA_TWO, dict(PROC))
    sampler = stats.Sampler(guest)
    first = sampler.sample()
    assert first.cpu_percent is None and [g.index for g in first.gpus] == [0, 1]
    guest.files["/proc/stat"] = PROC_STAT_2.encode()
    second = sampler.sample()
    assert second.cpu_percent == pytest.approx(75.0) and second.notes == ()
    assert second.memory is not None and second.memory.total_kib == 4028804


def test_sampler_with_recorded_amdgpu_sysfs() -> None:
    device = "/sys/class/drm/card1/device"
    files = dict(PROC)
    for name in gpustats.AMD_FILES:
        files[f"{device}/{name}"] = AMD_CARD[name]
    for name in gpustats.AMD_HWMON_FILES:
        files[f"{device}/hwmon/hwmon3/{name}"] = AMD_CARD[name]
    (gpu,) = stats.Sampler(_FakeGuest(None, files)).sample().gpus
    assert (gpu.index, gpu.vendor, gpu.power_w, gpu.temperature_c) == (1, "amd", 187.0, 54.0)


def test_sampler_without_a_gpu_driver_notes_it() -> None:
    sample = stats.Sampler(_FakeGuest(None, dict(PROC))).sample()
    assert sample.gpus == () and sample.notes == (stats.NO_GPU_NOTE,)
    assert sample.memory is not None


def test_sampler_refuses_a_huge_stats_file() -> None:
    files = {**PROC, "/proc/meminfo": b"x" * (gpustats.MAX_TEXT + 1)}
    sample = stats.Sampler(_FakeGuest(None, files)).sample()
    assert sample.memory is None and any("more than" in n for n in sample.notes)
