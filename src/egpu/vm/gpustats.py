"""Parse what a guest reports about its GPUs, CPU and memory into typed samples (pure).

Sources, all read from an untrusted guest, so every size, count and number is bounded here:
- NVIDIA: ``nvidia-smi --query-gpu=FIELDS --format=csv,noheader,nounits`` (one CSV line per
  GPU, fields in the order asked; ``[N/A]`` or ``[Not Supported]`` where a board has no value;
  nvidia-smi's ``--help-query-gpu`` documents the fields and units).
- AMD: the amdgpu sysfs files of a DRM card (``gpu_busy_percent``, ``mem_info_vram_used``,
  ``mem_info_vram_total`` in bytes; hwmon ``temp1_input`` in millidegrees Celsius and
  ``power1_average`` in microwatts; Linux ``Documentation/gpu/amdgpu/thermal.rst``).
- CPU load: two ``/proc/stat`` samples; memory: ``/proc/meminfo`` (Linux ``proc(5)``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

NVIDIA_FIELDS = ("index", "name", "utilization.gpu", "memory.used", "memory.total",
                 "temperature.gpu", "power.draw")
NVIDIA_ARGV = ("nvidia-smi", f"--query-gpu={','.join(NVIDIA_FIELDS)}",
               "--format=csv,noheader,nounits")
NVIDIA_MISSING = ("[N/A]", "[Not Supported]", "N/A", "")  # a field the board does not report
MAX_GPUS = 64
MAX_LINE = 1024  # one nvidia-smi line; a longer one is garbage
MAX_NAME = 96
MAX_TEXT = 1 << 20  # any file or output read from the guest, before it is parsed
MIB = 1 << 20
MAX_VRAM_MIB = 1 << 24  # 16 TiB: more than that is not a GPU's memory
MAX_TEMP_C = 200.0
MAX_POWER_W = 5000.0
MILLI = 1000.0
MICRO = 1_000_000.0
# /proc/stat "cpu" line: user nice system idle iowait irq softirq steal (guest counts are
# already inside user and nice, so they are not added again)
STAT_FIELDS = 8
IDLE_FIELDS = (3, 4)  # idle, iowait
MAX_TICKS = 1 << 63
MAX_MEM_KB = 1 << 42  # 4 PiB
AMD_FILES = ("gpu_busy_percent", "mem_info_vram_used", "mem_info_vram_total")
AMD_HWMON_FILES = ("temp1_input", "power1_average")


@dataclass(frozen=True)
class GpuSample:
    """One GPU at one moment; a field the source does not report is None."""

    index: int
    name: str
    vendor: str  # "nvidia" | "amd"
    util_percent: float | None = None
    vram_used_mib: float | None = None
    vram_total_mib: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None


@dataclass(frozen=True)
class CpuTimes:
    """The aggregate ``cpu`` line of /proc/stat: busy and total ticks."""

    busy: int
    total: int


@dataclass(frozen=True)
class Memory:
    total_kib: int
    available_kib: int

    @property
    def used_kib(self) -> int:
        return self.total_kib - self.available_kib


@dataclass(frozen=True)
class Sample:
    """One poll of a VM: its GPUs, CPU load (None on the first poll) and memory."""

    gpus: tuple[GpuSample, ...] = ()
    cpu_percent: float | None = None
    memory: Memory | None = None
    notes: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        """One ``top --json`` line."""
        mem = None if self.memory is None else {
            "total_mib": round(self.memory.total_kib / 1024, 1),
            "used_mib": round(self.memory.used_kib / 1024, 1),
            "available_mib": round(self.memory.available_kib / 1024, 1)}
        return {"gpus": [asdict(g) for g in self.gpus],
                "cpu_percent": None if self.cpu_percent is None else round(self.cpu_percent, 1),
                "memory": mem, "notes": list(self.notes)}


class StatsFormatError(ValueError):
    """A guest's output that cannot be what it claims to be."""


def _text(data: bytes | str) -> str:
    if len(data) > MAX_TEXT:
        raise StatsFormatError(f"more than {MAX_TEXT} bytes")
    return data.decode("utf-8", "replace") if isinstance(data, bytes) else data


def _number(text: str, lo: float, hi: float) -> float | None:
    """A bounded finite number, None for a field the source marks as not available."""
    text = text.strip()
    if text in NVIDIA_MISSING:
        return None
    try:
        value = float(text)
    except ValueError:
        raise StatsFormatError(f"not a number: {text[:40]!r}") from None
    # nan and inf parse as floats; neither is a reading
    if not math.isfinite(value) or not lo <= value <= hi:
        raise StatsFormatError(f"out of range: {text[:40]!r}")
    return value


def _clean(text: str) -> str:
    # a name may reach a terminal: printable characters only, bounded
    return "".join(ch if ch.isprintable() else "?" for ch in text.strip())[:MAX_NAME]


def parse_nvidia_smi(output: bytes | str) -> tuple[GpuSample, ...]:
    """GPUs from nvidia-smi's CSV (:data:`NVIDIA_ARGV`); malformed lines are skipped."""
    gpus: list[GpuSample] = []
    for line in _text(output).splitlines():
        if len(gpus) >= MAX_GPUS:
            break
        if not line.strip() or len(line) > MAX_LINE:
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != len(NVIDIA_FIELDS):
            continue  # a warning or banner nvidia-smi printed instead of a record
        try:
            index = int(parts[0])
            if not 0 <= index < MAX_GPUS:
                continue
            gpus.append(GpuSample(
                index=index, name=_clean(parts[1]), vendor="nvidia",
                util_percent=_number(parts[2], 0, 100),
                vram_used_mib=_number(parts[3], 0, MAX_VRAM_MIB),
                vram_total_mib=_number(parts[4], 0, MAX_VRAM_MIB),
                temperature_c=_number(parts[5], -MAX_TEMP_C, MAX_TEMP_C),
                power_w=_number(parts[6], 0, MAX_POWER_W)))
        except (ValueError, StatsFormatError):
            continue
    return tuple(gpus)


def _sysfs_int(files: Mapping[str, bytes], name: str, hi: int) -> int | None:
    raw = files.get(name)
    if raw is None:
        return None
    try:
        value = int(_text(raw).strip())
    except (ValueError, StatsFormatError):
        return None  # a sysfs read error surfaces as no value, not a failed poll
    return value if 0 <= value <= hi else None


def parse_amdgpu(index: int, files: Mapping[str, bytes], name: str = "AMD GPU") -> GpuSample:
    """One amdgpu card from its sysfs files (names as in :data:`AMD_FILES` and
    :data:`AMD_HWMON_FILES`; a missing file is a field not reported)."""
    used = _sysfs_int(files, "mem_info_vram_used", MAX_VRAM_MIB * MIB)
    total = _sysfs_int(files, "mem_info_vram_total", MAX_VRAM_MIB * MIB)
    temp = _sysfs_int(files, "temp1_input", int(MAX_TEMP_C * MILLI))
    power = _sysfs_int(files, "power1_average", int(MAX_POWER_W * MICRO))
    busy = _sysfs_int(files, "gpu_busy_percent", 100)
    return GpuSample(
        index=index, name=_clean(name), vendor="amd",
        util_percent=None if busy is None else float(busy),
        vram_used_mib=None if used is None else used / MIB,
        vram_total_mib=None if total is None else total / MIB,
        temperature_c=None if temp is None else temp / MILLI,
        power_w=None if power is None else power / MICRO)


def parse_proc_stat(data: bytes | str) -> CpuTimes:
    """The aggregate ``cpu`` line of /proc/stat."""
    for line in _text(data).splitlines():
        parts = line.split()
        if parts and parts[0] == "cpu":
            if len(parts) < 1 + STAT_FIELDS - 1:  # steal is missing on old kernels
                break
            try:
                ticks = [int(p) for p in parts[1:1 + STAT_FIELDS]]
            except ValueError:
                break
            if any(not 0 <= t < MAX_TICKS for t in ticks):
                break
            total = sum(ticks)
            idle = sum(ticks[i] for i in IDLE_FIELDS if i < len(ticks))
            return CpuTimes(busy=total - idle, total=total)
    raise StatsFormatError("no aggregate cpu line in /proc/stat")


def cpu_percent(before: CpuTimes, after: CpuTimes) -> float | None:
    """Load between two samples, 0 to 100 (None when no tick passed or counters went back)."""
    total = after.total - before.total
    busy = after.busy - before.busy
    if total <= 0 or busy < 0:
        return None
    return min(100.0, 100.0 * busy / total)


def parse_meminfo(data: bytes | str) -> Memory:
    """MemTotal and MemAvailable (MemFree + Buffers + Cached on kernels without it)."""
    values: dict[str, int] = {}
    for line in _text(data).splitlines():
        key, sep, rest = line.partition(":")
        parts = rest.split()
        if not sep or not parts:
            continue
        try:
            value = int(parts[0])
        except ValueError:
            continue
        if 0 <= value <= MAX_MEM_KB:
            values[key.strip()] = value
    total = values.get("MemTotal")
    if total is None or total == 0:
        raise StatsFormatError("no MemTotal in /proc/meminfo")
    available = values.get("MemAvailable")
    if available is None:
        available = sum(values.get(k, 0) for k in ("MemFree", "Buffers", "Cached"))
    return Memory(total_kib=total, available_kib=min(available, total))


SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float | None], lo: float = 0.0, hi: float = 100.0) -> str:
    """The last values as block characters (a gap for a missing one)."""
    span = hi - lo
    out = []
    for v in values:
        if v is None or span <= 0:
            out.append(" ")
            continue
        level = (min(max(v, lo), hi) - lo) / span
        out.append(SPARK[min(len(SPARK) - 1, int(level * len(SPARK)))])
    return "".join(out)
